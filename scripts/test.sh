#!/usr/bin/env bash
# The whole test suite, as root: formatting, lints, unit tests, and the
# privileged integration tests (real hearthd, real processes, network
# namespaces). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

[[ $(id -u) == 0 ]] || echo "warning: not root: privileged tests will fail (set HEARTH_SKIP_PRIVILEGED=1 to skip them explicitly)" >&2

scripts/install-deps.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --all-targets --locked
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi

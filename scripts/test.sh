#!/usr/bin/env bash
# The whole test suite, as root: formatting, lints, unit tests, and the
# privileged integration tests (real hearthd, real processes, network
# namespaces). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

[[ $(id -u) == 0 ]] || echo "warning: not root: privileged tests will fail (set HEARTH_SKIP_PRIVILEGED=1 to skip them explicitly)" >&2

scripts/install-deps.sh

# Tests run against a hearthd with its failpoints compiled in (the crash
# suite, crates/hearthd/tests/crash.rs, arms them and fails without them);
# release builds carry none. Clippy checks both configurations.
features=(--features hearthd/failpoints)

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked "${features[@]}" -- -D warnings
cargo build --workspace --all-targets --locked "${features[@]}"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "${features[@]}"
else
  cargo test --workspace --locked --no-fail-fast "${features[@]}"
fi

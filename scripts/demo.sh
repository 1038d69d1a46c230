#!/usr/bin/env bash
# The main job, end to end, on a fresh Debian 12 machine with a Rust
# toolchain, as root: install what is missing, build, start hearthd with
# its built-in defaults (in a throw-away state dir), and take one VM through
# its whole life with the CLI. Cleans up after itself.
#
#   scripts/demo.sh [--kernel PATH --rootfs PATH]
#
# With no kernel and rootfs it writes the minimal test guest (a tiny x86-64
# ELF that prints on the serial port and resets on Ctrl-Alt-Del) and makes a
# small ext4 image with mkfs.ext4. It uses `firecracker` when `hearth
# doctor` finds it, and otherwise hearth-testvmm, the test stand-in that
# serves Firecracker's API but runs no guest — and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

kernel="" rootfs=""
while (($#)); do
  case $1 in
    --kernel) kernel=$2; shift 2;;
    --rootfs) rootfs=$2; shift 2;;
    *) echo "usage: $0 [--kernel PATH --rootfs PATH]" >&2; exit 2;;
  esac
done

[[ $(id -u) == 0 ]] || { echo "demo: run as root (hearthd manages VMM processes and kernel objects)" >&2; exit 1; }

scripts/install-deps.sh

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building (release)"
cargo build --release --workspace --quiet
bin=$PWD/target/release
hearth() { "$bin/hearth" --socket "$work/hearth.sock" "$@"; }

work=$(mktemp -d /tmp/hearth-demo.XXXXXX)
# hearthd runs in a network namespace of its own, so the demo's tap (kept
# idle in the pool after the VM is gone, as hearthd does) and any rules go
# away with it instead of staying on this host.
netns=hearth-demo-$$
daemon=""
cleanup() {
  [[ -n $daemon ]] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
  ip netns del "$netns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if [[ -z $kernel ]]; then
  kernel=$work/test-guest.elf
  "$bin/hearth-testvmm" --write-test-guest "$kernel"
  echo "kernel: the minimal test guest ($kernel)"
fi
if [[ -z $rootfs ]]; then
  rootfs=$work/rootfs.ext4
  truncate -s 64M "$rootfs"
  mkfs.ext4 -q -F "$rootfs"
  echo "rootfs: a 64 MiB ext4 image made with mkfs.ext4 ($rootfs)"
fi

say "hearth doctor"
HEARTH_CONFIG=/dev/null "$bin/hearth" doctor || true
if HEARTH_CONFIG=/dev/null "$bin/hearth" --json doctor | python3 -c '
import json, sys
checks = {c["name"]: c for c in json.load(sys.stdin)["checks"]}
sys.exit(0 if checks.get("firecracker", {}).get("status") == "ok" else 1)'; then
  vmm=$(command -v firecracker)
  echo "VMM: firecracker ($vmm)"
else
  vmm=$bin/hearth-testvmm
  echo "VMM: firecracker is not usable here, so this demo uses hearth-testvmm:"
  echo "     a TEST STAND-IN that serves Firecracker's API but runs no guest."
fi

say "starting hearthd (built-in defaults, state in $work/state, network namespace $netns)"
ip netns add "$netns"
ip -n "$netns" link set lo up
HEARTH_CONFIG=/dev/null ip netns exec "$netns" "$bin/hearthd" --state-dir "$work/state" \
  --socket "$work/hearth.sock" --vmm-binary "$vmm" 2>"$work/hearthd.log" &
daemon=$!
for _ in $(seq 200); do hearth ls >/dev/null 2>&1 && break; sleep 0.05; done
hearth version

say "hearth create demo"
hearth create demo --kernel "$kernel" --rootfs "$rootfs" --vcpus 1 --memory 128
hearth ls
say "hearth start demo"
hearth start demo
hearth ls
sleep 0.3
say "hearth logs demo (the serial console)"
hearth logs demo
say "hearth inspect demo (what it holds: VMM pid, tap, addresses, disk)"
hearth inspect demo
say "hearth stop demo"
hearth stop demo
hearth ls
say "hearth events demo (every transition, persisted before it was reported)"
hearth events demo
say "hearth rm demo"
hearth rm demo
hearth ls
say "done: demo went created → running → stopped → deleted"

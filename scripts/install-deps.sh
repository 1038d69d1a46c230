#!/usr/bin/env bash
# Installs the Debian packages hearth's build, scripts and tests use, when
# missing:
#   build:  libclang-dev + pkg-config + libdevmapper-dev (bindgen in the
#           loopdev-3 and devicemapper crates reads the kernel's headers)
#   run:    nftables (the nft tool, for hearth's firewall), iproute2 (ip
#           netns for test isolation), iputils-ping (the testvmm guest-network
#           test pings the guest), util-linux (losetup, for leak-audit),
#           e2fsprogs (mkfs.ext4 for the demo rootfs), python3 (the demo
#           reads `hearth doctor --json`), iptables + curl (the benchmark's
#           shell-script variant, the way Firecracker's guides set a VM up)
# and the rustfmt and clippy toolchain components.
set -euo pipefail
want=(libclang-dev pkg-config libdevmapper-dev nftables iproute2 iputils-ping util-linux e2fsprogs python3 iptables curl)
need=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

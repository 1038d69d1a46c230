#!/usr/bin/env bash
# Installs the Debian packages hearth's scripts and tests use, when missing:
# iproute2 (ip netns for test isolation), e2fsprogs (mkfs.ext4 for the demo
# rootfs), nftables (the nft tool), util-linux (losetup for leak-audit),
# python3 (the demo reads `hearth doctor --json`), and the rustfmt and
# clippy toolchain components.
set -euo pipefail
need=()
for pair in ip:iproute2 mkfs.ext4:e2fsprogs nft:nftables losetup:util-linux python3:python3; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
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

#!/usr/bin/env bash
# Builds the guest kernel from Debian's linux-source-6.1 package with the
# options in guest/kernel.config merged on top of `make tinyconfig`.
#
# Usage: build-guest-kernel.sh CONFIG OUT_DIR
# Writes OUT_DIR/vmlinux (uncompressed ELF, booted through its PVH entry) and
# OUT_DIR/config. Needs: linux-source-6.1 bc bison flex libelf-dev libssl-dev.
set -euo pipefail

config=$(realpath "$1")
out=$(realpath -m "$2")
source_tarball=${UPSTREAM_KERNEL_SOURCE:-/usr/src/linux-source-6.1.tar.xz}

if [[ ! -f "$source_tarball" ]]; then
  echo "Kernel source $source_tarball not found: install it with 'apt-get install linux-source-6.1'" >&2
  exit 1
fi

mkdir -p "$out"
work=$(mktemp -d "$out/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

tar -xf "$source_tarball" -C "$work" --strip-components=1
cd "$work"
make -s tinyconfig
scripts/kconfig/merge_config.sh -m .config "$config" >/dev/null
make -s olddefconfig
make -s -j"$(nproc)" vmlinux

cp .config "$out/config.tmp" && mv "$out/config.tmp" "$out/config"
cp vmlinux "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"

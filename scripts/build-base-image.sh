#!/usr/bin/env bash
# Builds the default base image's root tree with debootstrap from Debian's
# packages, so a first run needs no container registry.
#
# Usage: build-base-image.sh OUT_DIR
# Writes the tree to OUT_DIR/rootfs. Needs root and debootstrap.
set -euo pipefail

out=$(realpath -m "$1")
suite=${UPSTREAM_BASE_SUITE:-bookworm}
mirror=${UPSTREAM_BASE_MIRROR:-http://deb.debian.org/debian}
packages=bash,coreutils,python3,python3-pip,python3-venv,git,curl,ca-certificates,procps,less,xz-utils

mkdir -p "$out"
work=$(mktemp -d "$out/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

debootstrap --variant=minbase --include="$packages" "$suite" "$work/rootfs" "$mirror"

# Trim what a sandbox never uses: package lists and caches, docs and locales.
rm -rf "$work"/rootfs/var/lib/apt/lists/* "$work"/rootfs/var/cache/apt/*.bin \
  "$work"/rootfs/var/cache/apt/archives/*.deb \
  "$work"/rootfs/usr/share/doc/* "$work"/rootfs/usr/share/man/* "$work"/rootfs/usr/share/info/*
echo "sandbox" > "$work/rootfs/etc/hostname"
printf 'nameserver 10.0.2.3\n' > "$work/rootfs/etc/resolv.conf"

rm -rf "$out/rootfs"
mv "$work/rootfs" "$out/rootfs"

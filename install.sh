#!/usr/bin/env bash
# Installs upstream: the Debian packages it needs at run time (when run as
# root and they are missing), then the `upstream` binary and its statically
# linked guest agent into $PREFIX/bin (default /usr/local/bin).
set -euo pipefail

prefix=${PREFIX:-/usr/local}
cd "$(dirname "$0")"

# qemu-system-x86: the VMM; e2fsprogs: image and scratch file systems;
# debootstrap: the base image; linux-source-6.1 and its build tools: the
# guest kernel, built by `upstream setup`.
packages=(qemu-system-x86 e2fsprogs debootstrap linux-source-6.1 bc bison flex
  libelf-dev libssl-dev make gcc)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "Installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  else
    echo "Missing packages: ${missing[*]}; install them with apt-get (as root)" >&2
    exit 1
  fi
fi

cargo build --release -p upstream-cli
# The agent is PID 1 in images with any C library or none: link it
# statically. --target keeps the flag away from build scripts and macros.
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release -p upstream-agent --target x86_64-unknown-linux-gnu

install -D -m 0755 target/release/upstream "$prefix/bin/upstream"
install -D -m 0755 target/x86_64-unknown-linux-gnu/release/upstream-agent \
  "$prefix/bin/upstream-agent"
echo "Installed upstream and upstream-agent in $prefix/bin; next: upstream setup"

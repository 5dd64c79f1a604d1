#!/usr/bin/env bash
# Measures `upstream image pull` of a mid-sized image from a loopback
# registry beside `skopeo copy` of the same image to an OCI layout, in the
# same run, then the start of a first and a second sandbox of that image.
#
# Usage: scripts/bench-image.sh ROOTFS_DIR [RUNS]
# ROOTFS_DIR is any root tree, such as the one scripts/build-base-image.sh
# writes. Needs docker-registry, skopeo, python3 and a release build
# (cargo build --release -p upstream-cli). Uses the kernel and agent of
# $UPSTREAM_HOME with an empty image cache of its own, so that no layer is
# already cached.
set -euo pipefail
cd "$(dirname "$0")/.."

root=$1
runs=${2:-3}
upstream=target/release/upstream
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
registry_pid=
cleanup() {
  [[ -n $registry_pid ]] && kill "$registry_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/registry.yml" <<YAML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$port
YAML
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
registry_pid=$!
sleep 1

scripts/oci-layout-from-dir.py "$root" "$work/layout" /srv
skopeo copy -q --dest-tls-verify=false "oci:$work/layout" "docker://127.0.0.1:$port/bench:1"
image=localhost:$port/bench:1

home=$work/home
mkdir -p "$home"
cp "${UPSTREAM_HOME:?set UPSTREAM_HOME to a prepared data directory}/setup.json" "$home/"
for folder in kernel agent disks; do
  [[ -e $UPSTREAM_HOME/$folder ]] && ln -s "$UPSTREAM_HOME/$folder" "$home/$folder"
done
export UPSTREAM_HOME=$home

ms() { echo $(( ($2 - $1) / 1000000 )); }
for run in $(seq "$runs"); do
  "$upstream" image rm "$image" >/dev/null 2>&1 || true
  "$upstream" image prune >/dev/null 2>&1
  rm -rf "$work/copy"
  start=$(date +%s%N)
  skopeo copy -q --src-tls-verify=false "docker://127.0.0.1:$port/bench:1" "oci:$work/copy"
  middle=$(date +%s%N)
  "$upstream" image pull "$image" 2>/dev/null
  end=$(date +%s%N)
  "$upstream" exec --image "$image" -- true
  first=$(date +%s%N)
  "$upstream" exec --image "$image" -- true
  second=$(date +%s%N)
  echo "run $run: skopeo copy $(ms "$start" "$middle") ms, upstream image pull $(ms "$middle" "$end") ms," \
    "first sandbox $(ms "$end" "$first") ms, second sandbox $(ms "$first" "$second") ms"
done

#!/usr/bin/env python3
"""Write a one-layer OCI image layout from a root directory tree.

Usage: oci-layout-from-dir.py ROOT OUT WORKDIR [USER]

The image config sets PATH and GREETING=from-image-config in Env, WorkingDir
and optionally User, so a test can check that upstream honours them. The
layer is a gzip tar of ROOT with numeric ownership; run as root to keep it.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys


def write_blob(out, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(f"{out}/blobs/sha256/{digest}", "wb") as blob:
        blob.write(data)
    return digest


def build(root, out, env, workdir, user=None):
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out + "/blobs/sha256")
    tar = ["tar", "--numeric-owner", "-C", root, "-cf", "-", "."]
    raw = subprocess.run(tar, check=True, capture_output=True).stdout
    compressed = subprocess.run(["gzip", "-1"], input=raw, check=True, capture_output=True).stdout
    layer_digest = write_blob(out, compressed)

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": env, "WorkingDir": workdir, **({"User": user} if user else {})},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
    }
    config_bytes = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + write_blob(out, config_bytes),
            "size": len(config_bytes),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": "sha256:" + layer_digest,
            "size": len(compressed),
        }],
    }
    manifest_bytes = json.dumps(manifest).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": manifest["mediaType"],
        "digest": "sha256:" + write_blob(out, manifest_bytes),
        "size": len(manifest_bytes),
    }]}
    with open(out + "/index.json", "w") as index_file:
        json.dump(index, index_file)
    with open(out + "/oci-layout", "w") as layout_file:
        layout_file.write('{"imageLayoutVersion": "1.0.0"}')


if __name__ == "__main__":
    env = ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=from-image-config"]
    user = sys.argv[4] if len(sys.argv) > 4 else None
    build(sys.argv[1], sys.argv[2], env, sys.argv[3], user)

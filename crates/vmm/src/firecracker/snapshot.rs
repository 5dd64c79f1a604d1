//! The files of a snapshot and the facts it must agree with on restore.
//!
//! A snapshot folder contains Firecracker's device state (`vmstate`), the guest
//! memory (`memory`), a copy of the sandbox's scratch disk (`scratch.ext4`)
//! and `snapshot.json`. The image root is not copied: it is read-only and
//! shared, so the restoring sandbox must use the same file.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::FirecrackerError;
use crate::{Error, Result};

pub const STATE_FILE: &str = "vmstate";
pub const MEMORY_FILE: &str = "memory";
pub const SCRATCH_FILE: &str = "scratch.ext4";
pub const METADATA_FILE: &str = "snapshot.json";

/// `snapshot.json`: what the snapshot was taken with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Firecracker loads only snapshots of its own version.
    pub firecracker_version: String,
    /// The image root file system, canonical.
    pub root_disk: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
}

impl Metadata {
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(METADATA_FILE);
        let json = serde_json::to_vec_pretty(self).expect("metadata serializes");
        fs::write(&path, json).map_err(Error::io(format!("writing {}", path.display())))
    }

    /// Reads the metadata of the snapshot in `dir` and checks that its
    /// files are there.
    pub fn read(dir: &Path) -> Result<Self> {
        for name in [METADATA_FILE, STATE_FILE, MEMORY_FILE, SCRATCH_FILE] {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(FirecrackerError::SnapshotMissing(path).into());
            }
        }
        let path = dir.join(METADATA_FILE);
        let bytes = fs::read(&path).map_err(Error::io(format!("reading {}", path.display())))?;
        serde_json::from_slice(&bytes).map_err(|err| {
            FirecrackerError::SnapshotInvalid {
                path,
                reason: err.to_string(),
            }
            .into()
        })
    }

    /// Checks that a sandbox with this image root, vCPU count and memory
    /// size can be restored from the snapshot.
    pub fn check(&self, dir: &Path, root_disk: &Path, vcpus: u32, memory_mib: u32) -> Result<()> {
        let root_disk = canonical(root_disk)?;
        let mismatch = |what, snapshot: String, current: String| {
            Err(FirecrackerError::SnapshotMismatch {
                dir: dir.to_path_buf(),
                what,
                snapshot,
                current,
            }
            .into())
        };
        if root_disk != self.root_disk {
            return mismatch(
                "image root",
                self.root_disk.display().to_string(),
                root_disk.display().to_string(),
            );
        }
        if vcpus != self.vcpus {
            return mismatch("vCPU count", self.vcpus.to_string(), vcpus.to_string());
        }
        if memory_mib != self.memory_mib {
            return mismatch(
                "memory size (MiB)",
                self.memory_mib.to_string(),
                memory_mib.to_string(),
            );
        }
        Ok(())
    }

    pub fn check_version(&self, dir: &Path, version: &str) -> Result<()> {
        if version == self.firecracker_version {
            return Ok(());
        }
        Err(FirecrackerError::SnapshotMismatch {
            dir: dir.to_path_buf(),
            what: "Firecracker version",
            snapshot: self.firecracker_version.clone(),
            current: version.to_string(),
        }
        .into())
    }
}

pub fn canonical(path: &Path) -> Result<PathBuf> {
    path.canonicalize()
        .map_err(Error::io(format!("resolving {}", path.display())))
}

/// Removes a file if it exists.
pub fn remove_quietly(path: &Path) {
    if let Err(err) = fs::remove_file(path) {
        if err.kind() != io::ErrorKind::NotFound {
            tracing::warn!(file = %path.display(), error = %err, "removing a file failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_dir() -> (tempfile::TempDir, Metadata) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root.ext4");
        fs::write(&root, b"root").unwrap();
        for name in [STATE_FILE, MEMORY_FILE, SCRATCH_FILE] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        let metadata = Metadata {
            firecracker_version: "1.16.1".into(),
            root_disk: root.canonicalize().unwrap(),
            vcpus: 1,
            memory_mib: 256,
        };
        metadata.write(dir.path()).unwrap();
        (dir, metadata)
    }

    #[test]
    fn metadata_round_trips() {
        let (dir, metadata) = snapshot_dir();

        assert_eq!(Metadata::read(dir.path()).unwrap(), metadata);
    }

    #[test]
    fn missing_memory_file_is_named() {
        let (dir, _) = snapshot_dir();
        fs::remove_file(dir.path().join(MEMORY_FILE)).unwrap();

        let err = Metadata::read(dir.path()).unwrap_err().to_string();

        assert!(err.contains("memory not found"), "{err}");
    }

    #[test]
    fn other_image_root_is_rejected() {
        let (dir, metadata) = snapshot_dir();
        let other = dir.path().join("other.ext4");
        fs::write(&other, b"other").unwrap();

        let err = metadata
            .check(dir.path(), &other, 1, 256)
            .unwrap_err()
            .to_string();

        assert!(err.contains("was taken with image root"), "{err}");
        assert!(err.contains("other.ext4"), "{err}");
    }

    #[test]
    fn other_memory_size_is_rejected() {
        let (dir, metadata) = snapshot_dir();

        let err = metadata
            .check(dir.path(), &metadata.root_disk, 1, 512)
            .unwrap_err()
            .to_string();

        assert!(err.contains("memory size (MiB) 256"), "{err}");
    }

    #[test]
    fn other_version_is_rejected() {
        let (dir, metadata) = snapshot_dir();

        assert!(metadata.check_version(dir.path(), "1.16.1").is_ok());
        let err = metadata
            .check_version(dir.path(), "1.15.0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Firecracker version 1.16.1"), "{err}");
    }
}

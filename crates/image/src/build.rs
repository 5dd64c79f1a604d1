//! Blob cache writes and rootfs builds shared by pulls and imports.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::rootfs;
use crate::unpack::{LayerFile, Unpacker};
use crate::{ImageError, ImageStore};

impl ImageStore {
    /// Copies `reader` into the blob cache and returns its digest. When `expected` is
    /// given, a blob whose content hashes differently is rejected and nothing is stored.
    pub(crate) fn store_blob(
        &self,
        reference: &str,
        reader: &mut dyn Read,
        expected: Option<&str>,
    ) -> Result<String, ImageError> {
        let tmp_dir = self.tmp_dir();
        let mut temp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&tmp_dir)
            .map_err(|source| ImageError::io(reference, &tmp_dir, source))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0; 128 << 10];
        loop {
            let count = match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(count) => count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(ImageError::io(reference, temp.path(), source)),
            };
            hasher.update(&buffer[..count]);
            temp.write_all(&buffer[..count])
                .map_err(|source| ImageError::io(reference, temp.path(), source))?;
        }
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        if let Some(expected) = expected {
            if expected != digest {
                return Err(ImageError::DigestMismatch {
                    reference: reference.to_string(),
                    expected: expected.to_string(),
                    actual: digest,
                });
            }
        }
        let target = self.blob_path(&digest);
        if !target.is_file() {
            let (_, path) = temp
                .keep()
                .map_err(|error| ImageError::io(reference, &tmp_dir, error.error))?;
            self.publish(reference, &path, &target)?;
        }
        Ok(digest)
    }

    /// Reads a cached blob whole; used for configs and manifests, which are small.
    pub(crate) fn read_blob(&self, reference: &str, digest: &str) -> Result<Vec<u8>, ImageError> {
        let path = self.blob_path(digest);
        fs::read(&path).map_err(|source| ImageError::io(reference, path, source))
    }

    /// Builds `rootfs/<id>.ext4` from layer blobs, unless it exists. Unpacks into a
    /// directory under `tmp/` that is deleted on return, builds the ext4 under `tmp/` and
    /// renames it into place, so the rootfs path holds only complete images.
    pub(crate) fn build_rootfs(
        &self,
        reference: &str,
        id: &str,
        layers: &[LayerFile],
    ) -> Result<PathBuf, ImageError> {
        let target = self.rootfs_path(id);
        if target.is_file() {
            return Ok(target);
        }
        let tmp_dir = self.tmp_dir();
        let work = tempfile::Builder::new()
            .prefix("unpack-")
            .tempdir_in(&tmp_dir)
            .map_err(|source| ImageError::io(reference, &tmp_dir, source))?;
        let tree = work.path().join("tree");
        create_tree_root(&tree).map_err(|source| ImageError::io(reference, &tree, source))?;

        let mut unpacker = Unpacker::new(reference, &tree, self.options.limits);
        for layer in layers {
            tracing::debug!(reference, layer = %layer.digest, "Applying layer");
            unpacker.apply(layer)?;
        }
        rootfs::add_guest_dirs(&tree).map_err(|source| ImageError::io(reference, &tree, source))?;

        let image = work.path().join("rootfs.ext4");
        rootfs::build_ext4(reference, &tree, &image, &[])?;
        self.publish(reference, &image, &target)?;
        Ok(target)
    }
}

/// Creates the tree root owned by root with mode 0755, the usual `/`.
fn create_tree_root(tree: &Path) -> io::Result<()> {
    fs::create_dir(tree)?;
    fs::set_permissions(tree, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

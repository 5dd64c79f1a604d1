//! The image store: local images, the blob cache and the rootfs files under one directory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::index::{now_millis, FileLock, IndexEntry, IndexFile};
use crate::reference::{canonical, digest_query, parse};
use crate::rootfs::{self, GUEST_DIRS};
use crate::unpack::UnpackLimits;
use crate::{ImageConfig, ImageError};

/// Settings of an [`ImageStore`]; [`Default`] suits normal use.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Caps that stop a hostile or broken image from filling the disk while it unpacks.
    pub limits: UnpackLimits,
    /// Docker client config file that contains registry credentials. `None` reads
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, when present.
    pub docker_config: Option<PathBuf>,
    /// Layers downloaded at the same time during one pull.
    pub concurrent_downloads: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            limits: UnpackLimits::default(),
            docker_config: None,
            concurrent_downloads: 3,
        }
    }
}

/// Local OCI images and their root filesystems, under one directory (normally
/// `<data_dir>/images`).
///
/// The directory holds:
///
/// - `index.json`: every local image (reference, digest, image ID, config, blobs, times),
///   replaced atomically on each change;
/// - `blobs/sha256/<hex>`: the blob cache (image configs and compressed layers), shared
///   by all images so that a layer present once is never downloaded again;
/// - `rootfs/<id-hex>.ext4`: one read-only ext4 root filesystem per image ID, shared by
///   every sandbox and every reference of that image;
/// - `tmp/`: downloads and builds in progress, removed by [`ImageStore::prune`];
/// - `index.lock`, `gc.lock`: `flock` files that order writers and garbage collection.
///
/// Several processes can use one store at once. Every file reaches its final name by
/// rename only when complete, and the index entry is written last, so an interrupted pull
/// leaves at most unreferenced files that the next pull reuses or `prune` removes.
#[derive(Debug, Clone)]
pub struct ImageStore {
    pub(crate) root: PathBuf,
    pub(crate) options: StoreOptions,
    pub(crate) index: IndexFile,
}

/// A local image, ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    /// Canonical reference, such as `docker.io/library/python:3.12`.
    pub reference: String,
    /// Manifest digest of a pulled or OCI-layout image. For a `docker save` archive it is the
    /// config digest (the Docker image ID), and for a directory build the tree digest.
    pub digest: String,
    /// Image ID: the config digest, or the tree digest for a directory. It names the rootfs.
    pub id: String,
    /// Read-only ext4 file holding the image's root filesystem.
    pub rootfs: PathBuf,
    pub config: ImageConfig,
}

/// A line of [`ImageStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    pub reference: String,
    pub digest: String,
    pub id: String,
    /// Bytes the rootfs file occupies on disk, which is less than its apparent size because
    /// free space in the file system is left sparse.
    pub size: u64,
    pub created: SystemTime,
    /// Time of the last [`ImageStore::touch`], or of the pull or import.
    pub last_used: SystemTime,
}

/// Counts of what [`ImageStore::prune`] deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub blobs_removed: usize,
    pub rootfs_removed: usize,
    pub temp_removed: usize,
    /// Bytes freed on disk.
    pub bytes_freed: u64,
}

impl ImageStore {
    /// Opens the store at `root`, creating its directories when missing.
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        Self::open_with(root, StoreOptions::default())
    }

    /// Opens the store at `root` with explicit options.
    pub fn open_with(root: &Path, options: StoreOptions) -> Result<Self, ImageError> {
        for dir in ["blobs/sha256", "rootfs", "tmp"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(|source| ImageError::io("store", path, source))?;
        }
        let store = ImageStore {
            root: root.to_path_buf(),
            options,
            index: IndexFile::new(root),
        };
        store.index.load()?;
        Ok(store)
    }

    /// Returns the store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.root.join("blobs/sha256").join(hex)
    }

    pub(crate) fn rootfs_path(&self, id: &str) -> PathBuf {
        let hex = id.strip_prefix("sha256:").unwrap_or(id);
        self.root.join("rootfs").join(format!("{hex}.ext4"))
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Takes the lock that keeps [`ImageStore::prune`] and [`ImageStore::remove`] from
    /// deleting files of a pull, import or build in progress. Held shared by those.
    pub(crate) fn gc_lock(&self, exclusive: bool) -> Result<FileLock, ImageError> {
        let path = self.root.join("gc.lock");
        let lock = if exclusive {
            FileLock::exclusive(&path)
        } else {
            FileLock::shared(&path)
        };
        lock.map_err(|source| ImageError::io("store", path, source))
    }

    /// Looks up a local image by reference (`python:3.12`, any form that [`pull`] accepts)
    /// or by digest or image ID (`sha256:<hex>`, or a hex prefix of 12 digits or more).
    /// Uses no network. Returns `None` when no such image is local.
    ///
    /// [`pull`]: ImageStore::pull
    pub fn get(&self, reference: &str) -> Result<Option<LocalImage>, ImageError> {
        let Some(entry) = self.find_entry(reference)? else {
            return Ok(None);
        };
        let image = self.local_image(&entry);
        if !image.rootfs.is_file() {
            // The index names a rootfs that someone deleted by hand. Reporting the image as
            // absent makes the caller pull it again, which rebuilds the file.
            tracing::warn!(reference = %entry.reference, rootfs = %image.rootfs.display(),
                "Local image has no rootfs file; treating it as absent");
            return Ok(None);
        }
        Ok(Some(image))
    }

    fn find_entry(&self, reference: &str) -> Result<Option<IndexEntry>, ImageError> {
        let index = self.index.load()?;
        if let Some(hex) = digest_query(reference) {
            let found = index.find_by_digest(hex);
            let Some(first) = found.first() else {
                return Ok(None);
            };
            if found.iter().any(|entry| entry.id != first.id) {
                return Err(ImageError::InvalidReference {
                    reference: reference.to_string(),
                    reason: "the digest prefix matches several images; give more digits"
                        .to_string(),
                });
            }
            return Ok(Some((*first).clone()));
        }
        let canonical = canonical(&parse(reference)?);
        Ok(index.find(&canonical).cloned())
    }

    pub(crate) fn local_image(&self, entry: &IndexEntry) -> LocalImage {
        LocalImage {
            reference: entry.reference.clone(),
            digest: entry.digest.clone(),
            id: entry.id.clone(),
            rootfs: self.rootfs_path(&entry.id),
            config: entry.config.clone(),
        }
    }

    /// Builds an image named `name` (any reference form, such as `base` or `base:bookworm`)
    /// from a root directory tree, such as one made by `debootstrap`.
    ///
    /// The tree is read, never modified. Its digest covers names, modes, ownership and
    /// contents, so rebuilding an unchanged tree reuses the existing rootfs. Missing
    /// `proc`, `sys`, `dev`, `tmp` and `run` directories are added inside the image.
    /// Ownership is kept only when the process runs as root.
    pub fn import_rootfs_dir(
        &self,
        name: &str,
        dir: &Path,
        config: ImageConfig,
    ) -> Result<LocalImage, ImageError> {
        let reference = canonical(&parse(name)?);
        let metadata =
            fs::metadata(dir).map_err(|source| ImageError::io(&reference, dir, source))?;
        if !metadata.is_dir() {
            return Err(ImageError::InvalidImage {
                reference,
                reason: format!("{} is not a directory", dir.display()),
            });
        }
        let _gc = self.gc_lock(false)?;
        let digest =
            rootfs::tree_digest(dir).map_err(|source| ImageError::io(&reference, dir, source))?;
        let rootfs = self.rootfs_path(&digest);
        if !rootfs.is_file() {
            let missing: Vec<(&str, u32)> = GUEST_DIRS
                .into_iter()
                .filter(|(name, _)| fs::symlink_metadata(dir.join(name)).is_err())
                .collect();
            let temp = self.temp_file_path("ext4")?;
            let built = rootfs::build_ext4(&reference, dir, &temp, &missing)
                .and_then(|()| self.publish(&reference, &temp, &rootfs));
            if built.is_err() {
                let _ = fs::remove_file(&temp);
            }
            built?;
        }
        let now = now_millis();
        let entry = IndexEntry {
            reference,
            digest: digest.clone(),
            id: digest,
            blobs: Vec::new(),
            config,
            created: now,
            last_used: now,
        };
        self.index.insert(entry.clone())?;
        Ok(self.local_image(&entry))
    }

    /// Returns a fresh path under `tmp/` with the given extension; the file does not exist.
    pub(crate) fn temp_file_path(&self, extension: &str) -> Result<PathBuf, ImageError> {
        let file = tempfile::Builder::new()
            .prefix("build-")
            .suffix(&format!(".{extension}"))
            .tempfile_in(self.tmp_dir())
            .map_err(|source| ImageError::io("store", self.tmp_dir(), source))?;
        let (_, path) = file
            .keep()
            .map_err(|error| ImageError::io("store", self.tmp_dir(), error.error))?;
        fs::remove_file(&path).map_err(|source| ImageError::io("store", &path, source))?;
        Ok(path)
    }

    /// Makes a finished temporary file visible under its final name: sync, mark read-only,
    /// rename.
    pub(crate) fn publish(
        &self,
        reference: &str,
        temp: &Path,
        target: &Path,
    ) -> Result<(), ImageError> {
        use std::os::unix::fs::PermissionsExt;
        let io_error = |path: &Path, source| ImageError::io(reference, path, source);
        let file = fs::File::open(temp).map_err(|source| io_error(temp, source))?;
        file.sync_all().map_err(|source| io_error(temp, source))?;
        fs::set_permissions(temp, fs::Permissions::from_mode(0o444))
            .map_err(|source| io_error(temp, source))?;
        fs::rename(temp, target).map_err(|source| io_error(target, source))?;
        Ok(())
    }

    /// Lists local images, most recently used first.
    pub fn list(&self) -> Result<Vec<ImageSummary>, ImageError> {
        use std::os::unix::fs::MetadataExt;
        let index = self.index.load()?;
        let mut summaries: Vec<ImageSummary> = index
            .images
            .iter()
            .map(|entry| {
                let size = fs::metadata(self.rootfs_path(&entry.id))
                    .map(|metadata| metadata.blocks() * 512)
                    .unwrap_or(0);
                ImageSummary {
                    reference: entry.reference.clone(),
                    digest: entry.digest.clone(),
                    id: entry.id.clone(),
                    size,
                    created: UNIX_EPOCH + Duration::from_millis(entry.created),
                    last_used: UNIX_EPOCH + Duration::from_millis(entry.last_used),
                }
            })
            .collect();
        summaries.sort_by_key(|summary| std::cmp::Reverse(summary.last_used));
        Ok(summaries)
    }

    /// Removes a local image by reference, or every reference of an image by digest or ID.
    /// Deletes the rootfs file once no reference uses it. Blobs stay in the cache until
    /// [`ImageStore::prune`]. Sandboxes that have the rootfs open keep running.
    pub fn remove(&self, reference: &str) -> Result<(), ImageError> {
        let Some(found) = self.find_entry(reference)? else {
            return Err(ImageError::NotLocal {
                reference: reference.to_string(),
            });
        };
        let _gc = self.gc_lock(true)?;
        let by_digest = digest_query(reference).is_some();
        let orphaned_id = self.index.update(|index| {
            index.images.retain(|entry| {
                let selected = if by_digest {
                    entry.id == found.id
                } else {
                    entry.reference == found.reference
                };
                !selected
            });
            let still_used = index.images.iter().any(|entry| entry.id == found.id);
            Ok((!still_used).then(|| found.id.clone()))
        })?;
        if let Some(id) = orphaned_id {
            let path = self.rootfs_path(&id);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(ImageError::io(reference, path, source)),
            }
        }
        Ok(())
    }

    /// Deletes blobs and rootfs files that no local image refers to, and every file left
    /// in `tmp/` by interrupted pulls. Waits for pulls, imports and builds in progress.
    pub fn prune(&self) -> Result<PruneReport, ImageError> {
        use std::collections::HashSet;
        let _gc = self.gc_lock(true)?;
        let index = self.index.load()?;
        let blobs: HashSet<String> = index
            .images
            .iter()
            .flat_map(|entry| entry.blobs.iter().map(|digest| hex_of(digest).to_string()))
            .collect();
        let rootfs: HashSet<String> = index
            .images
            .iter()
            .map(|entry| format!("{}.ext4", hex_of(&entry.id)))
            .collect();

        let mut report = PruneReport::default();
        let blob_dir = self.root.join("blobs/sha256");
        for (name, freed) in remove_unlisted(&blob_dir, &blobs)? {
            tracing::debug!(blob = name, "Pruned blob");
            report.blobs_removed += 1;
            report.bytes_freed += freed;
        }

        let rootfs_dir = self.root.join("rootfs");
        for (_, freed) in remove_unlisted(&rootfs_dir, &rootfs)? {
            report.rootfs_removed += 1;
            report.bytes_freed += freed;
        }

        for (_, freed) in remove_unlisted(&self.tmp_dir(), &HashSet::new())? {
            report.temp_removed += 1;
            report.bytes_freed += freed;
        }
        Ok(report)
    }

    /// Records that a sandbox started from `image` now, for [`ImageSummary::last_used`].
    /// Failures are logged and otherwise ignored, because a stale time must not stop a
    /// sandbox.
    pub fn touch(&self, image: &LocalImage) {
        let now = now_millis();
        let result = self.index.update(|index| {
            for entry in &mut index.images {
                if entry.reference == image.reference {
                    entry.last_used = now;
                }
            }
            Ok(())
        });
        if let Err(error) = result {
            tracing::warn!(reference = %image.reference, %error, "Recording image use failed");
        }
    }
}

pub(crate) fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// Deletes every entry of `dir` whose name is not in `keep`; returns names and bytes freed.
fn remove_unlisted(
    dir: &Path,
    keep: &std::collections::HashSet<String>,
) -> Result<Vec<(String, u64)>, ImageError> {
    use std::os::unix::fs::MetadataExt;
    let io_error = |source| ImageError::io("store", dir, source);
    let mut removed = Vec::new();
    for child in fs::read_dir(dir).map_err(io_error)? {
        let child = child.map_err(io_error)?;
        let name = child.file_name().to_string_lossy().into_owned();
        if keep.contains(&name) {
            continue;
        }
        let path = child.path();
        let metadata = fs::symlink_metadata(&path).map_err(io_error)?;
        let freed = metadata.blocks() * 512;
        let result = if metadata.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.map_err(|source| ImageError::io("store", &path, source))?;
        removed.push((name, freed));
    }
    Ok(removed)
}

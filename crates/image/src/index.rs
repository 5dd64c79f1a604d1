//! The image index: `index.json`, the list of local images and what they refer to.
//!
//! The index is the commit point of every pull, import and build: an image exists once its
//! entry is in the index, and the entry is written only after the rootfs file and every blob
//! it names are complete. Writers hold an exclusive `flock` on `index.lock` for the whole
//! read-modify-write, and the file is replaced by rename, so readers take no lock and never
//! see a partial file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{ImageConfig, ImageError};

const INDEX_VERSION: u32 = 1;

/// One local image: a reference and the content it points to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IndexEntry {
    /// Canonical reference, such as `docker.io/library/python:3.12`.
    pub reference: String,
    /// Manifest digest for pulled and OCI-layout images, config digest for `docker save`
    /// archives, tree digest for rootfs directories.
    pub digest: String,
    /// Key of the rootfs file: config digest (the image ID) or tree digest.
    pub id: String,
    /// Digests of the blobs this image keeps in the blob cache (config and layers).
    #[serde(default)]
    pub blobs: Vec<String>,
    pub config: ImageConfig,
    /// Milliseconds since the Unix epoch.
    pub created: u64,
    /// Milliseconds since the Unix epoch; sandboxes started in the same second still order.
    pub last_used: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Index {
    version: u32,
    pub images: Vec<IndexEntry>,
}

/// An exclusive or shared `flock` on a file, released on drop.
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn exclusive(path: &Path) -> io::Result<Self> {
        Self::acquire(path, libc::LOCK_EX)
    }

    pub fn shared(path: &Path) -> io::Result<Self> {
        Self::acquire(path, libc::LOCK_SH)
    }

    fn acquire(path: &Path, operation: libc::c_int) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        loop {
            // SAFETY: the descriptor belongs to `file`, which outlives the call.
            let result = unsafe { libc::flock(file.as_raw_fd(), operation) };
            if result == 0 {
                return Ok(FileLock { _file: file });
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

impl Index {
    /// Reads the index at `path`; a missing file is an empty index.
    pub fn load(path: &Path) -> Result<Self, ImageError> {
        let text = match fs::read(path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Ok(Index {
                    version: INDEX_VERSION,
                    images: Vec::new(),
                })
            }
            Err(source) => {
                return Err(ImageError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let index: Index = serde_json::from_slice(&text).map_err(|error| ImageError::Io {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidData, error),
        })?;
        if index.version != INDEX_VERSION {
            return Err(ImageError::Io {
                path: path.to_path_buf(),
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("index version {} is not {INDEX_VERSION}", index.version),
                ),
            });
        }
        Ok(index)
    }

    /// Writes the index to a temporary file beside `path`, syncs it and renames it over
    /// `path`, so a crash leaves either the old or the new index.
    fn save(&self, path: &Path) -> Result<(), ImageError> {
        let io_error = |source| ImageError::io("index", path, source);
        let parent = path.parent().unwrap_or(Path::new("."));
        let mut file = tempfile::NamedTempFile::new_in(parent).map_err(io_error)?;
        let text = serde_json::to_vec_pretty(self).expect("index serializes");
        file.write_all(&text).map_err(io_error)?;
        file.as_file().sync_all().map_err(io_error)?;
        file.persist(path).map_err(|error| io_error(error.error))?;
        Ok(())
    }

    pub fn find(&self, query: &str) -> Option<&IndexEntry> {
        self.images.iter().find(|entry| entry.reference == query)
    }

    /// Finds the entries whose digest or ID starts with the hex `prefix`.
    pub fn find_by_digest(&self, prefix: &str) -> Vec<&IndexEntry> {
        let matches = |digest: &str| {
            digest
                .strip_prefix("sha256:")
                .is_some_and(|hex| hex.starts_with(prefix))
        };
        self.images
            .iter()
            .filter(|entry| matches(&entry.digest) || matches(&entry.id))
            .collect()
    }
}

/// The index file and its lock.
#[derive(Debug, Clone)]
pub(crate) struct IndexFile {
    pub path: PathBuf,
    lock_path: PathBuf,
}

impl IndexFile {
    pub fn new(root: &Path) -> Self {
        IndexFile {
            path: root.join("index.json"),
            lock_path: root.join("index.lock"),
        }
    }

    pub fn load(&self) -> Result<Index, ImageError> {
        Index::load(&self.path)
    }

    /// Applies `change` to the index under the writer lock and saves the result.
    pub fn update<T>(
        &self,
        change: impl FnOnce(&mut Index) -> Result<T, ImageError>,
    ) -> Result<T, ImageError> {
        let _lock = FileLock::exclusive(&self.lock_path)
            .map_err(|source| ImageError::io("index", &self.lock_path, source))?;
        let mut index = self.load()?;
        let result = change(&mut index)?;
        index.version = INDEX_VERSION;
        index.save(&self.path)?;
        Ok(result)
    }

    /// Adds `entry`, replacing any entry with the same reference.
    pub fn insert(&self, entry: IndexEntry) -> Result<(), ImageError> {
        self.update(|index| {
            index.images.retain(|old| old.reference != entry.reference);
            index.images.push(entry);
            Ok(())
        })
    }
}

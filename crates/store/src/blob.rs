//! Content-addressed blobs: the [`BlobStore`] trait and its folder implementation.
//!
//! [`FsBlobStore`] keeps each blob at `sha256/<first two hex digits>/<64 hex digits>`. A blob
//! is first written to `tmp/` under a random name while its SHA-256 is computed, then synced
//! and renamed into place, so a blob path either does not exist or contains the complete bytes.
//! `tmp/` is a sibling of `sha256/` rather than the shard folder itself, because the shard is
//! only known once the last byte is hashed. Both sit on one filesystem, so the rename is
//! atomic.

use std::fmt;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{Result, StoreError};
use crate::lock::{self, LockMode};

const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// A SHA-256 digest; displayed and serialised as 64 lowercase hexadecimal digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Hashes `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// Parses 64 hexadecimal digits.
    pub fn from_hex(text: &str) -> Result<Digest> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes)
            .map_err(|_| StoreError::InvalidDigest(text.to_owned()))?;
        Ok(Digest(bytes))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl FromStr for Digest {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<Digest> {
        Digest::from_hex(text)
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Digest::from_hex(&text).map_err(serde::de::Error::custom)
    }
}

/// A stored blob: its digest and its size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub sha256: Digest,
    pub size: u64,
}

/// Content-addressed storage of immutable byte strings.
///
/// Implementations store each distinct content once and never expose a partly written blob.
/// A blob that no metadata row references may be deleted by the owning store's gc at any
/// time, so callers that store a blob for a record must follow the owning store's protocol
/// (see [`LocalStore`](crate::LocalStore) for the local one).
pub trait BlobStore: Send + Sync {
    /// Stores the bytes of `contents` and returns their digest and size.
    ///
    /// Fails with [`StoreError::BlobTooLarge`] once more than `max_size` bytes were read, and
    /// then stores nothing.
    fn put(&self, contents: &mut dyn Read, max_size: u64) -> Result<BlobRef>;

    /// Opens a blob for reading. The reader fails with [`StoreError::CorruptBlob`] (wrapped
    /// in an [`io::Error`] of kind `InvalidData`) at the end if the bytes do not match the
    /// digest.
    fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>>;

    /// Returns the local file of a stored blob, or `None` when the blob is missing or this store
    /// keeps blobs somewhere other than local files.
    fn local_path(&self, digest: &Digest) -> Option<PathBuf>;

    fn exists(&self, digest: &Digest) -> Result<bool>;

    /// Deletes a blob; returns false when there was none.
    fn delete(&self, digest: &Digest) -> Result<bool>;

    /// Lists every stored blob, in no particular order.
    fn list(&self) -> Result<Vec<BlobRef>>;
}

/// Blobs kept as files in a folder; see the module documentation for the layout.
#[derive(Debug)]
pub struct FsBlobStore {
    root: PathBuf,
}

/// Temporary files removed by [`FsBlobStore::sweep_temp_files`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TempSweep {
    pub files: u64,
    pub bytes: u64,
}

impl FsBlobStore {
    /// Opens the blob folder at `root`, creating it when missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<FsBlobStore> {
        let store = FsBlobStore { root: root.into() };
        for dir in [store.sha256_dir(), store.temp_dir()] {
            fs::create_dir_all(&dir).map_err(|source| StoreError::io("create", &dir, source))?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path at which the blob with `digest` is stored, whether or not it exists.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.sha256_dir().join(&hex[..2]).join(hex)
    }

    /// Folder of blobs being written.
    pub fn temp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn sha256_dir(&self) -> PathBuf {
        self.root.join("sha256")
    }

    /// Writes `contents` to a locked temporary file and syncs it, without publishing it.
    ///
    /// `input` names the stream in read errors, for example "artifact 'out.csv'".
    pub(crate) fn stage(
        &self,
        contents: &mut dyn Read,
        max_size: u64,
        input: &str,
    ) -> Result<StagedBlob> {
        let mut staged = self.create_temp()?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; COPY_BUFFER_BYTES];

        loop {
            let count = match contents.read(&mut buffer) {
                Ok(0) => break,
                Ok(count) => count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(StoreError::ReadInput {
                        input: input.to_owned(),
                        source,
                    })
                }
            };
            staged.size += count as u64;
            if staged.size > max_size {
                return Err(StoreError::BlobTooLarge { limit: max_size });
            }
            hasher.update(&buffer[..count]);
            staged
                .file
                .write_all(&buffer[..count])
                .map_err(|source| StoreError::io("write", &staged.temp_path, source))?;
        }

        // The data must be on disk before the rename makes it visible; otherwise a power loss
        // could leave a published blob path with missing bytes.
        staged
            .file
            .sync_all()
            .map_err(|source| StoreError::io("sync", &staged.temp_path, source))?;
        staged.sha256 = Digest(hasher.finalize().into());
        Ok(staged)
    }

    /// Publishes a staged blob under its digest, or drops it when an intact copy exists.
    pub(crate) fn commit(&self, mut staged: StagedBlob) -> Result<BlobRef> {
        let blob = BlobRef {
            sha256: staged.sha256,
            size: staged.size,
        };
        let dest = self.blob_path(&blob.sha256);
        let shard = dest.parent().expect("blob paths have a shard folder");
        fs::create_dir_all(shard).map_err(|source| StoreError::io("create", shard, source))?;

        match fs::metadata(&dest) {
            // Same digest and same size: the content is already stored, so the staged copy is
            // dropped, which deletes its temp file.
            Ok(meta) if meta.len() == blob.size => return Ok(blob),
            Ok(meta) => tracing::warn!(
                path = %dest.display(),
                found_bytes = meta.len(),
                expected_bytes = blob.size,
                "replacing damaged blob"
            ),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::io("inspect", &dest, source)),
        }

        // Blobs are immutable; read-only files guard against tools that edit in place.
        fs::set_permissions(&staged.temp_path, Permissions::from_mode(0o444))
            .map_err(|source| StoreError::io("set permissions of", &staged.temp_path, source))?;
        fs::rename(&staged.temp_path, &dest)
            .map_err(|source| StoreError::io("rename into place", &dest, source))?;
        staged.published = true;
        sync_dir(shard)?;
        Ok(blob)
    }

    /// Deletes temporary files whose writer has ended without publishing them.
    ///
    /// Every writer holds an exclusive `flock` on its temp file until it renames or deletes
    /// it, so a file that can be locked here belongs to a dead or finished writer. Safe to
    /// call while other processes write blobs.
    pub fn sweep_temp_files(&self) -> Result<TempSweep> {
        let dir = self.temp_dir();
        let mut sweep = TempSweep::default();
        let entries = fs::read_dir(&dir).map_err(|source| StoreError::io("list", &dir, source))?;

        for entry in entries {
            let entry = entry.map_err(|source| StoreError::io("list", &dir, source))?;
            let path = entry.path();
            let file = match File::open(&path) {
                Ok(file) => file,
                // Published or swept by someone else between the listing and the open.
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(StoreError::io("open", &path, source)),
            };
            let locked = lock::try_flock(&file, LockMode::Exclusive)
                .map_err(|source| StoreError::io("lock", &path, source))?;
            if !locked || !names_same_file(&path, &file) {
                continue;
            }
            let size = file.metadata().map(|meta| meta.len()).unwrap_or(0);
            match fs::remove_file(&path) {
                Ok(()) => {
                    sweep.files += 1;
                    sweep.bytes += size;
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(StoreError::io("delete", &path, source)),
            }
        }
        Ok(sweep)
    }

    /// Creates a temp file and locks it so that [`Self::sweep_temp_files`] leaves it alone.
    fn create_temp(&self) -> Result<StagedBlob> {
        let dir = self.temp_dir();
        loop {
            let temp_path = dir.join(format!("{}.tmp", ulid::Ulid::new()));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp_path)
                .map_err(|source| StoreError::io("create", &temp_path, source))?;
            lock::lock_file(&file, LockMode::Exclusive)
                .map_err(|source| StoreError::io("lock", &temp_path, source))?;

            // A sweep may have locked and deleted the file between its creation and our lock.
            // Then the path is gone or names another file, and the write starts over.
            if names_same_file(&temp_path, &file) {
                return Ok(StagedBlob {
                    file,
                    temp_path,
                    sha256: Digest([0; 32]),
                    size: 0,
                    published: false,
                });
            }
        }
    }
}

impl BlobStore for FsBlobStore {
    fn put(&self, contents: &mut dyn Read, max_size: u64) -> Result<BlobRef> {
        let staged = self.stage(contents, max_size, "the blob contents")?;
        self.commit(staged)
    }

    fn open(&self, digest: &Digest) -> Result<Box<dyn Read + Send>> {
        let path = self.blob_path(digest);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::BlobNotFound(*digest))
            }
            Err(source) => return Err(StoreError::io("open", &path, source)),
        };
        Ok(Box::new(VerifyingReader {
            file,
            path,
            expected: *digest,
            hasher: Sha256::new(),
            verified: false,
        }))
    }

    fn local_path(&self, digest: &Digest) -> Option<PathBuf> {
        let path = self.blob_path(digest);
        path.is_file().then_some(path)
    }

    fn exists(&self, digest: &Digest) -> Result<bool> {
        let path = self.blob_path(digest);
        path.try_exists()
            .map_err(|source| StoreError::io("inspect", &path, source))
    }

    fn delete(&self, digest: &Digest) -> Result<bool> {
        let path = self.blob_path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StoreError::io("delete", &path, source)),
        }
    }

    fn list(&self) -> Result<Vec<BlobRef>> {
        let mut blobs = Vec::new();
        let sha256_dir = self.sha256_dir();
        for shard in read_dir_paths(&sha256_dir)? {
            if !shard.is_dir() {
                continue;
            }
            for path in read_dir_paths(&shard)? {
                // Anything that is not named by a digest is not a blob of this store.
                let Some(sha256) = path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .and_then(|name| Digest::from_hex(name).ok())
                else {
                    continue;
                };
                let size = match fs::metadata(&path) {
                    Ok(meta) => meta.len(),
                    Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(StoreError::io("inspect", &path, source)),
                };
                blobs.push(BlobRef { sha256, size });
            }
        }
        Ok(blobs)
    }
}

/// A blob written to a locked temp file but not yet published; dropping it deletes the file.
#[derive(Debug)]
pub(crate) struct StagedBlob {
    file: File,
    temp_path: PathBuf,
    sha256: Digest,
    size: u64,
    published: bool,
}

impl Drop for StagedBlob {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        if let Err(error) = fs::remove_file(&self.temp_path) {
            if error.kind() != io::ErrorKind::NotFound {
                tracing::warn!(
                    path = %self.temp_path.display(),
                    %error,
                    "failed to delete temp blob; the next gc removes it"
                );
            }
        }
    }
}

/// Reads a blob file and fails at its end when the bytes do not hash to the expected digest.
struct VerifyingReader {
    file: File,
    path: PathBuf,
    expected: Digest,
    hasher: Sha256,
    verified: bool,
}

impl Read for VerifyingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let count = self.file.read(buf)?;
        if count > 0 {
            self.hasher.update(&buf[..count]);
            return Ok(count);
        }
        if !buf.is_empty() && !self.verified {
            let actual = Digest(self.hasher.finalize_reset().into());
            if actual != self.expected {
                let error = StoreError::CorruptBlob {
                    digest: self.expected,
                    path: self.path.clone(),
                };
                return Err(io::Error::new(io::ErrorKind::InvalidData, error));
            }
            self.verified = true;
        }
        Ok(0)
    }
}

fn names_same_file(path: &Path, file: &File) -> bool {
    match (fs::metadata(path), file.metadata()) {
        (Ok(on_path), Ok(open)) => on_path.dev() == open.dev() && on_path.ino() == open.ino(),
        _ => false,
    }
}

fn read_dir_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir).map_err(|source| StoreError::io("list", dir, source))?;
    entries
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<io::Result<_>>()
        .map_err(|source| StoreError::io("list", dir, source))
}

/// Syncs a folder so that a rename into it survives a power loss.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|source| StoreError::io("sync", dir, source))
}

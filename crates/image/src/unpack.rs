//! Applying layer tars to a directory tree, safely.
//!
//! Layers come from registries and archives that may be hostile, and the unpacking runs as
//! root, so no entry may create or change anything outside the tree. The rules:
//!
//! - Paths are made relative: a leading `/` is dropped, as `tar` does. A path with a `..`
//!   component rejects the layer.
//! - No file operation on the tree follows a symlink. Parent directories are resolved one
//!   component at a time with `lstat`. A symlink met on the way is resolved as if the tree
//!   were the root (`chroot` semantics), so `/lib -> usr/lib` works and a link to `/etc` or
//!   `../..` lands inside the tree. The last component is never followed: an existing entry
//!   there is replaced, not written through.
//! - Hard links point at entries resolved the same way and never at directories.
//! - Character and block devices are skipped, because the guest mounts devtmpfs on `/dev`
//!   and a device node in an image is a way to reach host hardware if the tree is ever
//!   used outside the VM. FIFOs are created.
//! - [`UnpackLimits`] caps the total file bytes and entries of all layers together.
//!
//! Whiteouts follow the OCI image spec: `.wh.<name>` deletes `<name>` from lower layers and
//! `.wh..wh..opq` empties its directory of lower-layer content; neither touches entries of
//! its own layer.

use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::ImageError;

/// Caps on what the layers of one image may unpack to, against decompression bombs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Total bytes of file content across all layers, counted after decompression.
    pub max_bytes: u64,
    /// Total tar entries across all layers.
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    /// 32 GiB and 4 million entries: above the largest common images (CUDA and ML framework
    /// images unpack to roughly 10-20 GB), and low enough to stop a bomb before it fills
    /// a typical disk.
    fn default() -> Self {
        UnpackLimits {
            max_bytes: 32 << 30,
            max_entries: 4_000_000,
        }
    }
}

/// A layer blob to apply.
#[derive(Debug, Clone)]
pub(crate) struct LayerFile {
    pub path: PathBuf,
    /// Digest of the blob as stored, used in messages.
    pub digest: String,
    /// Expected digest of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: Option<String>,
}

/// Symlinks followed while resolving one path before it counts as a loop, as Linux's
/// `MAXSYMLINKS`.
const MAX_SYMLINK_HOPS: u32 = 40;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// Applies layers in order to one tree, keeping the limit counters across layers.
pub(crate) struct Unpacker<'a> {
    reference: &'a str,
    root: PathBuf,
    limits: UnpackLimits,
    bytes: u64,
    entries: u64,
    keep_owner: bool,
}

/// State of the layer being applied.
struct LayerState<'a> {
    digest: &'a str,
    /// Paths (relative to the root, symlinks resolved) created by this layer, with their
    /// ancestors, which whiteouts of the same layer must leave alone.
    touched: HashSet<PathBuf>,
    /// Directory times to set once the layer's entries stop changing them.
    dir_times: Vec<(PathBuf, i64)>,
}

/// Why a path failed to resolve; converted to [`ImageError::HostileLayer`] with context.
enum Resolve {
    Hostile(String),
    Io(PathBuf, io::Error),
}

impl<'a> Unpacker<'a> {
    /// Prepares to unpack into `root`, an existing empty directory.
    pub fn new(reference: &'a str, root: &Path, limits: UnpackLimits) -> Self {
        // SAFETY: geteuid has no preconditions.
        let keep_owner = unsafe { libc::geteuid() } == 0;
        Unpacker {
            reference,
            root: root.to_path_buf(),
            limits,
            bytes: 0,
            entries: 0,
            keep_owner,
        }
    }

    /// Applies one layer blob (uncompressed, gzip or zstd, detected from its first bytes)
    /// and checks its uncompressed digest when one is expected.
    pub fn apply(&mut self, layer: &LayerFile) -> Result<(), ImageError> {
        let file = File::open(&layer.path)
            .map_err(|source| ImageError::io(self.reference, &layer.path, source))?;
        let mut reader = HashingReader::new(
            decompressor(BufReader::new(file))
                .map_err(|source| ImageError::io(self.reference, &layer.path, source))?,
        );
        self.apply_tar(&layer.digest, &mut reader)?;

        // The tar end marker may be followed by padding that the digest also covers.
        io::copy(&mut reader, &mut io::sink())
            .map_err(|source| self.layer_read_error(layer, source))?;
        let actual = format!("sha256:{}", hex::encode(reader.hasher.finalize()));
        if let Some(expected) = &layer.diff_id {
            if *expected != actual {
                return Err(ImageError::DigestMismatch {
                    reference: self.reference.to_string(),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }

    fn layer_read_error(&self, layer: &LayerFile, source: io::Error) -> ImageError {
        if source.kind() == io::ErrorKind::InvalidData || source.kind() == io::ErrorKind::Other {
            return ImageError::InvalidImage {
                reference: self.reference.to_string(),
                reason: format!("layer {} is not a valid tar stream: {source}", layer.digest),
            };
        }
        ImageError::io(self.reference, &layer.path, source)
    }

    fn apply_tar(&mut self, digest: &str, reader: &mut dyn Read) -> Result<(), ImageError> {
        let mut state = LayerState {
            digest,
            touched: HashSet::new(),
            dir_times: Vec::new(),
        };
        let invalid = |error: io::Error| ImageError::InvalidImage {
            reference: self.reference.to_string(),
            reason: format!("layer {digest} is not a valid tar stream: {error}"),
        };
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries().map_err(invalid)? {
            let mut entry = entry.map_err(|error| {
                if crate::error::is_disk_full(&error) {
                    return ImageError::io(self.reference, &self.root, error);
                }
                invalid(error)
            })?;
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(ImageError::UnpackLimit {
                    reference: self.reference.to_string(),
                    limit: format!("{} entries", self.limits.max_entries),
                });
            }
            self.apply_entry(&mut state, &mut entry)?;
        }
        for (path, mtime) in state.dir_times.iter().rev() {
            set_times(&self.root.join(path), *mtime);
        }
        Ok(())
    }

    fn hostile(&self, layer: &str, entry: &Path, reason: impl Into<String>) -> ImageError {
        ImageError::HostileLayer {
            reference: self.reference.to_string(),
            layer: layer.to_string(),
            entry: entry.display().to_string(),
            reason: reason.into(),
        }
    }

    fn resolve_error(&self, layer: &str, entry: &Path, error: Resolve) -> ImageError {
        match error {
            Resolve::Hostile(reason) => self.hostile(layer, entry, reason),
            Resolve::Io(path, source) => ImageError::io(self.reference, path, source),
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        state: &mut LayerState,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), ImageError> {
        let raw_path = entry
            .path()
            .map_err(|error| self.hostile(state.digest, Path::new("?"), error.to_string()))?
            .into_owned();
        let components = relative_components(&raw_path)
            .ok_or_else(|| self.hostile(state.digest, &raw_path, "contains a '..' component"))?;
        let Some((name, parents)) = components.split_last() else {
            // The root directory itself: its metadata stays as the tree was created.
            return Ok(());
        };

        let name_text = name.to_string_lossy();
        if let Some(hidden) = name_text.strip_prefix(WHITEOUT_PREFIX) {
            return self.apply_whiteout(state, &raw_path, parents, name, hidden);
        }

        let entry_type = entry.header().entry_type();
        if matches!(entry_type, EntryType::Char | EntryType::Block) {
            tracing::debug!(entry = %raw_path.display(), "Skipped device node in layer");
            return Ok(());
        }
        if matches!(entry_type, EntryType::XGlobalHeader | EntryType::XHeader) {
            return Ok(());
        }

        let parent = self
            .resolve_dir(parents, true, &mut state.touched)
            .map_err(|error| self.resolve_error(state.digest, &raw_path, error))?
            .expect("parents are created");
        let relative = parent.join(name);
        let target = self.root.join(&relative);
        let is_dir = entry_type == EntryType::Directory;
        self.clear_target(&target, is_dir)?;

        match entry_type {
            EntryType::Directory => self.create_dir(&target)?,
            EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|error| self.hostile(state.digest, &raw_path, error.to_string()))?
                    .ok_or_else(|| {
                        self.hostile(state.digest, &raw_path, "is a symlink without target")
                    })?;
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(|source| ImageError::io(self.reference, &target, source))?;
            }
            EntryType::Link => {
                self.create_hard_link(state, entry, &raw_path, &target)?;
                // A hard link shares the inode, whose metadata its first name set.
                mark_touched(&mut state.touched, relative);
                return Ok(());
            }
            EntryType::Fifo => make_fifo(&target)
                .map_err(|source| ImageError::io(self.reference, &target, source))?,
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.write_file(entry, &target)?
            }
            other => {
                tracing::debug!(entry = %raw_path.display(), kind = ?other,
                    "Skipped unsupported tar entry type");
                return Ok(());
            }
        }

        self.set_metadata(entry, &target, entry_type == EntryType::Symlink)?;
        let mtime = entry.header().mtime().unwrap_or(0) as i64;
        if is_dir {
            state.dir_times.push((relative.clone(), mtime));
        } else {
            set_times(&target, mtime);
        }
        mark_touched(&mut state.touched, relative);
        Ok(())
    }

    /// Resolves parent components inside the root, returning the path relative to the root
    /// with every symlink replaced. Missing directories are created (mode 0755, as Docker
    /// does) when `create` is set; otherwise a missing one gives `None`.
    fn resolve_dir(
        &self,
        components: &[OsString],
        create: bool,
        touched: &mut HashSet<PathBuf>,
    ) -> Result<Option<PathBuf>, Resolve> {
        let mut resolved = PathBuf::new();
        let mut pending: Vec<OsString> = components.iter().rev().cloned().collect();
        let mut hops = 0;
        while let Some(component) = pending.pop() {
            if component == ".." {
                resolved.pop();
                continue;
            }
            if component.is_empty() || component == "." {
                continue;
            }
            let candidate = resolved.join(&component);
            let host_path = self.root.join(&candidate);
            match fs::symlink_metadata(&host_path) {
                Ok(metadata) if metadata.is_dir() => resolved = candidate,
                Ok(metadata) if metadata.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(Resolve::Hostile("passes through a symlink loop".into()));
                    }
                    let link = fs::read_link(&host_path).map_err(|e| Resolve::Io(host_path, e))?;
                    if link.is_absolute() {
                        resolved = PathBuf::new();
                    }
                    let parts = link.components().filter_map(|part| match part {
                        Component::Normal(name) => Some(name.to_os_string()),
                        Component::ParentDir => Some(OsString::from("..")),
                        _ => None,
                    });
                    let parts: Vec<OsString> = parts.collect();
                    pending.extend(parts.into_iter().rev());
                }
                Ok(_) => {
                    return Err(Resolve::Hostile(format!(
                        "has a parent '{}' that is not a directory",
                        candidate.display()
                    )))
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&host_path)
                        .and_then(|()| {
                            fs::set_permissions(&host_path, fs::Permissions::from_mode(0o755))
                        })
                        .map_err(|e| Resolve::Io(host_path, e))?;
                    mark_touched(touched, candidate.clone());
                    resolved = candidate;
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(error) => return Err(Resolve::Io(host_path, error)),
            }
        }
        Ok(Some(resolved))
    }

    /// Removes whatever sits at `target` unless both it and the new entry are directories,
    /// which merge. Never follows a symlink at `target`.
    fn clear_target(&self, target: &Path, new_is_dir: bool) -> Result<(), ImageError> {
        let metadata = match fs::symlink_metadata(target) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(ImageError::io(self.reference, target, source)),
        };
        if metadata.is_dir() && new_is_dir {
            return Ok(());
        }
        remove_any(target, metadata.is_dir())
            .map_err(|source| ImageError::io(self.reference, target, source))
    }

    fn create_dir(&self, target: &Path) -> Result<(), ImageError> {
        match fs::create_dir(target) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(source) => Err(ImageError::io(self.reference, target, source)),
        }
    }

    fn create_hard_link<R: Read>(
        &self,
        state: &mut LayerState,
        entry: &tar::Entry<'_, R>,
        raw_path: &Path,
        target: &Path,
    ) -> Result<(), ImageError> {
        let link = entry
            .link_name()
            .map_err(|error| self.hostile(state.digest, raw_path, error.to_string()))?
            .ok_or_else(|| self.hostile(state.digest, raw_path, "is a hard link without target"))?
            .into_owned();
        let components = relative_components(&link).ok_or_else(|| {
            self.hostile(state.digest, raw_path, "is a hard link to a path with '..'")
        })?;
        let Some((name, parents)) = components.split_last() else {
            return Err(self.hostile(
                state.digest,
                raw_path,
                "is a hard link to the root directory",
            ));
        };
        let missing = || self.hostile(state.digest, raw_path, "is a hard link to a missing entry");
        let parent = self
            .resolve_dir(parents, false, &mut state.touched)
            .map_err(|error| self.resolve_error(state.digest, raw_path, error))?
            .ok_or_else(missing)?;
        let source = self.root.join(parent).join(name);
        match fs::symlink_metadata(&source) {
            Ok(metadata) if metadata.is_dir() => {
                return Err(self.hostile(state.digest, raw_path, "is a hard link to a directory"))
            }
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(missing()),
            Err(error) => return Err(ImageError::io(self.reference, &source, error)),
        }
        if source == target {
            return Ok(());
        }
        // link(2) does not follow a symlink at `source`: it links the symlink itself.
        fs::hard_link(&source, target)
            .map_err(|error| ImageError::io(self.reference, target, error))
    }

    fn write_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        target: &Path,
    ) -> Result<(), ImageError> {
        let io_error = |source| ImageError::io(self.reference, target, source);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(target)
            .map_err(io_error)?;
        let mut buffer = vec![0; 128 << 10];
        loop {
            let count = entry
                .read(&mut buffer)
                .map_err(|error| ImageError::InvalidImage {
                    reference: self.reference.to_string(),
                    reason: format!("reading {} failed: {error}", target.display()),
                })?;
            if count == 0 {
                break;
            }
            self.bytes += count as u64;
            if self.bytes > self.limits.max_bytes {
                return Err(ImageError::UnpackLimit {
                    reference: self.reference.to_string(),
                    limit: format!("{} bytes", self.limits.max_bytes),
                });
            }
            file.write_all(&buffer[..count]).map_err(io_error)?;
        }
        Ok(())
    }

    /// Sets ownership, then mode (chown clears set-id bits), then xattrs, on `target`
    /// without following it.
    fn set_metadata<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        target: &Path,
        is_symlink: bool,
    ) -> Result<(), ImageError> {
        let header = entry.header();
        let c_path = CString::new(target.as_os_str().as_bytes()).expect("paths have no NUL");
        if self.keep_owner {
            let uid = header.uid().unwrap_or(0) as libc::uid_t;
            let gid = header.gid().unwrap_or(0) as libc::gid_t;
            // SAFETY: c_path is a valid NUL-terminated string for the duration of the call.
            if unsafe { libc::lchown(c_path.as_ptr(), uid, gid) } != 0 {
                let source = io::Error::last_os_error();
                return Err(ImageError::io(self.reference, target, source));
            }
        }
        if !is_symlink {
            let mode = header.mode().unwrap_or(0o644) & 0o7777;
            fs::set_permissions(target, fs::Permissions::from_mode(mode))
                .map_err(|source| ImageError::io(self.reference, target, source))?;
        }
        if let Ok(Some(extensions)) = entry.pax_extensions() {
            for extension in extensions.flatten() {
                let Some(name) = extension.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                    continue;
                };
                set_xattr(&c_path, name, extension.value_bytes(), target);
            }
        }
        Ok(())
    }

    fn apply_whiteout(
        &mut self,
        state: &mut LayerState,
        raw_path: &Path,
        parents: &[OsString],
        name: &OsStr,
        hidden: &str,
    ) -> Result<(), ImageError> {
        let parent = self
            .resolve_dir(parents, false, &mut state.touched)
            .map_err(|error| self.resolve_error(state.digest, raw_path, error))?;
        let Some(parent) = parent else {
            return Ok(());
        };
        if name == OPAQUE_WHITEOUT {
            return self.empty_opaque_dir(state, &parent);
        }
        if hidden.starts_with(WHITEOUT_PREFIX) {
            // Other `.wh..wh.` names are AUFS bookkeeping, not whiteouts.
            return Ok(());
        }
        if hidden.is_empty() || hidden == "." || hidden == ".." || hidden.contains('/') {
            return Err(self.hostile(state.digest, raw_path, "is a whiteout of an invalid name"));
        }
        let relative = parent.join(hidden);
        if state.touched.contains(&relative) {
            return Ok(());
        }
        let target = self.root.join(&relative);
        match fs::symlink_metadata(&target) {
            Ok(metadata) => remove_any(&target, metadata.is_dir())
                .map_err(|source| ImageError::io(self.reference, &target, source)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ImageError::io(self.reference, &target, source)),
        }
    }

    fn empty_opaque_dir(&self, state: &LayerState, dir: &Path) -> Result<(), ImageError> {
        let host_dir = self.root.join(dir);
        let io_error = |source| ImageError::io(self.reference, &host_dir, source);
        for child in fs::read_dir(&host_dir).map_err(io_error)? {
            let child = child.map_err(io_error)?;
            let relative = dir.join(child.file_name());
            if state.touched.contains(&relative) {
                continue;
            }
            let is_dir = child.file_type().map_err(io_error)?.is_dir();
            remove_any(&child.path(), is_dir)
                .map_err(|source| ImageError::io(self.reference, child.path(), source))?;
        }
        Ok(())
    }
}

/// Splits a tar path into normal components, dropping `/` and `.`. Returns `None` when a
/// `..` component appears anywhere, because a layer has no reason to contain one.
fn relative_components(path: &Path) -> Option<Vec<OsString>> {
    let mut components = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => components.push(name.to_os_string()),
            Component::ParentDir => return None,
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(components)
}

/// Records `relative` and its ancestors as created by the current layer.
fn mark_touched(touched: &mut HashSet<PathBuf>, relative: PathBuf) {
    let mut current = relative;
    while !current.as_os_str().is_empty() && touched.insert(current.clone()) {
        current.pop();
    }
}

fn remove_any(path: &Path, is_dir: bool) -> io::Result<()> {
    // remove_dir_all does not follow symlinks inside the directory.
    if is_dir {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

fn make_fifo(path: &Path) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes()).expect("paths have no NUL");
    // SAFETY: c_path is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets an xattr on a path without following it. File systems that reject the name (no
/// `security.*` support, no user xattrs on tmpfs) only lose the attribute, logged, because
/// the image stays usable without it.
fn set_xattr(c_path: &CString, name: &[u8], value: &[u8], target: &Path) {
    let Ok(c_name) = CString::new(name) else {
        return;
    };
    // SAFETY: both strings are NUL-terminated and value points to value.len() bytes.
    let result = unsafe {
        libc::lsetxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if result != 0 {
        let error = io::Error::last_os_error();
        tracing::debug!(path = %target.display(), name = %String::from_utf8_lossy(name),
            %error, "Skipped xattr the file system rejected");
    }
}

/// Sets access and modification time of a path without following it. Times are cosmetic
/// in a sandbox, so a failure is ignored.
fn set_times(path: &Path, mtime: i64) {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    let time = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    let times = [time, time];
    // SAFETY: c_path is NUL-terminated and times points to two timespec values.
    unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        );
    }
}

/// Wraps a layer stream in the decompressor its magic number calls for.
fn decompressor<R: BufRead + 'static>(mut reader: R) -> io::Result<Box<dyn Read>> {
    const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
    const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
    let head = reader.fill_buf()?;
    if head.starts_with(GZIP_MAGIC) {
        return Ok(Box::new(flate2::read::MultiGzDecoder::new(reader)));
    }
    if head.starts_with(ZSTD_MAGIC) {
        return Ok(Box::new(zstd::stream::read::Decoder::with_buffer(reader)?));
    }
    Ok(Box::new(reader))
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let count = self.inner.read(buffer)?;
        self.hasher.update(&buffer[..count]);
        Ok(count)
    }
}

//! Snapshot start: boot an image once, save the booted VM, and restore
//! every later sandbox of that image and shape from the snapshot.
//!
//! A snapshot lives in `<data>/snapshots/<key>/`, where the key hashes
//! everything the saved guest depends on: the kernel, the initramfs (and so
//! the agent), the image root, the VM shape and the VMM build. A change to
//! any of them gives a new key, so a stale snapshot is never used; the new
//! one replaces it on first use. A snapshot is written into a temporary
//! folder and renamed into place, so readers see complete snapshots only.
//! A snapshot that fails to restore is removed and the sandbox boots
//! instead, with a warning: snapshots only ever make starts faster.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use upstream_protocol::Hello;

use crate::backend::BackendKind;
use crate::runtime::Runtime;
use crate::sandbox::{Launch, Sandbox, SandboxSpec};
use crate::{Error, Result};

/// Version of the snapshot folder layout; part of every key.
const FORMAT: u32 = 1;

const METADATA_FILE: &str = "snapshot.json";

/// Everything a saved guest depends on. Two sandboxes with equal inputs
/// can be restored from the same snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInputs {
    pub format: u32,
    /// The backend and the VMM build that saved the snapshot.
    pub vmm: String,
    pub kernel_sha256: String,
    /// Hash of the initramfs, which contains the guest agent.
    pub initramfs_sha256: String,
    /// The image root file system, canonical. The image cache names it by
    /// the image's digest.
    pub root_disk: PathBuf,
    /// Inode, size and modification time of the image root, so a rebuilt
    /// file at the same path is a different input.
    pub root_disk_version: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
}

impl SnapshotInputs {
    /// Collects the inputs of a sandbox of `spec` on `runtime`.
    pub fn of(runtime: &Runtime, spec: &SandboxSpec) -> Result<Self> {
        let hashes = runtime.data.snapshots().join("hashes");
        let root_disk = spec
            .root_disk
            .canonicalize()
            .map_err(Error::io(format!("resolving {}", spec.root_disk.display())))?;
        let meta = fs::metadata(&root_disk)
            .map_err(Error::io(format!("reading {}", root_disk.display())))?;
        Ok(Self {
            format: FORMAT,
            vmm: runtime.backend.snapshot_tag(),
            kernel_sha256: file_sha256(&hashes, &runtime.kernel)?,
            initramfs_sha256: file_sha256(&hashes, &runtime.initramfs)?,
            root_disk,
            root_disk_version: format!("{}:{}:{}", meta.ino(), meta.size(), mtime_ns(&meta)),
            vcpus: spec.limits.vcpus,
            memory_mib: spec.limits.memory_mib,
            disk_mib: spec.limits.disk_mib,
        })
    }

    /// The folder name of the snapshot: 32 hex digits of a hash of the
    /// inputs.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("snapshot inputs serialize");
        hex::encode(&Sha256::digest(json)[..16])
    }

    /// Whether a snapshot with `other` inputs is an older version of this
    /// one: same image root and shape, something else changed.
    fn supersedes(&self, other: &Self) -> bool {
        self != other
            && self.root_disk == other.root_disk
            && (self.vcpus, self.memory_mib, self.disk_mib)
                == (other.vcpus, other.memory_mib, other.disk_mib)
    }
}

/// `snapshot.json`: the inputs a snapshot was saved with, and the agent's
/// hello, which a restored guest does not send again.
#[derive(Debug, Serialize, Deserialize)]
struct Metadata {
    inputs: SnapshotInputs,
    hello: Hello,
}

/// Modification time in nanoseconds since the epoch.
fn mtime_ns(meta: &fs::Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

/// Creates a sandbox from the snapshot of its image and shape, saving the
/// snapshot first when there is none. Any snapshot problem falls back to a
/// cold boot with a warning.
pub(crate) async fn start(runtime: &Runtime, spec: SandboxSpec) -> Result<Sandbox> {
    // NOTE: Firecracker resets the guest's vsock connections when it saves
    // a snapshot, and the guest agent does not dial the host again yet, so
    // a restored Firecracker guest never answers. Until the agent redials,
    // Firecracker sandboxes boot.
    if runtime.backend.kind() == BackendKind::Firecracker {
        return Sandbox::boot(runtime, spec).await;
    }
    let inputs = match SnapshotInputs::of(runtime, &spec) {
        Ok(inputs) => inputs,
        Err(err) => {
            tracing::warn!(error = %err, "cannot identify the snapshot; booting instead");
            return Sandbox::boot(runtime, spec).await;
        }
    };
    let dir = runtime.data.snapshots().join(inputs.key());

    let hello = match read_metadata(&dir, &inputs) {
        Ok(Some(hello)) => hello,
        Ok(None) => match save(runtime, &spec, &inputs, &dir).await {
            Ok(Some(hello)) => hello,
            Ok(None) => return Sandbox::boot(runtime, spec).await,
            Err(err) => {
                tracing::warn!(error = %err, "saving a snapshot failed; booting instead");
                return Sandbox::boot(runtime, spec).await;
            }
        },
        Err(err) => {
            tracing::warn!(error = %err, "discarding a snapshot and booting instead");
            remove_snapshot(&dir);
            return Sandbox::boot(runtime, spec).await;
        }
    };

    let launch = Launch::Restore {
        dir: &dir,
        hello: Box::new(hello),
    };
    match Sandbox::launch(runtime, spec.clone(), launch).await {
        Ok(sandbox) => Ok(sandbox),
        Err(err) => {
            tracing::warn!(
                snapshot = %dir.display(),
                error = %err,
                "restoring from a snapshot failed; removed it and booting instead"
            );
            remove_snapshot(&dir);
            Sandbox::boot(runtime, spec).await
        }
    }
}

/// Reads the hello recorded in the snapshot at `dir`: `None` when there is
/// no snapshot, an error when it is unreadable or saved from other inputs.
fn read_metadata(dir: &Path, inputs: &SnapshotInputs) -> Result<Option<Hello>> {
    let path = dir.join(METADATA_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound && !dir.exists() => return Ok(None),
        Err(err) => {
            return Err(invalid(
                dir,
                format!("reading {METADATA_FILE} failed: {err}"),
            ));
        }
    };
    let metadata: Metadata = serde_json::from_slice(&bytes)
        .map_err(|err| invalid(dir, format!("{METADATA_FILE} is invalid: {err}")))?;
    if metadata.inputs != *inputs {
        return Err(invalid(dir, "it was saved from other inputs".into()));
    }
    Ok(Some(metadata.hello))
}

fn invalid(dir: &Path, reason: String) -> Error {
    Error::SnapshotInvalid {
        dir: dir.to_path_buf(),
        reason,
    }
}

/// Boots a sandbox, saves it as the snapshot `dir` and returns its hello.
/// Returns `None` when another process is saving the same snapshot: the
/// caller then boots rather than waits.
async fn save(
    runtime: &Runtime,
    spec: &SandboxSpec,
    inputs: &SnapshotInputs,
    dir: &Path,
) -> Result<Option<Hello>> {
    let root = runtime.data.snapshots();
    fs::create_dir_all(&root).map_err(Error::io(format!("creating {}", root.display())))?;
    let key = inputs.key();
    let Some(_lock) = try_lock(&root.join(format!("{key}.lock")))? else {
        tracing::debug!(%key, "another process is saving this snapshot");
        return Ok(None);
    };
    // The lock holder may have finished between our check and our lock.
    if let Ok(Some(hello)) = read_metadata(dir, inputs) {
        return Ok(Some(hello));
    }

    let temp = root.join(format!(".tmp-{key}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&temp);
    fs::create_dir_all(&temp).map_err(Error::io(format!("creating {}", temp.display())))?;
    let saved = save_into(runtime, spec, inputs, &temp).await;
    let hello = match saved {
        Ok(hello) => hello,
        Err(err) => {
            let _ = fs::remove_dir_all(&temp);
            return Err(err);
        }
    };
    // A stale folder under the same key (from an interrupted removal)
    // would make the rename fail.
    remove_snapshot(dir);
    if let Err(err) = fs::rename(&temp, dir) {
        let _ = fs::remove_dir_all(&temp);
        return Err(Error::io(format!(
            "renaming {} to {}",
            temp.display(),
            dir.display()
        ))(err));
    }
    remove_superseded(&root, inputs);
    Ok(Some(hello))
}

async fn save_into(
    runtime: &Runtime,
    spec: &SandboxSpec,
    inputs: &SnapshotInputs,
    temp: &Path,
) -> Result<Hello> {
    let started = std::time::Instant::now();
    let launch = Launch::Boot {
        memory_file: Some(temp.join("memory")),
    };
    let mut sandbox = Sandbox::launch(runtime, spec.clone(), launch).await?;
    // Programs started once before saving stay in the guest's page cache, which the
    // snapshot keeps, so a restored sandbox's first shell or command reads no disk.
    // Images without a shell fail this harmlessly.
    if let Err(err) = sandbox
        .run_to_end(&["/bin/sh", "-c", "bash -c true 2>/dev/null; true"])
        .await
    {
        tracing::debug!(error = %err, "warming the guest before a snapshot failed");
    }
    // The agent must be idle in its request loop when the guest stops, so
    // nothing is half-sent in either direction.
    sandbox.agent().ping().await?;
    let hello = sandbox.agent().hello().clone();
    runtime
        .backend
        .save_snapshot(sandbox.process_mut(), temp)
        .await?;
    sandbox.destroy().await;

    let metadata = Metadata {
        inputs: inputs.clone(),
        hello: hello.clone(),
    };
    let json = serde_json::to_vec_pretty(&metadata).expect("snapshot metadata serializes");
    let path = temp.join(METADATA_FILE);
    let mut file =
        File::create(&path).map_err(Error::io(format!("creating {}", path.display())))?;
    file.write_all(&json)
        .and_then(|()| file.sync_all())
        .map_err(Error::io(format!("writing {}", path.display())))?;
    tracing::info!(
        key = %inputs.key(),
        image = %inputs.root_disk.display(),
        save_ms = started.elapsed().as_millis() as u64,
        "saved a snapshot"
    );
    Ok(hello)
}

/// Removes the snapshots that `current` replaces.
fn remove_superseded(root: &Path, current: &SnapshotInputs) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(bytes) = fs::read(dir.join(METADATA_FILE)) else {
            continue;
        };
        let Ok(metadata) = serde_json::from_slice::<Metadata>(&bytes) else {
            continue;
        };
        if current.supersedes(&metadata.inputs) {
            tracing::info!(snapshot = %dir.display(), "removing a superseded snapshot");
            remove_snapshot(&dir);
        }
    }
}

/// Removes a snapshot folder. Clones that map its memory file keep their
/// mapping, because the file lives on until they exit.
fn remove_snapshot(dir: &Path) {
    // Renaming first makes the removal atomic for readers.
    let doomed = dir.with_extension(format!("removing-{}", std::process::id()));
    if fs::rename(dir, &doomed).is_ok() {
        let _ = fs::remove_dir_all(&doomed);
    }
}

/// Takes an exclusive lock on `path` without waiting; `None` if another
/// process holds it. The lock ends when the file is closed.
fn try_lock(path: &Path) -> Result<Option<File>> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(Error::io(format!("opening {}", path.display())))?;
    // SAFETY: flock takes a descriptor owned by `file`.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(file));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(Error::io(format!("locking {}", path.display()))(err))
    }
}

/// SHA-256 of a file, remembered in `cache` by the file's identity (device,
/// inode, size, modification time), so a multi-MiB kernel is hashed once
/// and not on every sandbox start.
fn file_sha256(cache: &Path, path: &Path) -> Result<String> {
    let meta = fs::metadata(path).map_err(Error::io(format!("reading {}", path.display())))?;
    let identity = format!(
        "{}:{}:{}:{}:{}",
        path.display(),
        meta.dev(),
        meta.ino(),
        meta.size(),
        mtime_ns(&meta)
    );
    let cached = cache.join(hex::encode(&Sha256::digest(identity.as_bytes())[..16]));
    if let Ok(hash) = fs::read_to_string(&cached) {
        if hash.len() == 64 {
            return Ok(hash);
        }
    }

    let mut file = File::open(path).map_err(Error::io(format!("reading {}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(Error::io(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hash = hex::encode(hasher.finalize());
    // The cache is an optimisation: failing to write it costs only time.
    let _ = fs::create_dir_all(cache);
    let temp = cached.with_extension(format!("tmp-{}", std::process::id()));
    if fs::write(&temp, &hash).is_ok() {
        let _ = fs::rename(&temp, &cached);
    }
    Ok(hash)
}

/// Host entropy for a restored guest's RNG.
pub(crate) fn host_entropy() -> Result<Vec<u8>> {
    let mut bytes = vec![0u8; 64];
    File::open("/dev/urandom")
        .and_then(|mut file| file.read_exact(&mut bytes))
        .map_err(Error::io("reading /dev/urandom"))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> SnapshotInputs {
        SnapshotInputs {
            format: FORMAT,
            vmm: "qemu:/usr/bin/qemu-system-x86_64:1:2".into(),
            kernel_sha256: "k".repeat(64),
            initramfs_sha256: "i".repeat(64),
            root_disk: "/data/images/rootfs/abc.ext4".into(),
            root_disk_version: "1:2:3".into(),
            vcpus: 1,
            memory_mib: 256,
            disk_mib: 256,
        }
    }

    #[test]
    fn key_changes_with_each_input() {
        let base = inputs();
        let changes: [fn(&mut SnapshotInputs); 6] = [
            |i| i.vmm.push('x'),
            |i| i.kernel_sha256 = "0".repeat(64),
            |i| i.initramfs_sha256 = "0".repeat(64),
            |i| i.root_disk_version = "1:2:4".into(),
            |i| i.memory_mib = 512,
            |i| i.disk_mib = 512,
        ];
        for change in changes {
            let mut other = base.clone();
            change(&mut other);
            assert_ne!(base.key(), other.key(), "{other:?}");
        }
    }

    #[test]
    fn new_kernel_supersedes_old_snapshot() {
        let old = inputs();
        let mut new = old.clone();
        new.kernel_sha256 = "0".repeat(64);

        assert!(new.supersedes(&old));
        assert!(!new.supersedes(&new.clone()));
    }

    #[test]
    fn other_shape_is_not_superseded() {
        let old = inputs();
        let mut new = old.clone();
        new.memory_mib = 512;

        assert!(!new.supersedes(&old));
    }

    #[test]
    fn file_hash_is_cached_by_identity() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kernel");
        fs::write(&file, b"one").unwrap();
        let cache = dir.path().join("hashes");

        let first = file_sha256(&cache, &file).unwrap();
        assert_eq!(first, hex::encode(Sha256::digest(b"one")));
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 1);

        fs::write(&file, b"two, longer").unwrap();
        let second = file_sha256(&cache, &file).unwrap();
        assert_eq!(second, hex::encode(Sha256::digest(b"two, longer")));
    }

    #[test]
    fn second_lock_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.lock");

        let first = try_lock(&path).unwrap();
        assert!(first.is_some());
        assert!(try_lock(&path).unwrap().is_none());
        drop(first);
        assert!(try_lock(&path).unwrap().is_some());
    }
}

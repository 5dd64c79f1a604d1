//! Snapshots of QEMU VMs through migration to a file.
//!
//! The guest's memory lives in a file (`memory-backend-file,share=on`)
//! while the snapshot's VM runs, so its pages are already on disk when it
//! stops. Migration with the `x-ignore-shared` capability then writes only
//! the device state (tens of KiB). A restoring QEMU maps the same file with
//! `share=off`, that is MAP_PRIVATE: every clone reads the snapshot's pages
//! from the page cache and its writes stay private to it. Disks are outside
//! the migration stream: the snapshot keeps a copy of the scratch disk, and
//! each clone gets its own copy of that; the image root is shared
//! read-only. Checked with QEMU 7.2, which has no `file:` migration URI, so
//! the stream goes through `exec:cat`.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::process::Command;

use crate::backend::{VmProcess, VmSpec};
use crate::qemu::VmFiles;
use crate::qmp::Qmp;
use crate::{Error, Result};

/// The device state written by migration.
pub const STATE_FILE: &str = "state";
/// Guest memory at the time of the snapshot.
pub const MEMORY_FILE: &str = "memory";
/// The scratch disk at the time of the snapshot.
pub const SCRATCH_FILE: &str = "scratch.ext4";

/// How long QEMU may take to open its QMP socket.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long writing or loading the device state may take. It is tens of
/// KiB, written in about 20 ms under TCG.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Backs guest memory with `file`: shared while a snapshot's VM runs, so
/// its pages land in the file, or private when a clone maps it.
pub fn add_memory_file(command: &mut Command, memory_mib: u32, file: &Path, shared: bool) {
    let share = if shared { "on" } else { "off" };
    command
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=mem,size={memory_mib}M,mem-path={},share={share}",
            escape_option(file)
        ))
        // A second -machine merges into the first one.
        .args(["-machine", "memory-backend=mem"]);
}

/// Doubles commas, which QEMU's option syntax reads as separators.
fn escape_option(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// The identity of a QEMU binary: its path, size and modification time.
pub fn binary_tag(binary: &Path) -> String {
    let (size, modified) = match std::fs::metadata(binary) {
        Ok(meta) => (meta.len(), meta.modified().ok()),
        Err(_) => (0, None),
    };
    let modified = modified
        .and_then(|time| time.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |age| age.as_nanos());
    format!("qemu:{}:{size}:{modified}", binary.display())
}

/// Checks that `dir` has every file of a QEMU snapshot.
pub fn check_files(dir: &Path) -> Result<()> {
    for name in [STATE_FILE, MEMORY_FILE, SCRATCH_FILE] {
        if !dir.join(name).is_file() {
            return Err(Error::SnapshotInvalid {
                dir: dir.to_path_buf(),
                reason: format!("{name} is missing"),
            });
        }
    }
    Ok(())
}

/// Writes the snapshot of `vm` into `dir` and destroys the VM.
pub async fn save(vm: &mut dyn VmProcess, files: &VmFiles, dir: &Path) -> Result<()> {
    let memory = files
        .memory_file
        .as_ref()
        .ok_or_else(|| Error::SnapshotInvalid {
            dir: dir.to_path_buf(),
            reason: "the VM was started without a memory file".into(),
        })?;
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    let state = dir.join(STATE_FILE);
    let uri = format!("exec:cat > {}", shell_quote(&state)?);

    let mut qmp = Qmp::connect(&files.run_dir.join("qmp.sock"), QMP_TIMEOUT).await?;
    qmp.execute("migrate-set-capabilities", ignore_shared())
        .await?;
    qmp.execute("migrate", json!({ "uri": uri })).await?;
    qmp.wait_for_migration(MIGRATION_TIMEOUT).await?;
    // Migration leaves the guest stopped; ending QEMU now means nothing
    // writes to the memory file or the scratch disk any more.
    vm.destroy().await;

    let saved_memory = dir.join(MEMORY_FILE);
    if *memory != saved_memory {
        crate::disk::move_file(memory, &saved_memory)?;
    }
    crate::disk::copy_sparse(&files.scratch_disk, &dir.join(SCRATCH_FILE))
}

/// Loads the device state of the snapshot in `dir` into a QEMU started
/// with `-incoming defer`, and waits until the guest runs.
pub async fn load_state(spec: &VmSpec, dir: &Path) -> Result<()> {
    let uri = format!("exec:cat {}", shell_quote(&dir.join(STATE_FILE))?);
    let mut qmp = Qmp::connect(&spec.socket_path("qmp.sock"), QMP_TIMEOUT).await?;
    qmp.execute("migrate-set-capabilities", ignore_shared())
        .await?;
    qmp.execute("migrate-incoming", json!({ "uri": uri }))
        .await?;
    qmp.wait_until_running(MIGRATION_TIMEOUT).await
}

/// Leaves RAM backed by a shared file out of the migration stream; both
/// sides must set it, because it also changes the stream's format.
fn ignore_shared() -> serde_json::Value {
    json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
}

/// Quotes a path for the shell that QEMU runs `exec:` commands with.
fn shell_quote(path: &Path) -> Result<String> {
    let text = path.display().to_string();
    if text.contains('\'') {
        return Err(Error::SnapshotInvalid {
            dir: path.to_path_buf(),
            reason: "the path contains a single quote; set UPSTREAM_HOME to a plain path".into(),
        });
    }
    Ok(format!("'{text}'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_in_paths_are_doubled() {
        assert_eq!(escape_option(Path::new("/a,b/m")), "/a,,b/m");
    }

    #[test]
    fn quoted_paths_reject_single_quotes() {
        assert_eq!(shell_quote(Path::new("/a b/s")).unwrap(), "'/a b/s'");
        assert!(shell_quote(Path::new("/a'b/s")).is_err());
    }

    #[test]
    fn missing_state_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MEMORY_FILE), b"m").unwrap();
        std::fs::write(dir.path().join(SCRATCH_FILE), b"s").unwrap();

        let err = check_files(dir.path()).unwrap_err().to_string();

        assert!(err.contains("state is missing"), "{err}");
    }
}

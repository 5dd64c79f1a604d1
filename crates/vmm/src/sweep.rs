//! Finding and removing what a dead upstream process left behind.
//!
//! Every sandbox's run folder records its owner (pid and process start
//! time, so a reused pid is not mistaken for the owner) and its VMM's pid.
//! A folder whose owner is gone is swept: its VMM is killed if it still
//! runs, the sandbox's network namespace is removed, and the folder is
//! deleted.

use std::fs;
use std::path::Path;

use crate::host::process_alive;
use crate::net::netns;

/// Identifies the current process across pid reuse.
pub fn owner_record() -> String {
    let pid = std::process::id();
    format!("{pid} {}", start_time(pid).unwrap_or(0))
}

/// Start time of a process in clock ticks after boot (field 22 of
/// `/proc/PID/stat`).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; the fields after it do not.
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

fn owner_alive(record: &str) -> bool {
    let mut fields = record.split_whitespace();
    let pid: Option<u32> = fields.next().and_then(|f| f.parse().ok());
    let started: Option<u64> = fields.next().and_then(|f| f.parse().ok());
    match (pid, started) {
        (Some(pid), Some(started)) => process_alive(pid) && start_time(pid) == Some(started),
        _ => false,
    }
}

/// What a sweep removed.
#[derive(Debug, Default)]
pub struct SweepReport {
    pub folders: usize,
    pub vmms_killed: usize,
}

/// Sweeps every run folder under `run_root` whose owner is gone.
pub fn sweep(run_root: &Path) -> SweepReport {
    let mut report = SweepReport::default();
    let Ok(entries) = fs::read_dir(run_root) else {
        return report;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let owner = fs::read_to_string(dir.join("owner")).unwrap_or_default();
        if owner_alive(&owner) {
            continue;
        }
        // A folder being created has no owner file for a moment; leave
        // folders younger than a minute alone.
        if owner.is_empty() && is_recent(&dir) {
            continue;
        }
        if kill_vmm(&dir) {
            report.vmms_killed += 1;
        }
        remove_netns(&dir);
        if fs::remove_dir_all(&dir).is_ok() {
            report.folders += 1;
            tracing::info!(dir = %dir.display(), "removed a stale sandbox folder");
        }
    }
    report
}

/// Removes the name of the network namespace of the sandbox in `dir`, if
/// it has one. The namespace ends with its last process and socket, and
/// with it the tap device.
fn remove_netns(dir: &Path) {
    let Some(id) = dir.file_name().and_then(|name| name.to_str()) else {
        return;
    };
    let path = netns::path_of(id);
    if !path.exists() {
        return;
    }
    match netns::remove(&path) {
        Ok(()) => tracing::info!(netns = %path.display(), "removed a stale network namespace"),
        Err(err) => tracing::warn!(
            netns = %path.display(),
            error = %err,
            "removing a stale network namespace failed"
        ),
    }
}

fn is_recent(dir: &Path) -> bool {
    fs::metadata(dir)
        .and_then(|meta| meta.modified())
        .map(|modified| modified.elapsed().map_or(true, |age| age.as_secs() < 60))
        .unwrap_or(false)
}

/// Kills the VMM recorded in `dir` if it still runs. Its command line must
/// name the folder, so a pid reused by an unrelated process is left alone.
/// A jailed Firecracker runs inside its chroot, so its command line names
/// the sandbox only by the `--id=<folder name>` argument of the jailer.
fn kill_vmm(dir: &Path) -> bool {
    let Some(pid) = fs::read_to_string(dir.join("vmm.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return false;
    };
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let contains = |needle: &[u8]| cmdline.windows(needle.len()).any(|window| window == needle);
    let jailed_id = dir.file_name().map(|name| {
        let mut arg = b"--id=".to_vec();
        arg.extend_from_slice(name.as_encoded_bytes());
        arg.push(0);
        arg
    });
    let named =
        contains(dir.as_os_str().as_encoded_bytes()) || jailed_id.is_some_and(|arg| contains(&arg));
    if !named {
        return false;
    }
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_record_is_alive() {
        assert!(owner_alive(&owner_record()));
    }

    #[test]
    fn wrong_start_time_is_dead() {
        let record = format!("{} 1", std::process::id());
        assert!(!owner_alive(&record));
    }

    #[test]
    fn jailed_vmm_is_found_by_id() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("sb-jailed0123");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("owner"), "999999999 5").unwrap();
        // A jailed Firecracker's command line names the sandbox only as
        // `--id=<folder name>`; `sh` keeps that argument as its $0.
        let mut vmm = std::process::Command::new("sh")
            .args(["-c", "sleep 30; :", "--id=sb-jailed0123"])
            .spawn()
            .unwrap();
        fs::write(dir.join("vmm.pid"), vmm.id().to_string()).unwrap();
        // Until `sh` has been executed, the child's command line is ours.
        let cmdline = format!("/proc/{}/cmdline", vmm.id());
        for _ in 0..200 {
            if fs::read_to_string(&cmdline).is_ok_and(|text| text.contains("--id=")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }

        let report = sweep(root.path());

        assert_eq!(report.vmms_killed, 1);
        assert_eq!(report.folders, 1);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(vmm.wait().unwrap().signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn folder_of_dead_owner_is_swept() {
        let root = tempfile::tempdir().unwrap();
        let dead = root.path().join("sb-dead");
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join("owner"), "999999999 5").unwrap();
        let live = root.path().join("sb-live");
        fs::create_dir(&live).unwrap();
        fs::write(live.join("owner"), owner_record()).unwrap();

        let report = sweep(root.path());
        assert_eq!(report.folders, 1);
        assert!(!dead.exists());
        assert!(live.exists());
    }

    #[test]
    fn namespace_of_dead_run_is_removed() {
        if let Some(reason) = crate::net::tap::unavailable_reason() {
            eprintln!("skipped namespace_of_dead_run_is_removed: {reason}");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let dead = root.path().join("sb-sweeptest01");
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join("owner"), "999999999 5").unwrap();
        let path = netns::path_of("sb-sweeptest01");
        netns::NetworkNamespace::create(&path).unwrap();

        let report = sweep(root.path());

        assert_eq!(report.folders, 1);
        assert!(!path.exists(), "{} is left behind", path.display());
    }
}

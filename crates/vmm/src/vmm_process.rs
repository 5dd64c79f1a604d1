//! Process settings shared by every VMM, whichever backend starts it: its
//! own process group, death with upstream, and a CPU priority.

use std::io;

use tokio::process::Command;

/// The nice value of VMs started ahead of demand (warm pool refills), so
/// that on a busy host they take CPU time only when sandboxes in use leave
/// it. Sandboxes in use run at the default of 0.
const BACKGROUND_NICE: libc::c_int = 10;

/// Linux's capability number of CAP_SYS_NICE, which lowering a nice value
/// needs unless RLIMIT_NICE allows it.
const CAP_SYS_NICE: u32 = 23;

/// Sets up `command` to start a VMM: in its own process group, killed with
/// SIGKILL when upstream's spawning thread exits and when the handle is
/// dropped, and at background priority when `background` is set.
pub(crate) fn prepare(command: &mut Command, background: bool) {
    command.kill_on_drop(true).process_group(0);
    // SAFETY: prctl and setpriority are async-signal-safe and take no
    // pointers. The VMM gets SIGKILL when the thread that spawned it
    // exits, so it never outlives upstream; the sweep on the next start
    // covers the rest.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(io::Error::last_os_error());
            }
            if background && libc::setpriority(libc::PRIO_PROCESS, 0, BACKGROUND_NICE) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Returns whether this process may move a background VMM back to nice 0.
/// Only then are VMs started at background priority, because one that
/// stayed niced would run a user's commands slower than a fresh one.
pub(crate) fn can_restore_priority() -> bool {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out-pointer.
    let nice_limit = unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut limit) } == 0;
    // RLIMIT_NICE allows nice values down to 20 - rlim_cur.
    if nice_limit && limit.rlim_cur >= 20 {
        return true;
    }
    has_capability(CAP_SYS_NICE)
}

fn has_capability(bit: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

/// Moves every thread of process `pid` to nice 0. Linux keeps a nice value
/// per thread, and a VMM's threads inherited the background value.
pub(crate) fn restore_priority(pid: u32) -> io::Result<()> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Some(tid) = entry?
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // SAFETY: setpriority takes no pointers.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 0) } < 0 {
            let err = io::Error::last_os_error();
            // A thread that ended since the listing has nothing to move.
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(err);
            }
        }
    }
    Ok(())
}

/// Returns the nice value of thread or process `id`.
#[cfg(test)]
fn nice_of(id: u32) -> libc::c_int {
    // SAFETY: getpriority takes no pointers.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, id) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn background_process_returns_to_normal() {
        if !can_restore_priority() {
            eprintln!("skipped: this process may not lower nice values (needs CAP_SYS_NICE)");
            return;
        }
        let mut command = Command::new("sleep");
        command.arg("30");
        prepare(&mut command, true);
        let mut child = command.spawn().unwrap();
        let pid = child.id().unwrap();

        assert_eq!(nice_of(pid), BACKGROUND_NICE);
        restore_priority(pid).unwrap();
        assert_eq!(nice_of(pid), 0);

        child.kill().await.unwrap();
    }

    #[tokio::test]
    async fn foreground_process_keeps_normal_priority() {
        let mut command = Command::new("sleep");
        command.arg("30");
        prepare(&mut command, false);
        let mut child = command.spawn().unwrap();

        assert_eq!(nice_of(child.id().unwrap()), nice_of(std::process::id()));

        child.kill().await.unwrap();
    }
}

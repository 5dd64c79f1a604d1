//! The Firecracker process: spawning it, its output, and its end.

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::api::ApiClient;
use super::jailer::Jailer;
use super::layout::Layout;
use crate::backend::VmProcess;
use crate::tail::{last_chars, read_into, SharedTail, TailBuffer};
use crate::{Error, Result};

/// Bytes of guest console output, mixed with Firecracker's own warnings,
/// kept for error messages.
const CONSOLE_KEEP: usize = 16 * 1024;

/// Bytes of Firecracker's standard error kept: it only prints there when
/// it fails to start or panics.
const STDERR_KEEP: usize = 4 * 1024;

/// How long the VMM may keep running after the guest kernel announced a
/// reboot, power-off or panic. Firecracker 1.16 exits by itself through
/// the i8042 reset line within milliseconds, so this only catches a VMM
/// that does not.
const GUEST_STOP_GRACE: Duration = Duration::from_secs(2);

/// Lines the guest kernel prints when it stops: reboot, power-off and
/// panic (Linux's `kernel/reboot.c` and `kernel/panic.c`).
const GUEST_STOP_MARKERS: [&str; 3] = [
    "reboot: Restarting system",
    "reboot: Power down",
    "Kernel panic - not syncing",
];

/// The facts `save_snapshot` needs about a running VM. They are looked up
/// by pid because the trait passes the VM as `dyn VmProcess`.
#[derive(Clone, Debug)]
pub struct VmRecord {
    pub api: ApiClient,
    /// The VMM's working directory on the host.
    pub root: PathBuf,
    /// The image root file system the VM was started with.
    pub root_disk: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
}

pub type Registry = Arc<Mutex<HashMap<u32, VmRecord>>>;

/// A started Firecracker (or jailer) process and its output readers.
pub struct Spawned {
    child: Child,
    pid: Option<u32>,
    /// `<run_dir>/vmm.pid`, removed once the process is gone.
    pid_file: PathBuf,
    console: SharedTail,
    stderr: SharedTail,
    stderr_reader: Option<JoinHandle<()>>,
    console_reader: JoinHandle<()>,
}

/// Spawns `command` as a VMM: in its own process group, killed when
/// upstream's spawning thread exits, with its output read into bounded
/// buffers. Its pid is written to `<run_dir>/vmm.pid` for the sweep.
pub fn spawn(
    mut command: Command,
    run_dir: &Path,
    label: &str,
    background: bool,
) -> Result<Spawned> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // NOTE: the jailer's switch to its unprivileged user clears the
    // parent-death signal this sets, so a jailed VMM outlives a crashed
    // upstream until the next sweep of the run folders.
    crate::vmm_process::prepare(&mut command, background);
    let mut child = command.spawn().map_err(|source| Error::VmmSpawn {
        vmm: label.to_string(),
        source,
    })?;
    let pid = child.id();
    let pid_file = run_dir.join("vmm.pid");
    if let Some(pid) = pid {
        if let Err(err) = std::fs::write(&pid_file, pid.to_string()) {
            let _ = child.start_kill();
            return Err(Error::io(format!("writing {}", pid_file.display()))(err));
        }
    }

    let console = TailBuffer::shared(CONSOLE_KEEP);
    let stderr = TailBuffer::shared(STDERR_KEEP);
    // A pidfd names this process only, even after it has been reaped and
    // its pid reused, so a late kill can never hit another process.
    let pidfd = pid.and_then(open_pidfd);
    let stdout = child.stdout.take().expect("stdout is piped");
    let console_reader = tokio::spawn(read_console(stdout, Arc::clone(&console), pidfd));
    let stderr_pipe = child.stderr.take().expect("stderr is piped");
    let stderr_reader = tokio::spawn(read_into(stderr_pipe, Arc::clone(&stderr)));
    Ok(Spawned {
        child,
        pid,
        pid_file,
        console,
        stderr,
        stderr_reader: Some(stderr_reader),
        console_reader,
    })
}

impl Spawned {
    /// Waits until the process exits and returns how.
    pub async fn wait_exited(&mut self) -> String {
        match self.child.wait().await {
            Ok(status) => format!("Firecracker exited ({status})"),
            Err(err) => format!("waiting for Firecracker failed: {err}"),
        }
    }

    /// Kills the process, reaps it, and returns its standard error and the
    /// end of its console, for the error of a failed start.
    pub async fn kill_for_error(&mut self) -> String {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let _ = std::fs::remove_file(&self.pid_file);
        let mut output = self.stderr_text().await;
        let console = self.console.lock().unwrap().text();
        if !console.trim().is_empty() {
            output.push_str(&format!("\nConsole:\n{}", last_chars(console.trim(), 2000)));
        }
        output
    }

    /// Firecracker's standard error as a suffix for messages, or nothing.
    /// Call it after the process has exited, so the pipe is drained.
    async fn stderr_text(&mut self) -> String {
        if let Some(reader) = self.stderr_reader.take() {
            let _ = tokio::time::timeout(Duration::from_millis(200), reader).await;
        }
        let stderr = self.stderr.lock().unwrap().text();
        if stderr.trim().is_empty() {
            String::new()
        } else {
            format!("\nFirecracker: {}", stderr.trim())
        }
    }
}

/// A running Firecracker VMM, as callers see it.
pub struct FirecrackerProcess {
    spawned: Spawned,
    layout: Layout,
    /// The jailer and sandbox id, to remove the sandbox's cgroup.
    jail: Option<(Jailer, String)>,
    registry: Registry,
    cleaned: bool,
}

impl FirecrackerProcess {
    pub fn new(
        spawned: Spawned,
        layout: Layout,
        jail: Option<(Jailer, String)>,
        registry: Registry,
        record: VmRecord,
    ) -> Self {
        if let Some(pid) = spawned.pid {
            registry.lock().unwrap().insert(pid, record);
        }
        Self {
            spawned,
            layout,
            jail,
            registry,
            cleaned: false,
        }
    }

    /// Removes what the VMM leaves behind once it has been reaped: its
    /// files and sockets, its jail and its cgroup.
    fn clean_up(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        self.deregister();
        self.layout.remove();
        let _ = std::fs::remove_file(&self.spawned.pid_file);
        if let Some((jailer, id)) = &self.jail {
            jailer.remove_cgroup(id);
        }
    }

    fn deregister(&self) {
        if let Some(pid) = self.spawned.pid {
            self.registry.lock().unwrap().remove(&pid);
        }
    }

    /// Reads from the console why the guest stopped, if it did.
    fn guest_stop_reason(&self) -> Option<&'static str> {
        let console = self.spawned.console.lock().unwrap().text();
        if console.contains(GUEST_STOP_MARKERS[2]) {
            Some("the guest kernel panicked")
        } else if console.contains(GUEST_STOP_MARKERS[0]) || console.contains(GUEST_STOP_MARKERS[1])
        {
            Some("the guest rebooted or powered off")
        } else {
            None
        }
    }
}

#[async_trait]
impl VmProcess for FirecrackerProcess {
    fn pid(&self) -> Option<u32> {
        self.spawned.pid
    }

    fn kill(&mut self) {
        let _ = self.spawned.child.start_kill();
    }

    async fn destroy(&mut self) {
        let _ = self.spawned.child.start_kill();
        let _ = self.spawned.child.wait().await;
        self.clean_up();
    }

    async fn wait_exit(&mut self) -> String {
        let status = self.spawned.wait_exited().await;
        let stderr = self.spawned.stderr_text().await;
        let reason = self.guest_stop_reason();
        self.clean_up();
        match reason {
            Some(reason) => format!("{status} because {reason}{stderr}"),
            None => format!("{status}{stderr}"),
        }
    }

    fn console_tail(&self) -> String {
        self.spawned.console.lock().unwrap().text()
    }
}

impl Drop for FirecrackerProcess {
    fn drop(&mut self) {
        let _ = self.spawned.child.start_kill();
        self.spawned.console_reader.abort();
        if self.cleaned {
            return;
        }
        self.deregister();
        self.layout.remove();
        // A cgroup can only be removed once the process in it is reaped,
        // which Drop cannot wait for.
        if let Some((jailer, id)) = self.jail.take() {
            if jailer.parent_cgroup.is_some() {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let pid = self.spawned.pid;
                    runtime.spawn(async move {
                        wait_gone(pid).await;
                        jailer.remove_cgroup(&id);
                    });
                }
            }
        }
    }
}

/// Waits up to a second for a killed process to disappear.
async fn wait_gone(pid: Option<u32>) {
    let Some(pid) = pid else { return };
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Keeps the console tail and ends the VMM if the guest stops and the VMM
/// lingers.
async fn read_console(
    mut pipe: impl AsyncRead + Unpin,
    buffer: SharedTail,
    pidfd: Option<OwnedFd>,
) {
    let mut chunk = vec![0u8; 4096];
    // The last bytes of the previous chunk, so a marker split across two
    // reads is still found.
    let mut carry: Vec<u8> = Vec::new();
    let mut pidfd = pidfd;
    while let Ok(n) = pipe.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        buffer.lock().unwrap().push(&chunk[..n]);
        carry.extend_from_slice(&chunk[..n]);
        if pidfd.is_some() && contains_stop_marker(&carry) {
            let fd = pidfd.take().expect("checked above");
            tokio::spawn(async move {
                tokio::time::sleep(GUEST_STOP_GRACE).await;
                if kill_pidfd(&fd) {
                    tracing::warn!("Firecracker kept running after the guest stopped; killed it");
                }
            });
        }
        let keep = carry.len().saturating_sub(64);
        carry.drain(..keep);
    }
}

fn contains_stop_marker(bytes: &[u8]) -> bool {
    GUEST_STOP_MARKERS.iter().any(|marker| {
        bytes
            .windows(marker.len())
            .any(|window| window == marker.as_bytes())
    })
}

fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "pidfd_open failed; a VMM that lingers after its guest stops is ended only on destroy"
        );
        return None;
    }
    // SAFETY: the descriptor was just created and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends SIGKILL through a pidfd; returns whether the process still existed.
fn kill_pidfd(fd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is a valid pidfd; a null siginfo is allowed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    rc == 0
}

/// Returns the last `max` bytes of `text`, cut at a character boundary.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_markers_are_found() {
        assert!(contains_stop_marker(
            b"...\r\n[ 1.0] reboot: Restarting system\r\n"
        ));
        assert!(contains_stop_marker(
            b"Kernel panic - not syncing: Attempted to kill init"
        ));
        assert!(!contains_stop_marker(b"reboot: Restart"));
    }

    #[tokio::test]
    async fn console_marker_kills_lingering_process() {
        // `sh` prints a reboot line and then lingers like a VMM that does
        // not exit on its own.
        let mut command = Command::new("sh");
        command.args(["-c", "echo 'reboot: Restarting system'; exec sleep 30"]);
        let dir = tempfile::tempdir().unwrap();
        let mut spawned = spawn(command, dir.path(), "sh", false).unwrap();

        let status = tokio::time::timeout(Duration::from_secs(10), spawned.child.wait())
            .await
            .expect("the process was killed after the grace period")
            .unwrap();

        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(spawned.console.lock().unwrap().text().contains("reboot:"));
    }

    #[tokio::test]
    async fn failed_start_reports_stderr() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo 'bad argument' >&2; exit 1"]);
        let dir = tempfile::tempdir().unwrap();
        let mut spawned = spawn(command, dir.path(), "sh", false).unwrap();

        let status = spawned.wait_exited().await;
        let tail = spawned.kill_for_error().await;

        assert_eq!(status, "Firecracker exited (exit status: 1)");

        assert_eq!(tail, "\nFirecracker: bad argument");
        assert!(!dir.path().join("vmm.pid").exists());
    }
}

//! The QEMU backend: the `microvm` machine with virtio-mmio devices.
//!
//! Devices: the image root and the scratch disk as virtio-blk (identified in
//! the guest by their serial numbers, because probe order is not
//! guaranteed), a virtio-serial port for the agent, virtio-rng for entropy,
//! and the serial console on a socket the host reads into a bounded buffer.
//! KVM is used where the host has hardware virtualisation, TCG elsewhere.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};

use crate::backend::{Backend, BackendKind, RunningVm, VmProcess, VmSpec};
use crate::host::{Accel, HostInfo};
use crate::tail::{self, SharedTail, TailBuffer};
use crate::{qemu_snapshot as snapshot, Error, Result};

/// How long QEMU may take to connect to the host's sockets after it starts.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of guest console output kept for error messages.
const CONSOLE_KEEP: usize = 16 * 1024;

pub struct QemuBackend {
    binary: PathBuf,
    host: HostInfo,
    /// Running VMs by QEMU pid, for `save_snapshot`.
    registry: Registry,
}

/// The files of a running VM that a snapshot is made from.
#[derive(Clone, Debug)]
pub(crate) struct VmFiles {
    pub run_dir: PathBuf,
    pub scratch_disk: PathBuf,
    pub memory_file: Option<PathBuf>,
}

type Registry = Arc<Mutex<HashMap<u32, VmFiles>>>;

impl QemuBackend {
    pub fn new(binary: PathBuf, host: HostInfo) -> Self {
        Self {
            binary,
            host,
            registry: Registry::default(),
        }
    }

    /// Finds `qemu-system-x86_64` on `PATH` (or `$UPSTREAM_QEMU`).
    pub fn find_binary() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("UPSTREAM_QEMU") {
            return Some(PathBuf::from(path));
        }
        find_in_path("qemu-system-x86_64")
    }

    /// Kernel parameters that matter for boot time and robustness under
    /// both KVM and TCG (measured with QEMU 7.2 on a TCG host).
    fn kernel_cmdline(&self, spec: &VmSpec) -> String {
        let mut args = vec![
            "console=ttyS0".to_string(),
            // A guest reboot or panic ends QEMU, because it runs with -no-reboot.
            "reboot=t".into(),
            "panic=-1".into(),
            "quiet".into(),
            "loglevel=1".into(),
            "no_timer_check".into(),
            // The APIC timer calibration costs about 220 ms under TCG.
            "noapictimer".into(),
            "random.trust_cpu=on".into(),
            "rdinit=/upstream-agent".into(),
            "upstream.root=root".into(),
            "upstream.scratch=scratch".into(),
            format!("upstream.hostname={}", spec.id),
        ];
        if let Some(khz) = self.host.tsc_khz {
            args.push(format!("tsc_early_khz={khz}"));
        }
        args.extend(spec.kernel_args.iter().cloned());
        args.join(" ")
    }

    fn command(&self, spec: &VmSpec) -> Command {
        let (accel, cpu) = match self.host.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg { .. } => ("tcg", "max"),
        };
        let mut command = Command::new(&self.binary);
        command
            // The PIC and PIT stay on: without the PIC a guest with more than
            // one vCPU hangs while bringing up its secondary CPUs.
            .args(["-M", "microvm,acpi=off,rtc=on"])
            .args(["-accel", accel, "-cpu", cpu])
            .args(["-m", &spec.memory_mib.to_string()])
            .args(["-smp", &spec.vcpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args([
                "-chardev",
                &socket_chardev("console", &spec.socket_path("console.sock")),
            ])
            .args(["-serial", "chardev:console"])
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initramfs)
            .args(["-append", &self.kernel_cmdline(spec)])
            .args(["-drive", &drive("root", &spec.root_disk, true)])
            .args(["-device", "virtio-blk-device,drive=root,serial=root"])
            .args(["-drive", &drive("scratch", &spec.scratch_disk, false)])
            .args(["-device", "virtio-blk-device,drive=scratch,serial=scratch"])
            .args(["-device", "virtio-serial-device"])
            .args([
                "-chardev",
                &socket_chardev("agent", &spec.socket_path("agent.sock")),
            ])
            .args([
                "-device",
                &format!(
                    "virtserialport,chardev=agent,name={}",
                    upstream_protocol::SERIAL_PORT_NAME
                ),
            ])
            .args(["-object", "rng-random,id=rng,filename=/dev/urandom"])
            .args(["-device", "virtio-rng-device,rng=rng"])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                spec.socket_path("qmp.sock").display()
            ));
        if let Some(network) = &spec.network {
            command.args(crate::net::qemu::netdev_args(network));
        }
        command
    }
}

fn socket_chardev(id: &str, path: &Path) -> String {
    format!("socket,id={id},path={}", path.display())
}

fn drive(id: &str, file: &Path, read_only: bool) -> String {
    let mode = if read_only {
        ",readonly=on"
    } else {
        ",discard=unmap"
    };
    format!("id={id},file={},format=raw,if=none{mode}", file.display())
}

#[async_trait]
impl Backend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn network_attachment(&self) -> Result<crate::net::Attachment> {
        Ok(crate::net::Attachment::Slirp)
    }

    async fn start(&self, spec: &VmSpec) -> Result<RunningVm> {
        let mut command = self.command(spec);
        if let Some(file) = &spec.memory_file {
            snapshot::add_memory_file(&mut command, spec.memory_mib, file, true);
        }
        let (process, agent) = self.launch(spec, command).await?;
        Ok(RunningVm {
            process: Box::new(process),
            channel: agent.into(),
        })
    }

    /// The QEMU binary's path, size and modification time: a snapshot's
    /// migration stream loads only into the QEMU build that wrote it.
    fn snapshot_tag(&self) -> String {
        snapshot::binary_tag(&self.binary)
    }

    fn supports_snapshots(&self) -> bool {
        true
    }

    /// Migrates the VM's device state into `dir/state`, moves its memory
    /// file to `dir/memory` and copies its scratch disk to
    /// `dir/scratch.ext4`. The VM must have been started with a
    /// [`VmSpec::memory_file`]; it is destroyed afterwards.
    async fn save_snapshot(&self, vm: &mut dyn VmProcess, dir: &Path) -> Result<()> {
        let files = vm
            .pid()
            .and_then(|pid| self.registry.lock().unwrap().get(&pid).cloned())
            .ok_or_else(|| Error::SnapshotInvalid {
                dir: dir.to_path_buf(),
                reason: "the VM is not a running QEMU VM of this backend".into(),
            })?;
        snapshot::save(vm, &files, dir).await
    }

    /// Starts QEMU with the memory of `dir/memory` mapped copy-on-write and
    /// loads the device state from `dir/state`; the guest continues where
    /// the snapshot was taken, with its agent channel still open.
    async fn restore(&self, spec: &VmSpec, dir: &Path) -> Result<RunningVm> {
        snapshot::check_files(dir)?;
        crate::disk::copy_sparse(&dir.join(snapshot::SCRATCH_FILE), &spec.scratch_disk)?;
        let mut command = self.command(spec);
        snapshot::add_memory_file(
            &mut command,
            spec.memory_mib,
            &dir.join(snapshot::MEMORY_FILE),
            false,
        );
        command.args(["-incoming", "defer"]);
        let (mut process, agent) = self.launch(spec, command).await?;
        if let Err(err) = snapshot::load_state(spec, dir).await {
            process.destroy().await;
            return Err(err);
        }
        Ok(RunningVm {
            process: Box::new(process),
            channel: agent.into(),
        })
    }
}

impl QemuBackend {
    /// Spawns QEMU and accepts its agent and console connections.
    async fn launch(
        &self,
        spec: &VmSpec,
        mut command: Command,
    ) -> Result<(QemuProcess, UnixStream)> {
        // Listen before QEMU starts so its connection cannot race the bind.
        let agent_listener = bind(&spec.socket_path("agent.sock"))?;
        let console_listener = bind(&spec.socket_path("console.sock"))?;

        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        crate::vmm_process::prepare(&mut command, spec.background);
        let mut child = command.spawn().map_err(|source| Error::VmmSpawn {
            vmm: self.binary.display().to_string(),
            source,
        })?;
        let pid = child.id();
        if let Some(pid) = pid {
            std::fs::write(spec.run_dir.join("vmm.pid"), pid.to_string())
                .map_err(Error::io(format!("writing {}", spec.run_dir.display())))?;
        }

        let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
            tokio::try_join!(agent_listener.accept(), console_listener.accept())
        })
        .await;
        let (agent, console) = match connected {
            Ok(Ok(((agent, _), (console, _)))) => (agent, console),
            Ok(Err(err)) => return Err(start_failed(spec, &mut child, err.to_string()).await),
            Err(_) => {
                let reason = "QEMU did not connect to its sockets".to_string();
                return Err(start_failed(spec, &mut child, reason).await);
            }
        };
        // Nothing else may connect to the sockets.
        drop((agent_listener, console_listener));
        let _ = std::fs::remove_file(spec.socket_path("agent.sock"));
        let _ = std::fs::remove_file(spec.socket_path("console.sock"));

        let console_buffer = TailBuffer::shared(CONSOLE_KEEP);
        tokio::spawn(tail::read_into(console, Arc::clone(&console_buffer)));
        if let Some(pid) = pid {
            let files = VmFiles {
                run_dir: spec.run_dir.clone(),
                scratch_disk: spec.scratch_disk.clone(),
                memory_file: spec.memory_file.clone(),
            };
            self.registry.lock().unwrap().insert(pid, files);
        }
        let process = QemuProcess {
            child,
            pid,
            console: console_buffer,
            registry: Arc::clone(&self.registry),
        };
        Ok((process, agent))
    }
}

/// Kills a QEMU that failed to start and builds the error from its stderr.
async fn start_failed(spec: &VmSpec, child: &mut Child, reason: String) -> Error {
    let _ = child.start_kill();
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ =
            tokio::time::timeout(Duration::from_secs(1), pipe.read_to_string(&mut stderr)).await;
    }
    let _ = child.wait().await;
    let detail = stderr.trim();
    let console = if detail.is_empty() {
        String::new()
    } else {
        format!("\nQEMU: {detail}")
    };
    Error::Boot {
        id: spec.id.clone(),
        reason,
        console,
    }
}

fn bind(path: &Path) -> Result<UnixListener> {
    // sun_path is 108 bytes long, including the terminating NUL.
    if path.as_os_str().len() > 107 {
        return Err(Error::SocketPathTooLong(path.to_path_buf()));
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(Error::io(format!("listening on {}", path.display())))
}

struct QemuProcess {
    child: Child,
    pid: Option<u32>,
    console: SharedTail,
    registry: Registry,
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            self.registry.lock().unwrap().remove(&pid);
        }
    }
}

#[async_trait]
impl VmProcess for QemuProcess {
    fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn kill(&mut self) {
        let _ = self.child.start_kill();
    }

    async fn destroy(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    async fn wait_exit(&mut self) -> String {
        let status = self.child.wait().await;
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ =
                tokio::time::timeout(Duration::from_millis(200), pipe.read_to_string(&mut stderr))
                    .await;
        }
        let stderr = stderr.trim();
        match status {
            Ok(status) if stderr.is_empty() => format!("QEMU exited ({status})"),
            Ok(status) => format!("QEMU exited ({status}): {stderr}"),
            Err(err) => format!("waiting for QEMU failed: {err}"),
        }
    }

    fn console_tail(&self) -> String {
        self.console.lock().unwrap().text()
    }
}

pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .map(|meta| meta.is_file())
                .unwrap_or(false)
        })
}

//! The Firecracker backend.
//!
//! Each sandbox gets its own `firecracker` process, configured through the
//! HTTP API on its Unix socket. The requests set the machine size, the
//! kernel with the agent's initramfs, and two virtio-blk drives: the image
//! root (read-only) and the scratch disk. A vsock device carries the agent
//! channel, and an entropy device seeds the guest's random numbers.
//! The guest agent connects to the host's vsock port 1024, which
//! Firecracker forwards to the Unix socket `v.sock_1024` where the host
//! listens from before the guest starts. When upstream runs as root and
//! the jailer is installed, every VMM runs jailed (see [`jailer`]).
//!
//! Firecracker needs hardware KVM: on a host whose `/dev/kvm` is PVM it
//! configures and starts a VM, but the guest kernel stops before init.

mod api;
mod config;
mod error;
mod jailer;
mod layout;
mod process;
mod snapshot;

#[cfg(test)]
mod schema_tests;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Command;

pub use self::api::{ApiClient, ApiRequest};
pub use self::config::RateLimits;
pub use self::error::FirecrackerError;
pub use self::jailer::Jailer;

use self::config::{names, BootConfig};
use self::layout::Layout;
use self::process::{FirecrackerProcess, Registry, Spawned, VmRecord};
use crate::backend::{AgentChannel, Backend, BackendKind, RunningVm, VmProcess, VmSpec};
use crate::net::netns::{self, NetworkNamespace};
use crate::net::tap::{self, TapDevice};
use crate::net::{Attachment, GuestLink};
use crate::{Error, Result};

/// How long Firecracker may take to open its API socket after it starts.
/// It takes about 30 ms on the project's build hosts.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

pub struct FirecrackerBackend {
    binary: PathBuf,
    /// The jailer settings, or why they are invalid; reported by `start`.
    jailer: std::result::Result<Option<Jailer>, String>,
    limits: RateLimits,
    /// Running VMs by pid, for `save_snapshot`.
    registry: Registry,
}

impl FirecrackerBackend {
    /// Creates a backend that runs `binary`, jailed when upstream runs as
    /// root and the jailer is installed.
    pub fn new(binary: PathBuf) -> Self {
        let jailer = Jailer::from_env(&binary);
        Self {
            binary,
            jailer,
            limits: RateLimits::default(),
            registry: Arc::default(),
        }
    }

    /// Sets the disk and entropy rate limits of every VM started afterwards.
    pub fn with_rate_limits(mut self, limits: RateLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Runs Firecracker without the jailer even as root.
    pub fn without_jailer(mut self) -> Self {
        self.jailer = Ok(None);
        self
    }

    /// `$UPSTREAM_FIRECRACKER`, else `firecracker` on `PATH`.
    pub fn find_binary() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("UPSTREAM_FIRECRACKER").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(path));
        }
        crate::qemu::find_in_path("firecracker")
    }

    /// Returns the jailer in use, if any, or the error in its settings.
    pub fn jailer(&self) -> Result<Option<&Jailer>> {
        match &self.jailer {
            Ok(jailer) => Ok(jailer.as_ref()),
            Err(reason) => Err(Error::BackendUnavailable {
                backend: "firecracker",
                reason: reason.clone(),
            }),
        }
    }

    fn layout(&self, spec: &VmSpec) -> Result<Layout> {
        match self.jailer()? {
            None => Ok(Layout::unconfined(&spec.run_dir)),
            Some(jailer) => Layout::jailed(
                Jailer::chroot(&self.binary, &spec.run_dir, &spec.id),
                Jailer::chroot_base(&spec.run_dir),
                jailer.uid,
                jailer.gid,
            ),
        }
    }

    /// Builds the command that starts the VMM, in the sandbox's network
    /// namespace when it has a tap device. Unjailed, the API socket is
    /// given by absolute path, so the command line names the run folder and
    /// the sweep can recognise a VMM left behind.
    fn command(&self, spec: &VmSpec, layout: &Layout) -> Result<Command> {
        let tap = tap_device(spec)?;
        if let Some(jailer) = self.jailer()? {
            let netns = tap.map(|device| device.netns.as_path());
            return Ok(jailer.command(&self.binary, &spec.run_dir, &spec.id, spec.vcpus, netns));
        }
        let mut command = Command::new(&self.binary);
        command
            .arg("--api-sock")
            .arg(layout.path(names::API_SOCKET))
            .arg("--id")
            .arg(&spec.id)
            .current_dir(layout.root());
        if let Some(device) = tap {
            let namespace = NetworkNamespace::open(&device.netns).map_err(Error::io(format!(
                "opening the sandbox's network namespace {}",
                device.netns.display()
            )))?;
            // SAFETY: the closure only calls setns, which is
            // async-signal-safe, on a descriptor that the closure keeps
            // open. The descriptor is close-on-exec, so Firecracker does
            // not inherit it.
            unsafe {
                command.pre_exec(move || netns::setns(namespace.as_fd().as_raw_fd()));
            }
        }
        Ok(command)
    }

    /// Places the files, spawns the VMM and sends `requests`. On error the
    /// VMM is killed and the error carries its output; the caller removes
    /// the layout.
    async fn launch(
        &self,
        spec: &VmSpec,
        layout: &mut Layout,
        requests: &[(ApiRequest, Duration)],
        snapshot: Option<(&Path, &snapshot::Metadata)>,
    ) -> Result<(Spawned, ApiClient, UnixListener)> {
        let listener =
            layout.listen(&config::vsock_listener_name(upstream_protocol::VSOCK_PORT))?;
        let api_socket = layout.expect(names::API_SOCKET);
        layout::check_socket_path(&api_socket)?;
        layout.expect(names::VSOCK);
        let command = self.command(spec, layout)?;
        let mut spawned = process::spawn(
            command,
            &spec.run_dir,
            &self.binary.display().to_string(),
            spec.background,
        )?;
        let api = ApiClient::new(api_socket);

        let conversation = async {
            tokio::select! {
                ready = api.wait_ready(SOCKET_TIMEOUT) => ready.map_err(|err| error_chain(&err))?,
                reason = spawned.wait_exited() => return Err(reason),
            }
            if let Some((dir, metadata)) = snapshot {
                let version: Version =
                    api.get("/version").await.map_err(|err| error_chain(&err))?;
                metadata
                    .check_version(dir, &version.firecracker_version)
                    .map_err(|err| error_chain(&err))?;
            }
            for (request, timeout) in requests {
                api.send_with_timeout(request, *timeout)
                    .await
                    .map_err(|err| error_chain(&err))?;
            }
            Ok(())
        };
        if let Err(reason) = conversation.await {
            let output = spawned.kill_for_error().await;
            return Err(Error::Boot {
                id: spec.id.clone(),
                reason,
                console: output,
            });
        }
        Ok((spawned, api, listener))
    }

    /// Wraps a launched VMM into the [`RunningVm`] handed to the caller.
    fn running(
        &self,
        spec: &VmSpec,
        layout: Layout,
        launched: (Spawned, ApiClient, UnixListener),
    ) -> RunningVm {
        let (spawned, api, listener) = launched;
        let record = VmRecord {
            api,
            root: layout.root().to_path_buf(),
            root_disk: spec.root_disk.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
        };
        let jail = match &self.jailer {
            Ok(Some(jailer)) => Some((jailer.clone(), spec.id.clone())),
            _ => None,
        };
        let listener_path =
            layout.path(&config::vsock_listener_name(upstream_protocol::VSOCK_PORT));
        let process =
            FirecrackerProcess::new(spawned, layout, jail, Arc::clone(&self.registry), record);
        RunningVm {
            process: Box::new(process),
            channel: AgentChannel::Pending(Box::pin(accept_agent(listener, listener_path))),
        }
    }

    fn record_of(&self, vm: &dyn VmProcess) -> Result<VmRecord> {
        let pid = vm.pid();
        pid.and_then(|pid| self.registry.lock().unwrap().get(&pid).cloned())
            .ok_or_else(|| FirecrackerError::UnknownVm(pid).into())
    }
}

#[derive(Deserialize)]
struct Version {
    firecracker_version: String,
}

/// Accepts the guest agent's connection, then stops listening: only the
/// agent's first connection is the channel, and the guest gets no other
/// way to reach the host.
async fn accept_agent(listener: UnixListener, path: PathBuf) -> Result<UnixStream> {
    let (stream, _) = listener.accept().await.map_err(Error::io(format!(
        "accepting the guest agent's vsock connection on {}",
        path.display()
    )))?;
    drop(listener);
    let _ = std::fs::remove_file(&path);
    Ok(stream)
}

/// Joins an error and its sources into a one-line reason.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Returns the sandbox's tap device, if it has a network.
fn tap_device(spec: &VmSpec) -> Result<Option<&TapDevice>> {
    match spec.network.as_ref().map(|network| &network.link) {
        None => Ok(None),
        Some(GuestLink::Tap(device)) => Ok(Some(device)),
        Some(GuestLink::Slirp(_)) => Err(Error::NetworkUnsupported {
            backend: "firecracker",
            reason: "the network was prepared for slirp, which only QEMU has".into(),
        }),
    }
}

/// Describes the guest's network interface for the boot requests.
fn network_config(spec: &VmSpec) -> Result<Option<config::NetworkConfig>> {
    let Some(device) = tap_device(spec)? else {
        return Ok(None);
    };
    let bandwidth = spec.network.as_ref().and_then(|network| network.bandwidth);
    Ok(Some(config::NetworkConfig {
        tap_name: device.name.clone(),
        guest_mac: tap::GUEST_MAC.to_string(),
        bandwidth,
    }))
}

/// Checks the rules Firecracker and its jailer set for instance ids.
fn check_id(id: &str) -> Result<()> {
    let valid =
        (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(FirecrackerError::InvalidId(id.to_string()).into())
    }
}

#[async_trait]
impl Backend for FirecrackerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    /// Returns a tap attachment: a tap device in a network namespace per
    /// sandbox, which needs root and `/dev/net/tun`. A jailed VMM runs as
    /// the jailer's user, which must be allowed to open the tap.
    fn network_attachment(&self) -> Result<Attachment> {
        if let Some(reason) = tap::unavailable_reason() {
            return Err(Error::NetworkUnsupported {
                backend: "firecracker",
                reason,
            });
        }
        let owner = match &self.jailer {
            Ok(Some(jailer)) => Some((jailer.uid, jailer.gid)),
            _ => None,
        };
        Ok(Attachment::Tap { owner })
    }

    async fn start(&self, spec: &VmSpec) -> Result<RunningVm> {
        check_id(&spec.id)?;
        let network = network_config(spec)?;
        let mut layout = self.layout(spec)?;
        let boot = BootConfig {
            id: spec.id.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel_args: spec.kernel_args.clone(),
            limits: self.limits,
            network,
        };
        let requests: Vec<_> = config::boot_requests(&boot)
            .into_iter()
            .map(|request| (request, api::REQUEST_TIMEOUT))
            .collect();

        let launched = async {
            layout.place(&spec.kernel, names::KERNEL, false)?;
            layout.place(&spec.initramfs, names::INITRD, false)?;
            layout.place(&spec.root_disk, names::ROOT_DISK, false)?;
            layout.place(&spec.scratch_disk, names::SCRATCH_DISK, true)?;
            self.launch(spec, &mut layout, &requests, None).await
        }
        .await;
        match launched {
            Ok(launched) => Ok(self.running(spec, layout, launched)),
            Err(err) => {
                layout.remove();
                Err(err)
            }
        }
    }

    fn supports_snapshots(&self) -> bool {
        true
    }

    /// Pauses the VM and saves a full snapshot into `dir`.
    ///
    /// The VM stays paused: Firecracker resets the guest's vsock device
    /// while it writes the snapshot, which closes the agent's connection,
    /// so the sandbox can only be destroyed afterwards. While paused, the
    /// guest issues no disk I/O, so the copy of its scratch disk matches
    /// the memory image.
    async fn save_snapshot(&self, vm: &mut dyn VmProcess, dir: &Path) -> Result<()> {
        let record = self.record_of(vm)?;
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let version: Version = record.api.get("/version").await?;
        record.api.send(&config::pause()).await?;

        let state = record.root.join(names::SNAPSHOT_STATE);
        let memory = record.root.join(names::SNAPSHOT_MEMORY);
        let saved = async {
            record
                .api
                .send_with_timeout(&config::snapshot_create(), api::SNAPSHOT_TIMEOUT)
                .await?;
            crate::disk::move_file(&state, &dir.join(snapshot::STATE_FILE))?;
            crate::disk::move_file(&memory, &dir.join(snapshot::MEMORY_FILE))?;
            crate::disk::copy_sparse(
                &record.root.join(names::SCRATCH_DISK),
                &dir.join(snapshot::SCRATCH_FILE),
            )?;
            snapshot::Metadata {
                firecracker_version: version.firecracker_version,
                root_disk: snapshot::canonical(&record.root_disk)?,
                vcpus: record.vcpus,
                memory_mib: record.memory_mib,
            }
            .write(dir)
        }
        .await;
        if saved.is_err() {
            snapshot::remove_quietly(&state);
            snapshot::remove_quietly(&memory);
        }
        saved
    }

    /// Starts a VM from the snapshot in `dir`.
    ///
    /// The snapshot's scratch disk is copied to `spec.scratch_disk`, and
    /// the image root must be the file the snapshot was taken with. The
    /// agent channel resolves when the restored guest's agent connects
    /// again, because the vsock device was reset when the snapshot was
    /// taken.
    async fn restore(&self, spec: &VmSpec, dir: &Path) -> Result<RunningVm> {
        check_id(&spec.id)?;
        let metadata = snapshot::Metadata::read(dir)?;
        metadata.check(dir, &spec.root_disk, spec.vcpus, spec.memory_mib)?;
        crate::disk::copy_sparse(&dir.join(snapshot::SCRATCH_FILE), &spec.scratch_disk)?;
        let requests = [
            (config::logger(), api::REQUEST_TIMEOUT),
            (config::snapshot_load(), api::SNAPSHOT_TIMEOUT),
        ];

        let mut layout = self.layout(spec)?;
        let launched = async {
            layout.place(&spec.root_disk, names::ROOT_DISK, false)?;
            layout.place(&spec.scratch_disk, names::SCRATCH_DISK, true)?;
            let state = dir.join(snapshot::STATE_FILE);
            layout.place(&state, names::SNAPSHOT_STATE, false)?;
            let memory = dir.join(snapshot::MEMORY_FILE);
            layout.place(&memory, names::SNAPSHOT_MEMORY, false)?;
            self.launch(spec, &mut layout, &requests, Some((dir, &metadata)))
                .await
        }
        .await;
        match launched {
            Ok(launched) => Ok(self.running(spec, layout, launched)),
            Err(err) => {
                layout.remove();
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_are_valid_instance_ids() {
        assert!(check_id("sb-0123456789ab").is_ok());
        assert!(check_id(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn invalid_ids_are_rejected() {
        for id in ["", "sb_1", "sb/1", "sb 1", &"a".repeat(65)] {
            let err = check_id(id).unwrap_err();
            assert!(
                err.to_string()
                    .contains("not a valid Firecracker instance id"),
                "{id}: {err}"
            );
        }
    }
}

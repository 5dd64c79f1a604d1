//! The backend trait: what every VMM must do for a sandbox.
//!
//! A backend starts a VMM for a [`VmSpec`] and hands back the process and a
//! byte stream to the guest agent. QEMU's stream is a virtio-serial port
//! behind a Unix socket; Firecracker's is a vsock connection behind its
//! Unix-socket vsock. Callers see the same [`RunningVm`] either way.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use async_trait::async_trait;
use tokio::net::UnixStream;

use crate::Result;

/// The VMMs upstream can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Qemu,
    Firecracker,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Qemu => "qemu",
            Self::Firecracker => "firecracker",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "qemu" => Ok(Self::Qemu),
            "firecracker" => Ok(Self::Firecracker),
            other => Err(crate::Error::UnknownBackend(other.to_string())),
        }
    }
}

/// Everything a backend needs to boot one sandbox's VM.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// Sandbox id; also the guest's host name.
    pub id: String,
    /// The sandbox's private folder: sockets, scratch disk, logs. Removed on
    /// destroy.
    pub run_dir: PathBuf,
    /// Uncompressed ELF kernel (`vmlinux`).
    pub kernel: PathBuf,
    /// Initramfs holding only the guest agent, which runs as PID 1.
    pub initramfs: PathBuf,
    /// The image's root file system, attached read-only and shared by every
    /// sandbox of the image.
    pub root_disk: PathBuf,
    /// The sandbox's writable disk (ext4), the upper layer of its root.
    pub scratch_disk: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// A file that backs guest memory and keeps it after the VMM exits, so
    /// a snapshot can map it later; `None` gives the guest anonymous memory.
    /// Backends whose snapshots copy memory out (Firecracker) ignore it.
    pub memory_file: Option<PathBuf>,
    /// Kernel parameters beyond the backend's own.
    pub kernel_args: Vec<String>,
    /// The guest's network device; `None` attaches none.
    pub network: Option<crate::net::VmNetwork>,
    /// Start the VMM at background CPU priority (warm pool refills); see
    /// [`crate::Sandbox::to_foreground`].
    pub background: bool,
}

impl VmSpec {
    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.run_dir.join(name)
    }
}

/// A started VM: its process and the unopened channel to its agent.
pub struct RunningVm {
    pub process: Box<dyn VmProcess>,
    /// Byte stream to the guest agent; the agent's hello arrives on it once
    /// the guest has booted.
    pub channel: AgentChannel,
}

/// The host end of the agent channel.
///
/// QEMU connects to the host's socket as soon as it starts, so its channel
/// is connected when [`Backend::start`] returns. Under Firecracker the
/// guest agent dials the host over vsock only once the guest has booted,
/// so the connection is accepted later, inside the caller's boot timeout.
pub enum AgentChannel {
    Connected(UnixStream),
    /// Resolves when the guest agent connects. It may never resolve if the
    /// VMM dies first, so callers also watch the process.
    Pending(Pin<Box<dyn Future<Output = Result<UnixStream>> + Send>>),
}

impl AgentChannel {
    /// Waits until the guest agent has connected.
    pub async fn connect(self) -> Result<UnixStream> {
        match self {
            Self::Connected(stream) => Ok(stream),
            Self::Pending(accept) => accept.await,
        }
    }
}

impl From<UnixStream> for AgentChannel {
    fn from(stream: UnixStream) -> Self {
        Self::Connected(stream)
    }
}

/// A running VMM process.
#[async_trait]
pub trait VmProcess: Send + Sync {
    /// The VMM's process id, while it runs.
    fn pid(&self) -> Option<u32>;

    /// Ends the VMM now (SIGKILL) without waiting; safe to call twice and
    /// from `Drop`.
    fn kill(&mut self);

    /// Ends the VMM and waits until it has exited.
    async fn destroy(&mut self);

    /// Whether the VMM has exited; backends that cannot tell without
    /// waiting report `false`.
    fn has_exited(&mut self) -> bool {
        false
    }

    /// Waits until the VMM exits by itself and describes how.
    async fn wait_exit(&mut self) -> String;

    /// The end of the guest console, for error messages; bounded in size.
    fn console_tail(&self) -> String;
}

/// A VMM driver. Implementations are chosen at run time (flag, config or
/// auto-detection) and callers never see which one runs.
#[async_trait]
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// Returns how this backend attaches [`VmSpec::network`], or an error
    /// with the reason it cannot on this host.
    fn network_attachment(&self) -> Result<crate::net::Attachment> {
        Err(crate::Error::NetworkUnsupported {
            backend: self.kind().name(),
            reason: "the backend has no network device support".into(),
        })
    }

    /// Whether [`VmSpec::network`] is supported on this host.
    fn supports_network(&self) -> bool {
        self.network_attachment().is_ok()
    }

    /// Starts a VM; returns as soon as the VMM runs. The caller waits for
    /// the agent's hello on the returned channel.
    async fn start(&self, spec: &VmSpec) -> Result<RunningVm>;

    /// Identifies the VMM build, because a snapshot restores only on the
    /// build that saved it.
    fn snapshot_tag(&self) -> String {
        self.kind().name().to_string()
    }

    /// Whether [`Backend::save_snapshot`] and [`Backend::restore`] work.
    fn supports_snapshots(&self) -> bool {
        false
    }

    /// Pauses a running VM and writes its state into `dir`.
    async fn save_snapshot(&self, _vm: &mut dyn VmProcess, _dir: &Path) -> Result<()> {
        Err(crate::Error::SnapshotUnsupported(self.kind().name()))
    }

    /// Starts a VM from the state in `dir` instead of booting it.
    async fn restore(&self, _spec: &VmSpec, _dir: &Path) -> Result<RunningVm> {
        Err(crate::Error::SnapshotUnsupported(self.kind().name()))
    }
}

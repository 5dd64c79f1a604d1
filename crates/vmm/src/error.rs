use std::path::PathBuf;

use upstream_protocol::ErrorKind;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the sandbox core. Messages name the value at fault and what to
/// do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Guest kernel not found at {0}; run `upstream setup` or pass --kernel PATH")]
    KernelMissing(PathBuf),

    #[error(
        "Guest kernel {0} is not an ELF vmlinux; pass the uncompressed vmlinux, not a bzImage, \
         or run `upstream setup` to build one"
    )]
    KernelInvalid(PathBuf),

    #[error("Guest agent not found at {0}; run `upstream setup` after installing upstream-agent")]
    AgentMissing(PathBuf),

    #[error("Unknown backend '{0}'; use qemu or firecracker")]
    UnknownBackend(String),

    #[error("Backend {backend} is not usable on this host: {reason}")]
    BackendUnavailable {
        backend: &'static str,
        reason: String,
    },

    #[error("{name} {value} is out of range; use {range}")]
    OutOfRange {
        name: &'static str,
        value: u64,
        range: &'static str,
    },

    #[error("Path {0} is too long for a Unix socket; set UPSTREAM_HOME to a shorter folder")]
    SocketPathTooLong(PathBuf),

    #[error("Starting {vmm} failed")]
    VmmSpawn {
        vmm: String,
        #[source]
        source: std::io::Error,
    },

    #[error("Sandbox {id} failed to boot: {reason}{console}")]
    Boot {
        id: String,
        reason: String,
        console: String,
    },

    #[error("Sandbox {id} stopped unexpectedly: {reason}")]
    SandboxLost { id: String, reason: String },

    #[error(
        "Guest agent speaks protocol {found}, the host expects {expected}; rerun `upstream setup`"
    )]
    ProtocolMismatch { found: u32, expected: u32 },

    #[error("Guest agent sent an invalid message: {0}")]
    Protocol(String),

    /// A request the agent answered with an error.
    #[error("{message}")]
    Guest { kind: ErrorKind, message: String },

    #[error("Snapshots are not supported by the {0} backend")]
    SnapshotUnsupported(&'static str),

    #[error("Invalid {name}={value}; use {expected}")]
    InvalidEnv {
        name: &'static str,
        value: String,
        expected: &'static str,
    },

    #[error("QEMU command {command} failed: {message}")]
    Qmp { command: String, message: String },

    #[error("Snapshot {dir} is unusable: {reason}; it is rebuilt on next use")]
    SnapshotInvalid { dir: PathBuf, reason: String },

    #[error(transparent)]
    Firecracker(#[from] crate::firecracker::FirecrackerError),

    #[error(
        "Networking is not available with the {backend} backend: {reason}. Alternatively, \
         use --backend qemu or run without network access and published ports"
    )]
    NetworkUnsupported {
        backend: &'static str,
        reason: String,
    },

    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

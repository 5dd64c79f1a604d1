use std::path::PathBuf;
use std::time::Duration;

/// Errors of the Firecracker backend. Messages name the request, path or
/// value at fault and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum FirecrackerError {
    #[error("Firecracker rejected {request} (HTTP {status}): {fault}")]
    Rejected {
        request: String,
        status: u16,
        fault: String,
    },

    #[error("Firecracker API request {request} failed")]
    Transport {
        request: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("Firecracker did not answer {request} within {timeout:?}")]
    RequestTimedOut { request: String, timeout: Duration },

    #[error(
        "Firecracker did not open its API socket {path} within {timeout:?}; \
         check that the binary is Firecracker 1.x"
    )]
    SocketTimedOut { path: PathBuf, timeout: Duration },

    #[error(
        "Sandbox id '{0}' is not a valid Firecracker instance id; use 1 to 64 ASCII letters, \
         digits and hyphens"
    )]
    InvalidId(String),

    #[error("The VM with pid {0:?} was not started by this Firecracker backend")]
    UnknownVm(Option<u32>),

    #[error("Snapshot file {0} not found; save a snapshot into that folder first")]
    SnapshotMissing(PathBuf),

    #[error("Snapshot metadata {path} is invalid: {reason}; save the snapshot again")]
    SnapshotInvalid { path: PathBuf, reason: String },

    #[error(
        "Snapshot in {dir} was taken with {what} {snapshot}, but this sandbox uses {current}; \
         restore it with the same {what} or save a new snapshot"
    )]
    SnapshotMismatch {
        dir: PathBuf,
        what: &'static str,
        snapshot: String,
        current: String,
    },
}

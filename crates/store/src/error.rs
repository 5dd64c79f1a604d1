//! The error type of every store operation.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::blob::Digest;
use crate::records::{TurnId, TurnState};

/// Result of a store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A store operation that failed.
///
/// Each message names the context, turn, artifact or path involved and, where there is one,
/// the fix. The wrapped cause is reachable through [`std::error::Error::source`] and is not
/// repeated in the message, so callers print the whole chain once.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another turn holds the context's lock and the caller set no wait time.
    #[error("Context '{context}' is in use by {holder}; wait for it to end or pass --wait")]
    ContextBusy { context: String, holder: LockHolder },

    /// Another turn still held the context's lock when the wait ran out.
    #[error(
        "Timed out after {:.1}s waiting for context '{context}', which is in use by {holder}; \
         wait longer or stop that run",
        waited.as_secs_f64()
    )]
    ContextWaitTimedOut {
        context: String,
        holder: LockHolder,
        waited: Duration,
    },

    /// No context of that name exists in the store.
    #[error("Context '{0}' not found; check the name against the list of contexts")]
    ContextNotFound(String),

    /// The context name is empty, too long or contains characters the store rejects.
    #[error("Invalid context name {name:?}: {reason}")]
    InvalidContextName { name: String, reason: &'static str },

    /// The artifact name is not a plain relative path.
    #[error(
        "Invalid artifact name {name:?}: {reason}; use a relative path such as 'out/report.csv'"
    )]
    InvalidArtifactName { name: String, reason: &'static str },

    /// No finished turn of the context produced an artifact of that name.
    #[error("Artifact '{name}' not found in context '{context}'")]
    ArtifactNotFound { context: String, name: String },

    /// One artifact is larger than [`Limits::max_artifact_bytes`](crate::Limits).
    #[error(
        "Artifact '{name}' is larger than the limit of {limit} bytes per artifact; \
         raise max_artifact_bytes or leave the file out of the artifacts"
    )]
    ArtifactTooLarge { name: String, limit: u64 },

    /// The turn already has [`Limits::max_artifacts_per_turn`](crate::Limits) artifacts.
    #[error(
        "Artifact '{name}' would exceed the limit of {limit} artifacts for turn {turn}; \
         raise max_artifacts_per_turn or pack the files into one archive"
    )]
    TooManyArtifacts {
        turn: TurnId,
        name: String,
        limit: u64,
    },

    /// The turn's artifacts together would exceed [`Limits::max_turn_bytes`](crate::Limits).
    #[error(
        "Artifact '{name}' would take turn {turn} past the limit of {limit} artifact bytes \
         per turn; raise max_turn_bytes or store fewer files"
    )]
    TurnTooLarge {
        turn: TurnId,
        name: String,
        limit: u64,
    },

    /// The workspace archive is larger than
    /// [`Limits::max_workspace_snapshot_bytes`](crate::Limits).
    #[error(
        "Workspace snapshot of turn {turn} is larger than the limit of {limit} bytes; \
         raise max_workspace_snapshot_bytes or exclude large files from the workspace"
    )]
    WorkspaceSnapshotTooLarge { turn: TurnId, limit: u64 },

    /// A step's full output is larger than [`Limits::max_artifact_bytes`](crate::Limits).
    #[error(
        "Full output of step {index} of turn {turn} is larger than the limit of {limit} bytes; \
         raise max_artifact_bytes or keep only the bounded output"
    )]
    StepOutputTooLarge {
        turn: TurnId,
        index: u32,
        limit: u64,
    },

    /// The turn has no record, because its context was removed.
    #[error("Turn {0} not found; its context may have been removed")]
    TurnNotFound(TurnId),

    /// The turn was already finished or interrupted.
    #[error("Turn {turn} is {state}, not running; begin a new turn to record more")]
    TurnNotRunning { turn: TurnId, state: TurnState },

    /// The database was migrated by a newer build of upstream.
    #[error(
        "Store database {path} has schema version {found}, newer than version {supported} \
         known to this build; upgrade upstream"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },

    /// A stream was longer than the limit passed to [`BlobStore::put`](crate::BlobStore::put).
    #[error("Blob is larger than the limit of {limit} bytes")]
    BlobTooLarge { limit: u64 },

    /// The blob store has no blob with that digest.
    #[error(
        "Blob sha256:{0} not found in the blob store; the store is incomplete, \
         rerun the turn that produced it"
    )]
    BlobNotFound(Digest),

    /// A blob file whose bytes do not hash to the digest that names it.
    #[error(
        "Blob {path} does not match its digest sha256:{digest}; the file is damaged, \
         delete it and rerun the turn that produced it"
    )]
    CorruptBlob { digest: Digest, path: PathBuf },

    /// The string is not a lowercase or uppercase hexadecimal SHA-256 digest.
    #[error("Invalid sha256 digest {0:?}; expected 64 hexadecimal characters")]
    InvalidDigest(String),

    /// The string is not a turn id of the form `t-<ULID>`.
    #[error("Invalid turn id {0:?}; expected 't-' followed by a 26-character ULID")]
    InvalidTurnId(String),

    /// The export target exists and has files in it.
    #[error("Export folder {0} is not empty; choose a new or empty folder")]
    ExportFolderNotEmpty(PathBuf),

    /// A query or update of the SQLite database failed.
    #[error("Failed to {action} in the store database")]
    Database {
        action: &'static str,
        #[source]
        source: rusqlite::Error,
    },

    /// A file or folder of the store could not be read or written.
    #[error("Failed to {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The caller's reader failed while the store consumed it.
    #[error("Failed to read {input}")]
    ReadInput {
        input: String,
        #[source]
        source: io::Error,
    },

    /// Encoding the context manifest as JSON failed.
    #[error("Failed to encode the manifest of context '{context}' as JSON")]
    Json {
        context: String,
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// Returns a closure that wraps a SQLite error with the action that failed.
    pub(crate) fn db(action: &'static str) -> impl FnOnce(rusqlite::Error) -> Self {
        move |source| Self::Database { action, source }
    }
}

/// The turn and process that hold a context's lock, as far as the database records them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// Running turn of the context, absent while the holder has locked but not yet recorded it.
    pub turn: Option<TurnId>,
    /// Host process id of the owning `upstream` process.
    pub pid: Option<u32>,
}

impl fmt::Display for LockHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.turn, self.pid) {
            (Some(turn), Some(pid)) => write!(f, "turn {turn} (pid {pid})"),
            (Some(turn), None) => write!(f, "turn {turn}"),
            _ => write!(f, "another process that is starting a turn"),
        }
    }
}

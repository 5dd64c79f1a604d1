//! The context store of upstream: turns, their steps and artifacts, grouped in contexts.
//!
//! Every `upstream run doc.md` is a *turn* in a *context* (by default the document's folder,
//! see [`default_context_name`]). A turn's artifacts are stored here, and the next turn of
//! the same context starts with the latest version of each ([`ContextStore::manifest`],
//! [`ContextStore::export_context`]).
//!
//! Callers program against [`ContextStore`] (records) and [`BlobStore`] (content-addressed
//! bytes). [`LocalStore`] implements them with SQLite and a blob folder under the user's data
//! directory; its documentation describes the files, the locking and the gc protocol.
//!
//! # Known limitations
//!
//! - Lock files under `locks/` are never deleted, not even by `remove_context`, because
//!   deleting a lock file that another process has open would split the lock in two.
//! - Context locks are `flock(2)` locks, which serialise turns between processes of one
//!   machine. They are not meant to coordinate hosts that share the store over NFS.
//! - A later turn cannot delete an artifact name that an earlier turn stored; it can only
//!   store a new version.
//!
//! A turn's life:
//!
//! ```no_run
//! use upstream_store::{
//!     BeginOptions, ContextStore, Digest, DocumentInfo, LocalStore, StepInput, StepState,
//!     TurnOutcome,
//! };
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = LocalStore::open("/var/lib/upstream".as_ref())?;
//! let document = DocumentInfo {
//!     path: "/work/research.md".into(),
//!     sha256: Digest::of(b"..."),
//!     image: Some("python:3.12".into()),
//!     image_digest: None,
//! };
//! let turn = store.begin_turn("/work", &document, &BeginOptions::default())?;
//! let step = StepInput {
//!     index: 0,
//!     label: None,
//!     command: "python analyze.py".into(),
//!     exit_code: Some(0),
//!     duration: Duration::from_millis(1400),
//!     state: StepState::Succeeded,
//!     keep_full_output: false,
//! };
//! store.record_step(&turn, &step, &mut &b"Found 847 records\n"[..])?;
//! store.add_artifact(&turn, "out/summary.csv", 0o644, &mut &b"mean,42.3\n"[..])?;
//! store.finish_turn(turn, TurnOutcome::Succeeded)?;
//! # Ok(())
//! # }
//! ```

mod blob;
mod context;
mod error;
mod local;
mod lock;
mod names;
mod records;
mod schema;
mod sql;

pub use blob::{BlobRef, BlobStore, Digest, FsBlobStore, TempSweep};
pub use context::{ContextStore, TurnGuard, TurnLease, WORKSPACE_SNAPSHOT_FILE_NAME};
pub use error::{LockHolder, Result, StoreError};
pub use local::{default_data_dir, LocalStore};
pub use names::{
    default_context_name, validate_artifact_name, validate_context_name, MAX_NAME_BYTES,
};
pub use records::{
    ArtifactContent, ArtifactRecord, BeginOptions, ContextDetail, ContextManifest, ContextSummary,
    DocumentInfo, ExportReport, GcReport, Limits, ManifestArtifact, RemovedContext, StepInput,
    StepRecord, StepState, Timestamp, TurnDetail, TurnId, TurnOutcome, TurnRecord, TurnState,
    VisibleArtifact, WorkspaceSnapshot, ARTIFACTS_FOLDER, MANIFEST_FILE_NAME,
    MANIFEST_FORMAT_VERSION,
};

//! Records of the store and the inputs that create them.

use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::blob::{BlobRef, Digest};
use crate::error::{Result, StoreError};

/// Identifier of a turn: `t-` followed by a ULID, so ids sort by creation time to the
/// millisecond and are unique without coordination between processes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TurnId(String);

impl TurnId {
    /// Generates a new id from the current time and 80 random bits.
    pub fn generate() -> TurnId {
        TurnId(format!("t-{}", ulid::Ulid::new()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TurnId {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<TurnId> {
        match text.strip_prefix("t-").map(ulid::Ulid::from_string) {
            Some(Ok(ulid)) => Ok(TurnId(format!("t-{ulid}"))),
            _ => Err(StoreError::InvalidTurnId(text.to_owned())),
        }
    }
}

impl TryFrom<String> for TurnId {
    type Error = StoreError;

    fn try_from(text: String) -> Result<TurnId> {
        text.parse()
    }
}

impl From<TurnId> for String {
    fn from(id: TurnId) -> String {
        id.0
    }
}

impl fmt::Display for TurnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A point in time with millisecond precision, serialised as RFC 3339 in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    unix_ms: i64,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::from(SystemTime::now())
    }

    pub fn from_unix_ms(unix_ms: i64) -> Timestamp {
        Timestamp { unix_ms }
    }

    pub fn unix_ms(self) -> i64 {
        self.unix_ms
    }

    pub fn to_system_time(self) -> SystemTime {
        if self.unix_ms >= 0 {
            UNIX_EPOCH + Duration::from_millis(self.unix_ms as u64)
        } else {
            UNIX_EPOCH - Duration::from_millis(self.unix_ms.unsigned_abs())
        }
    }
}

impl From<SystemTime> for Timestamp {
    fn from(time: SystemTime) -> Timestamp {
        let unix_ms = match time.duration_since(UNIX_EPOCH) {
            Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
        };
        Timestamp { unix_ms }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            humantime::format_rfc3339_millis(self.to_system_time())
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_rfc3339(&text)
            .map(Timestamp::from)
            .map_err(serde::de::Error::custom)
    }
}

/// Lifecycle state of a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnState {
    Running,
    Succeeded,
    Failed,
    /// The owning process ended, or dropped its [`TurnGuard`](crate::TurnGuard), before
    /// finishing the turn.
    Interrupted,
}

impl TurnState {
    pub fn as_str(self) -> &'static str {
        match self {
            TurnState::Running => "running",
            TurnState::Succeeded => "succeeded",
            TurnState::Failed => "failed",
            TurnState::Interrupted => "interrupted",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<TurnState> {
        [
            TurnState::Running,
            TurnState::Succeeded,
            TurnState::Failed,
            TurnState::Interrupted,
        ]
        .into_iter()
        .find(|state| state.as_str() == text)
    }
}

impl fmt::Display for TurnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Final state passed to [`ContextStore::finish_turn`](crate::ContextStore::finish_turn).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TurnOutcome {
    Succeeded,
    Failed,
    Interrupted,
}

impl From<TurnOutcome> for TurnState {
    fn from(outcome: TurnOutcome) -> TurnState {
        match outcome {
            TurnOutcome::Succeeded => TurnState::Succeeded,
            TurnOutcome::Failed => TurnState::Failed,
            TurnOutcome::Interrupted => TurnState::Interrupted,
        }
    }
}

/// Outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Succeeded,
    Failed,
    TimedOut,
    /// Not run, because an earlier step failed or the turn was stopped.
    Skipped,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::TimedOut => "timed_out",
            StepState::Skipped => "skipped",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<StepState> {
        [
            StepState::Succeeded,
            StepState::Failed,
            StepState::TimedOut,
            StepState::Skipped,
        ]
        .into_iter()
        .find(|state| state.as_str() == text)
    }
}

/// The document a turn runs, passed to [`ContextStore::begin_turn`](crate::ContextStore::begin_turn).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentInfo {
    /// Path of the Markdown document. It is recorded for display, so a path that is not UTF-8
    /// is stored with replacement characters.
    pub path: PathBuf,
    pub sha256: Digest,
    /// OCI image reference from the front matter, such as `python:3.12`.
    pub image: Option<String>,
    /// Manifest digest of the image, when already resolved; see
    /// [`ContextStore::set_image_digest`](crate::ContextStore::set_image_digest).
    pub image_digest: Option<String>,
}

/// Options of [`ContextStore::begin_turn`](crate::ContextStore::begin_turn).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BeginOptions {
    /// How long to wait for another turn of the same context to end. `None` fails at once
    /// with [`StoreError::ContextBusy`].
    pub wait: Option<Duration>,
}

/// A step to record, passed to [`ContextStore::record_step`](crate::ContextStore::record_step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepInput {
    /// Position of the step in the document, from 0. Recording an index again replaces it.
    pub index: u32,
    pub label: Option<String>,
    pub command: String,
    /// Exit code, absent when the step was skipped or killed by a signal.
    pub exit_code: Option<i32>,
    pub duration: Duration,
    pub state: StepState,
    /// Whether to store the whole output as a blob when it exceeds
    /// [`Limits::max_step_output_bytes`]. The bounded tail is stored either way.
    pub keep_full_output: bool,
}

/// A recorded step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub index: u32,
    pub label: Option<String>,
    pub command: String,
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    pub state: StepState,
    /// Last [`Limits::max_step_output_bytes`] bytes of the combined output, decoded as UTF-8
    /// with replacement characters for invalid sequences.
    pub output: String,
    /// Bytes cut from the start of the output to stay within the bound.
    pub truncated_bytes: u64,
    /// Blob of the whole output, when it was truncated and the step set `keep_full_output`.
    pub full_output: Option<BlobRef>,
}

/// A stored artifact of one turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// Relative path of the file, with `/` separators.
    pub name: String,
    pub size: u64,
    pub sha256: Digest,
    /// Unix permission bits (`st_mode & 0o7777`).
    pub mode: u32,
}

/// A turn as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnRecord {
    pub id: TurnId,
    pub context: String,
    pub document_path: String,
    pub document_sha256: Digest,
    pub image: Option<String>,
    pub image_digest: Option<String>,
    pub started_at: Timestamp,
    /// When the turn finished. Absent while running, and for a turn whose process died: the
    /// store notices that only later and does not know the time of death.
    pub ended_at: Option<Timestamp>,
    pub state: TurnState,
    /// Host process id of the `upstream` process that ran the turn.
    pub host_pid: u32,
    pub workspace_snapshot: Option<BlobRef>,
}

/// A turn with its steps and artifacts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnDetail {
    #[serde(flatten)]
    pub turn: TurnRecord,
    pub steps: Vec<StepRecord>,
    pub artifacts: Vec<ArtifactRecord>,
}

/// One line of [`ContextStore::list_contexts`](crate::ContextStore::list_contexts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextSummary {
    pub name: String,
    pub created_at: Timestamp,
    pub turn_count: u64,
    /// Artifacts that the next turn would see; see [`VisibleArtifact`].
    pub artifact_count: u64,
    pub last_turn: Option<TurnId>,
    /// Latest start or end time among the context's turns.
    pub last_used_at: Option<Timestamp>,
}

/// A context with every turn, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextDetail {
    pub name: String,
    pub created_at: Timestamp,
    pub turns: Vec<TurnDetail>,
}

/// The latest version of an artifact name across the finished turns of a context.
///
/// Only succeeded and failed turns count. Interrupted turns are left out because their
/// artifact set may be incomplete, and running turns have not produced their artifacts yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisibleArtifact {
    pub name: String,
    pub size: u64,
    pub sha256: Digest,
    pub mode: u32,
    /// Turn that produced this version.
    pub turn: TurnId,
}

/// Version of the [`ContextManifest`] format; raised when a field changes meaning or goes.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

/// Name of the manifest file that [`ContextStore::export_context`](crate::ContextStore::export_context)
/// writes and that a turn receives.
pub const MANIFEST_FILE_NAME: &str = "turns.json";

/// Folder, relative to the manifest, that contains the visible artifacts by name.
pub const ARTIFACTS_FOLDER: &str = "artifacts";

/// Earlier turns of a context as handed to the next turn, serialised to `turns.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextManifest {
    pub format_version: u32,
    pub context: String,
    /// Finished and interrupted turns, oldest first. Running turns are left out.
    pub turns: Vec<TurnDetail>,
    /// Artifacts visible to the next turn, sorted by name.
    pub artifacts: Vec<ManifestArtifact>,
}

/// A visible artifact and where it lies next to the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestArtifact {
    pub name: String,
    /// Path relative to the folder of `turns.json`: `artifacts/<name>`.
    pub path: String,
    pub turn: TurnId,
    pub size: u64,
    pub sha256: Digest,
    pub mode: u32,
}

/// Bytes of an artifact, verified against its digest as they are read.
pub struct ArtifactContent {
    pub artifact: VisibleArtifact,
    pub reader: Box<dyn Read + Send>,
}

impl fmt::Debug for ArtifactContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArtifactContent")
            .field("artifact", &self.artifact)
            .finish_non_exhaustive()
    }
}

/// The archive of a turn's working directory, verified against its digest as it is read.
pub struct WorkspaceSnapshot {
    pub turn: TurnId,
    pub blob: BlobRef,
    pub reader: Box<dyn Read + Send>,
}

impl fmt::Debug for WorkspaceSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkspaceSnapshot")
            .field("turn", &self.turn)
            .field("blob", &self.blob)
            .finish_non_exhaustive()
    }
}

/// Limits on what one turn may store. Exceeding one fails the call with an error that names
/// the limit; nothing is dropped silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Size of one artifact, and of one step's full output. Default 1 GiB.
    pub max_artifact_bytes: u64,
    /// Artifacts per turn. Default 10,000.
    pub max_artifacts_per_turn: u64,
    /// Total size of one turn's artifacts; step output and the workspace snapshot do not
    /// count. Default 4 GiB.
    pub max_turn_bytes: u64,
    /// Output kept in the database per step; the tail is kept. Default 64 KiB.
    pub max_step_output_bytes: usize,
    /// Size of one workspace snapshot. Default 4 GiB.
    pub max_workspace_snapshot_bytes: u64,
}

const GIB: u64 = 1 << 30;

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_artifact_bytes: GIB,
            max_artifacts_per_turn: 10_000,
            max_turn_bytes: 4 * GIB,
            max_step_output_bytes: 64 * 1024,
            max_workspace_snapshot_bytes: 4 * GIB,
        }
    }
}

/// Summary of the files that [`ContextStore::export_context`](crate::ContextStore::export_context)
/// wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportReport {
    pub folder: PathBuf,
    pub artifacts: u64,
    pub artifact_bytes: u64,
    /// Whether `workspace.tar` was written.
    pub workspace_snapshot: bool,
}

/// Counts of the records that [`ContextStore::remove_context`](crate::ContextStore::remove_context)
/// deleted. The blobs stay until the next [`ContextStore::gc`](crate::ContextStore::gc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedContext {
    pub turns: u64,
    pub artifacts: u64,
}

/// Counts and bytes of the files that [`ContextStore::gc`](crate::ContextStore::gc) deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub blobs_removed: u64,
    pub blob_bytes_freed: u64,
    pub temp_files_removed: u64,
    pub temp_bytes_freed: u64,
}

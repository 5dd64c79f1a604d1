//! The [`ContextStore`] trait that callers program against, and the [`TurnGuard`] it hands out.

use std::fmt;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::blob::{BlobRef, BlobStore};
use crate::error::{Result, StoreError};
use crate::records::{
    ArtifactContent, ArtifactRecord, BeginOptions, ContextDetail, ContextManifest, ContextSummary,
    DocumentInfo, ExportReport, GcReport, RemovedContext, StepInput, StepRecord, TurnId,
    TurnOutcome, TurnRecord, VisibleArtifact, WorkspaceSnapshot, MANIFEST_FILE_NAME,
};

/// File name of the workspace snapshot in an exported folder.
pub const WORKSPACE_SNAPSHOT_FILE_NAME: &str = "workspace.tar";

/// Metadata and contents of contexts, turns, steps and artifacts.
///
/// This trait is what callers use; [`LocalStore`](crate::LocalStore) implements it with SQLite
/// and a blob folder, and a server implementation (PostgreSQL and S3-compatible storage) can
/// implement it without changes to callers. Calls block, so async callers run them in
/// `spawn_blocking`.
pub trait ContextStore: Send + Sync {
    /// Starts a turn in `context`, creating the context on first use.
    ///
    /// Takes the context's lock for the life of the returned guard, so turns of one context
    /// run one at a time. A turn whose process died while holding the lock is marked
    /// [`Interrupted`](crate::TurnState::Interrupted) here, and listed by
    /// [`TurnGuard::interrupted_turns`]. When another live turn holds the lock, fails with
    /// [`StoreError::ContextBusy`], or waits up to `options.wait` and then fails with
    /// [`StoreError::ContextWaitTimedOut`].
    fn begin_turn(
        &self,
        context: &str,
        document: &DocumentInfo,
        options: &BeginOptions,
    ) -> Result<TurnGuard>;

    /// Records the manifest digest of the turn's image once it is resolved.
    fn set_image_digest(&self, turn: &TurnGuard, image_digest: &str) -> Result<()>;

    /// Records a step, reading its combined output from `output` to the end.
    ///
    /// Keeps the last [`Limits::max_step_output_bytes`](crate::Limits) bytes in the record and
    /// counts the bytes cut before them in `truncated_bytes`. With `keep_full_output`, the
    /// whole output is also stored as a blob when it was truncated.
    fn record_step(
        &self,
        turn: &TurnGuard,
        step: &StepInput,
        output: &mut dyn Read,
    ) -> Result<StepRecord>;

    /// Stores an artifact of the turn, reading `contents` to the end. `name` is a relative
    /// path (see [`validate_artifact_name`](crate::validate_artifact_name)); storing a name
    /// again in the same turn replaces the earlier version.
    fn add_artifact(
        &self,
        turn: &TurnGuard,
        name: &str,
        mode: u32,
        contents: &mut dyn Read,
    ) -> Result<ArtifactRecord>;

    /// Stores a tar archive of the turn's working directory, replacing an earlier one.
    fn set_workspace_snapshot(&self, turn: &TurnGuard, archive: &mut dyn Read) -> Result<BlobRef>;

    /// Ends the turn with `outcome` and releases the context's lock.
    fn finish_turn(&self, turn: TurnGuard, outcome: TurnOutcome) -> Result<TurnRecord>;

    /// Deletes a running turn with its steps and artifacts and releases the context's
    /// lock, so the next turn starts as if it had never run (a check run). The context
    /// stays, even when it has no turns left. Blobs are freed by the next
    /// [`ContextStore::gc`].
    fn discard_turn(&self, turn: TurnGuard) -> Result<()>;

    /// Lists every context, sorted by name.
    fn list_contexts(&self) -> Result<Vec<ContextSummary>>;

    /// Returns a context with all its turns, steps and artifacts.
    fn context(&self, name: &str) -> Result<ContextDetail>;

    /// Returns the artifacts that the next turn of `context` starts with, sorted by name.
    fn visible_artifacts(&self, context: &str) -> Result<Vec<VisibleArtifact>>;

    /// Returns the earlier turns of `context` and its visible artifacts, ready to be written
    /// as `turns.json`. Turn records and artifacts come from one consistent read.
    fn manifest(&self, context: &str) -> Result<ContextManifest>;

    /// Returns the blob storage behind this store.
    fn blobs(&self) -> &dyn BlobStore;

    /// Deletes a context with its turns, steps and artifact records. Fails with
    /// [`StoreError::ContextBusy`] while a turn of the context runs. Blobs are freed by the
    /// next [`ContextStore::gc`].
    fn remove_context(&self, context: &str) -> Result<RemovedContext>;

    /// Deletes blobs that no record references and temp files of writers that have ended.
    /// Safe to run while other processes use the store.
    fn gc(&self) -> Result<GcReport>;

    /// Returns the latest workspace snapshot of a succeeded or failed turn of `context`.
    fn latest_workspace_snapshot(&self, context: &str) -> Result<Option<WorkspaceSnapshot>>;

    /// Opens the visible version of artifact `name` of `context`.
    fn get_artifact(&self, context: &str, name: &str) -> Result<ArtifactContent> {
        let artifact = self
            .visible_artifacts(context)?
            .into_iter()
            .find(|artifact| artifact.name == name)
            .ok_or_else(|| StoreError::ArtifactNotFound {
                context: context.to_owned(),
                name: name.to_owned(),
            })?;
        let reader = self.blobs().open(&artifact.sha256)?;
        Ok(ArtifactContent { artifact, reader })
    }

    /// Writes the visible artifacts of `context` under `folder/artifacts/`, byte for byte and
    /// with their permission bits, the manifest as `folder/turns.json`, and the latest
    /// workspace snapshot as `folder/workspace.tar`.
    ///
    /// `folder` must be missing or empty, so an export never overwrites a file. Every blob is
    /// verified against its digest while it is copied.
    ///
    /// NOTE: an artifact named like a folder of another (`a` beside `a/b`, from different
    /// turns) fails the export with an I/O error on the second one.
    fn export_context(&self, context: &str, folder: &Path) -> Result<ExportReport> {
        prepare_export_folder(folder)?;
        let manifest = self.manifest(context)?;
        let mut report = ExportReport {
            folder: folder.to_owned(),
            artifacts: 0,
            artifact_bytes: 0,
            workspace_snapshot: false,
        };

        for artifact in &manifest.artifacts {
            let dest = folder.join(&artifact.path);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)
                    .map_err(|source| StoreError::io("create", parent, source))?;
            }
            let mut reader = self.blobs().open(&artifact.sha256)?;
            write_new_file(&dest, &mut reader, artifact.mode & 0o777)?;
            report.artifacts += 1;
            report.artifact_bytes += artifact.size;
        }

        if let Some(mut snapshot) = self.latest_workspace_snapshot(context)? {
            let dest = folder.join(WORKSPACE_SNAPSHOT_FILE_NAME);
            write_new_file(&dest, &mut snapshot.reader, 0o644)?;
            report.workspace_snapshot = true;
        }

        let json = serde_json::to_vec_pretty(&manifest).map_err(|source| StoreError::Json {
            context: context.to_owned(),
            source,
        })?;
        let dest = folder.join(MANIFEST_FILE_NAME);
        write_new_file(&dest, &mut json.as_slice(), 0o644)?;
        Ok(report)
    }
}

/// Backend-specific hold on a context for the life of a turn.
///
/// Dropping it must release the context, and must mark the turn interrupted if it is still
/// running, so that a caller that returns early through `?` leaves no running turn behind.
pub trait TurnLease: Send + Sync {}

/// A running turn and its hold on the context. Pass it to
/// [`ContextStore::finish_turn`]; dropping it instead marks the turn interrupted.
pub struct TurnGuard {
    id: TurnId,
    context: String,
    interrupted_turns: Vec<TurnId>,
    // Declared last so that it drops after the fields above; it releases the context.
    _lease: Box<dyn TurnLease>,
}

impl TurnGuard {
    /// Builds a guard; for implementations of [`ContextStore`].
    pub fn new(
        id: TurnId,
        context: String,
        interrupted_turns: Vec<TurnId>,
        lease: Box<dyn TurnLease>,
    ) -> TurnGuard {
        TurnGuard {
            id,
            context,
            interrupted_turns,
            _lease: lease,
        }
    }

    pub fn id(&self) -> &TurnId {
        &self.id
    }

    pub fn context(&self) -> &str {
        &self.context
    }

    /// Turns of this context whose process had died while running them, marked interrupted
    /// when this turn began.
    pub fn interrupted_turns(&self) -> &[TurnId] {
        &self.interrupted_turns
    }
}

impl fmt::Debug for TurnGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TurnGuard")
            .field("id", &self.id)
            .field("context", &self.context)
            .field("interrupted_turns", &self.interrupted_turns)
            .finish_non_exhaustive()
    }
}

fn prepare_export_folder(folder: &Path) -> Result<()> {
    match fs::read_dir(folder) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(StoreError::ExportFolderNotEmpty(folder.to_owned()));
            }
            Ok(())
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(folder).map_err(|source| StoreError::io("create", folder, source))
        }
        Err(source) => Err(StoreError::io("open", folder, source)),
    }
}

/// Copies `contents` into a new file; removes the partial file when the copy fails, for
/// example because a blob does not match its digest.
fn write_new_file(path: &Path, contents: &mut dyn Read, mode: u32) -> Result<()> {
    let mut file: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| StoreError::io("create", path, source))?;

    let copied = io::copy(contents, &mut file)
        .and_then(|_| file.set_permissions(Permissions::from_mode(mode)));
    if let Err(source) = copied {
        drop(file);
        let _ = fs::remove_file(path);
        return Err(corrupt_blob_or_io(source, path));
    }
    Ok(())
}

/// Unwraps the [`StoreError::CorruptBlob`] that a blob reader reports inside an `io::Error`.
fn corrupt_blob_or_io(source: io::Error, path: &Path) -> StoreError {
    match source.downcast::<StoreError>() {
        Ok(inner) => inner,
        Err(source) => StoreError::io("write", path, source),
    }
}

//! Moving context and artifacts between the store and the sandbox.
//!
//! Everything that comes from the guest is untrusted: file names are checked with
//! [`validate_artifact_name`], folder walks and downloads are bounded, and files reach the
//! host only as store blobs, never under a path the guest chose.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Seek, SeekFrom};

use upstream_protocol::DirEntry;
use upstream_store::{
    validate_artifact_name, ContextStore, StoreError, TurnGuard, ARTIFACTS_FOLDER,
    MANIFEST_FILE_NAME,
};
use upstream_vmm::Sandbox;

use crate::error::{temp_file_error, TurnError};
use crate::guest::{self, ARTIFACTS_DIR, CONTEXT_DIR, WORKSPACE_ARCHIVE};
use crate::io::{BlockingReader, BoundedFile, OVER_LIMIT};

/// Longest time one download from the guest may take. The guest's background processes
/// are stopped before collection, so files no longer change, but a hostile guest agent
/// could still stall a transfer.
const DOWNLOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Folders deeper than this under `$UPSTREAM_ARTIFACTS` are not walked.
const MAX_DEPTH: usize = 32;

/// Limits on what one turn collects from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArtifactLimits {
    /// Largest artifact downloaded from the guest, in bytes.
    pub max_artifact_bytes: u64,
    /// Most artifacts collected per turn. Files found beyond it are reported, not stored.
    pub max_artifacts: usize,
    /// Largest workspace archive downloaded for `carry: workspace`, in bytes.
    pub max_workspace_bytes: u64,
}

impl Default for ArtifactLimits {
    /// Matches the default limits of the local store.
    fn default() -> Self {
        let store = upstream_store::Limits::default();
        ArtifactLimits {
            max_artifact_bytes: store.max_artifact_bytes,
            max_artifacts: usize::try_from(store.max_artifacts_per_turn).unwrap_or(usize::MAX),
            max_workspace_bytes: store.max_workspace_snapshot_bytes,
        }
    }
}

/// What was put under `$UPSTREAM_CONTEXT`.
pub(crate) struct LoadedContext {
    pub artifacts: usize,
    pub turns: usize,
}

/// Uploads the context's `turns.json` and visible artifacts into [`CONTEXT_DIR`].
pub(crate) async fn load_context(
    store: &dyn ContextStore,
    sandbox: &Sandbox,
    context: &str,
) -> Result<LoadedContext, TurnError> {
    let manifest = store.manifest(context)?;
    for artifact in &manifest.artifacts {
        // The store built this path from a validated name; check again before it names a
        // guest path, because a damaged database could hold anything.
        validate_artifact_name(&artifact.name)?;
        let reader = store.blobs().open(&artifact.sha256)?;
        let path = format!("{CONTEXT_DIR}/{ARTIFACTS_FOLDER}/{}", artifact.name);
        sandbox
            .agent()
            .write_file(&path, artifact.mode & 0o777, BlockingReader(reader))
            .await?;
    }
    let json = serde_json::to_vec_pretty(&manifest).map_err(|source| StoreError::Json {
        context: context.to_owned(),
        source,
    })?;
    let path = format!("{CONTEXT_DIR}/{MANIFEST_FILE_NAME}");
    sandbox
        .agent()
        .write_file(&path, 0o644, json.as_slice())
        .await?;
    guest::seal_context(sandbox).await?;
    Ok(LoadedContext {
        artifacts: manifest.artifacts.len(),
        turns: manifest.turns.len(),
    })
}

/// Restores the latest workspace snapshot of `context` into `workdir`. Returns whether
/// there was one.
pub(crate) async fn restore_workspace(
    store: &dyn ContextStore,
    sandbox: &Sandbox,
    context: &str,
    workdir: &str,
) -> Result<bool, TurnError> {
    let Some(snapshot) = store.latest_workspace_snapshot(context)? else {
        return Ok(false);
    };
    sandbox
        .agent()
        .write_file(WORKSPACE_ARCHIVE, 0o600, BlockingReader(snapshot.reader))
        .await?;
    guest::unpack_workspace(sandbox, workdir).await?;
    Ok(true)
}

/// Archives `workdir` in the guest and stores it as the turn's workspace snapshot.
pub(crate) async fn save_workspace(
    store: &dyn ContextStore,
    sandbox: &Sandbox,
    turn: &TurnGuard,
    workdir: &str,
    limit: u64,
) -> Result<(), String> {
    guest::pack_workspace(sandbox, workdir)
        .await
        .map_err(|error| error.to_string())?;
    let mut file = download(sandbox, WORKSPACE_ARCHIVE, limit)
        .await
        .map_err(|reason| format!("Workspace snapshot not saved: {reason}"))?;
    store
        .set_workspace_snapshot(turn, &mut file)
        .map_err(|error| format!("Workspace snapshot not saved: {error}"))?;
    Ok(())
}

/// A file in the guest to store as an artifact.
struct Candidate {
    guest_path: String,
    mode: u32,
}

/// Collects the turn's artifacts: files under [`ARTIFACTS_DIR`] and files matching
/// `globs` in `workdir`. Returns the number stored; every file that was found but not
/// stored gets a message in `warnings`.
pub(crate) async fn collect(
    store: &dyn ContextStore,
    sandbox: &Sandbox,
    turn: &TurnGuard,
    workdir: &str,
    globs: &[String],
    limits: &ArtifactLimits,
    warnings: &mut Vec<String>,
) -> Result<usize, TurnError> {
    let mut candidates: BTreeMap<String, Candidate> = BTreeMap::new();
    if !globs.is_empty() {
        for (name, candidate) in glob_candidates(sandbox, workdir, globs, warnings).await? {
            candidates.insert(name, candidate);
        }
    }
    // Files in the artifacts folder win over glob matches of the same name.
    let mut walk = Walk {
        sandbox,
        found: Vec::new(),
        listed: 0,
        limit: limits.max_artifacts.saturating_add(1),
    };
    walk.folder(ARTIFACTS_DIR, "", 0, warnings).await?;
    for (name, candidate) in walk.found {
        candidates.insert(name, candidate);
    }

    let found = candidates.len();
    if found > limits.max_artifacts {
        warnings.push(format!(
            "Found more than {} artifacts; only the first {} by name are stored. Pack the \
             files into one archive to keep them all",
            limits.max_artifacts, limits.max_artifacts
        ));
    }
    let mut stored = 0;
    for (name, candidate) in candidates.into_iter().take(limits.max_artifacts) {
        match store_one(store, sandbox, turn, &name, &candidate, limits).await {
            Ok(()) => stored += 1,
            Err(reason) => warnings.push(format!("Artifact '{name}' not saved: {reason}")),
        }
    }
    Ok(stored)
}

async fn store_one(
    store: &dyn ContextStore,
    sandbox: &Sandbox,
    turn: &TurnGuard,
    name: &str,
    candidate: &Candidate,
    limits: &ArtifactLimits,
) -> Result<(), String> {
    let mut file = download(sandbox, &candidate.guest_path, limits.max_artifact_bytes).await?;
    store
        .add_artifact(turn, name, candidate.mode & 0o7777, &mut file)
        .map_err(|error| error.to_string())?;
    Ok(())
}

/// Downloads a guest file into an unlinked host temp file, rewound for reading.
async fn download(sandbox: &Sandbox, path: &str, limit: u64) -> Result<std::fs::File, String> {
    let temp = tempfile::tempfile()
        .map_err(temp_file_error("create"))
        .map_err(|error| error.to_string())?;
    let mut sink = BoundedFile::new(temp, limit);
    let transfer = sandbox.agent().read_file(path, &mut sink);
    let Ok(result) = tokio::time::timeout(DOWNLOAD_TIMEOUT, transfer).await else {
        return Err(format!(
            "the download did not finish within {}s",
            DOWNLOAD_TIMEOUT.as_secs()
        ));
    };
    if let Err(error) = result {
        if is_over_limit(&error) {
            return Err(format!(
                "it is larger than the limit of {limit} bytes; leave it out or compress it"
            ));
        }
        return Err(error.to_string());
    }
    let mut file = sink.file;
    file.seek(SeekFrom::Start(0))
        .map_err(|error| format!("rewinding a temp file failed: {error}"))?;
    Ok(file)
}

fn is_over_limit(error: &upstream_vmm::Error) -> bool {
    use std::error::Error;
    error
        .source()
        .is_some_and(|source| source.to_string() == OVER_LIMIT)
}

/// Expands the glob patterns in the guest and turns the matches into candidates.
async fn glob_candidates(
    sandbox: &Sandbox,
    workdir: &str,
    globs: &[String],
    warnings: &mut Vec<String>,
) -> Result<Vec<(String, Candidate)>, TurnError> {
    let paths = guest::expand_globs(sandbox, workdir, globs).await?;
    let mut seen = HashSet::new();
    let mut folders: HashMap<String, Vec<DirEntry>> = HashMap::new();
    let mut candidates = Vec::new();
    for path in paths {
        let name = path.trim_start_matches("./").to_owned();
        if let Err(error) = validate_artifact_name(&name) {
            warnings.push(format!("Artifact not saved: {error}"));
            continue;
        }
        if !seen.insert(name.clone()) {
            continue;
        }
        let (folder, file_name) = match name.rsplit_once('/') {
            Some((folder, file_name)) => (format!("{workdir}/{folder}"), file_name),
            None => (workdir.to_owned(), name.as_str()),
        };
        if !folders.contains_key(&folder) {
            let entries = sandbox.agent().list_dir(&folder).await.unwrap_or_default();
            folders.insert(folder.clone(), entries);
        }
        let entry = folders[&folder]
            .iter()
            .find(|entry| entry.name == file_name && is_regular_file(entry.mode));
        if let Some(entry) = entry {
            let guest_path = format!("{folder}/{file_name}");
            candidates.push((
                name,
                Candidate {
                    guest_path,
                    mode: entry.mode,
                },
            ));
        }
    }
    Ok(candidates)
}

/// Whether an `st_mode` value is that of a regular file; a FIFO or device could block a
/// download forever.
fn is_regular_file(mode: u32) -> bool {
    const FILE_TYPE_MASK: u32 = 0o170_000;
    const REGULAR_FILE: u32 = 0o100_000;
    mode & FILE_TYPE_MASK == REGULAR_FILE
}

/// A bounded walk of the artifacts folder through the agent's directory listings.
struct Walk<'a> {
    sandbox: &'a Sandbox,
    found: Vec<(String, Candidate)>,
    listed: usize,
    limit: usize,
}

impl Walk<'_> {
    async fn folder(
        &mut self,
        path: &str,
        prefix: &str,
        depth: usize,
        warnings: &mut Vec<String>,
    ) -> Result<(), TurnError> {
        let entries = self.sandbox.agent().list_dir(path).await?;
        for entry in entries {
            if self.listed >= self.limit {
                return Ok(());
            }
            let name = format!("{prefix}{}", entry.name);
            if let Err(error) = validate_artifact_name(&name) {
                warnings.push(format!("Artifact not saved: {error}"));
                continue;
            }
            let guest_path = format!("{path}/{}", entry.name);
            if entry.is_symlink {
                warnings.push(format!(
                    "Artifact '{name}' not saved: it is a symbolic link; copy the file instead"
                ));
            } else if entry.is_dir {
                if depth + 1 >= MAX_DEPTH {
                    warnings.push(format!(
                        "Artifacts under '{name}' not saved: folders nest deeper than \
                         {MAX_DEPTH} levels"
                    ));
                    continue;
                }
                Box::pin(self.folder(&guest_path, &format!("{name}/"), depth + 1, warnings))
                    .await?;
            } else if !is_regular_file(entry.mode) {
                warnings.push(format!(
                    "Artifact '{name}' not saved: it is not a regular file"
                ));
            } else {
                self.listed += 1;
                self.found.push((
                    name,
                    Candidate {
                        guest_path,
                        mode: entry.mode,
                    },
                ));
            }
        }
        Ok(())
    }
}

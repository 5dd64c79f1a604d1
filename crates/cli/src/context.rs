//! `upstream context`: list, inspect, export and remove the contexts of the store.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use upstream_store::{ContextStore, LocalStore, StoreError, TurnDetail};
use upstream_vmm::DataDir;

use crate::exit::{Exit, Failure};
use crate::terminal::{format_bytes, format_duration};

#[derive(Subcommand)]
pub enum ContextCommand {
    /// List contexts: name, turns, artifacts and last use.
    Ls {
        /// Print the list as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Show a context's turns, their steps and exit codes, and its artifacts.
    Show {
        /// Context name, or a folder whose documents use it by default.
        name: String,
        /// Print the context as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Write the latest version of an artifact to stdout or to a file.
    Get {
        /// Context name, or a folder whose documents use it by default.
        name: String,
        /// Artifact name, such as results.json or out/report.csv.
        artifact: String,
        /// Write to PATH instead of stdout.
        #[arg(long, short = 'o', value_name = "PATH")]
        output: Option<PathBuf>,
    },
    /// Write a context's artifacts, turns.json and workspace snapshot into a new folder.
    Export {
        /// Context name, or a folder whose documents use it by default.
        name: String,
        /// Folder to create; it must be missing or empty.
        dir: PathBuf,
    },
    /// Delete a context with its turns and artifact records; `gc` frees the blobs.
    Rm {
        /// Context name, or a folder whose documents use it by default.
        name: String,
    },
    /// Delete blobs that no context references any more.
    Gc,
}

pub async fn run(data: &DataDir, command: ContextCommand) -> anyhow::Result<u8> {
    let store = LocalStore::open(data.root())
        .with_context(|| format!("opening the context store in {}", data.root().display()))?;
    match command {
        ContextCommand::Ls { json } => list(&store, json)?,
        ContextCommand::Show { name, json } => show(&store, &resolve(&store, &name)?, json)?,
        ContextCommand::Get {
            name,
            artifact,
            output,
        } => get(
            &store,
            &resolve(&store, &name)?,
            &artifact,
            output.as_deref(),
        )?,
        ContextCommand::Export { name, dir } => {
            let report = store
                .export_context(&resolve(&store, &name)?, &dir)
                .map_err(store_failure)?;
            note!(
                "Exported {} artifact{} ({}){} to {}",
                report.artifacts,
                if report.artifacts == 1 { "" } else { "s" },
                format_bytes(report.artifact_bytes),
                if report.workspace_snapshot {
                    " and the workspace snapshot"
                } else {
                    ""
                },
                report.folder.display()
            );
        }
        ContextCommand::Rm { name } => {
            let name = resolve(&store, &name)?;
            let removed = store.remove_context(&name).map_err(store_failure)?;
            note!(
                "Removed context {name}: {} turns, {} artifacts; run `upstream context gc` \
                 to free their space",
                removed.turns,
                removed.artifacts
            );
        }
        ContextCommand::Gc => {
            let report = store.gc().map_err(store_failure)?;
            note!(
                "Removed {} blobs ({}) and {} temp files ({})",
                report.blobs_removed,
                format_bytes(report.blob_bytes_freed),
                report.temp_files_removed,
                format_bytes(report.temp_bytes_freed)
            );
        }
    }
    Ok(0)
}

/// Returns the context that `name` denotes: a context of that name, else the default
/// context of documents in the folder `name`, so `upstream context show .` works.
fn resolve(store: &LocalStore, name: &str) -> anyhow::Result<String> {
    let contexts = store.list_contexts().map_err(store_failure)?;
    if contexts.iter().any(|context| context.name == name) {
        return Ok(name.to_owned());
    }
    let folder = Path::new(name);
    if folder.is_dir() {
        if let Some(canonical) = folder
            .canonicalize()
            .ok()
            .and_then(|path| path.to_str().map(str::to_owned))
        {
            if contexts.iter().any(|context| context.name == canonical) {
                return Ok(canonical);
            }
        }
    }
    Err(store_failure(StoreError::ContextNotFound(name.to_owned())))
}

fn list(store: &LocalStore, json: bool) -> anyhow::Result<()> {
    let contexts = store.list_contexts().map_err(store_failure)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&contexts)?);
        return Ok(());
    }
    println!(
        "{:<48} {:>5} {:>9}  LAST USED",
        "CONTEXT", "TURNS", "ARTIFACTS"
    );
    for context in contexts {
        let last_used = context
            .last_used_at
            .map_or_else(|| "never".to_owned(), |time| time.to_string());
        println!(
            "{:<48} {:>5} {:>9}  {last_used}",
            context.name, context.turn_count, context.artifact_count
        );
    }
    Ok(())
}

fn show(store: &LocalStore, name: &str, json: bool) -> anyhow::Result<()> {
    let detail = store.context(name).map_err(store_failure)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&detail)?);
        return Ok(());
    }
    println!("Context {}", detail.name);
    for turn in &detail.turns {
        print_turn(turn);
    }
    let visible = store.visible_artifacts(name).map_err(store_failure)?;
    println!();
    println!("Artifacts for the next turn: {}", visible.len());
    for artifact in visible {
        println!(
            "  {:<40} {:>10}  sha256:{}  from {}",
            artifact.name,
            format_bytes(artifact.size),
            &artifact.sha256.to_hex()[..12],
            artifact.turn
        );
    }
    Ok(())
}

fn print_turn(detail: &TurnDetail) {
    let turn = &detail.turn;
    println!();
    println!("Turn {} {} ({})", turn.id, turn.state, turn.document_path);
    println!(
        "  image {}{}",
        turn.image.as_deref().unwrap_or("-"),
        turn.image_digest
            .as_deref()
            .map_or_else(String::new, |digest| format!(" ({digest})"))
    );
    let ended = turn
        .ended_at
        .map_or_else(|| "-".to_owned(), |time| time.to_string());
    println!("  started {}, ended {ended}", turn.started_at);
    for step in &detail.steps {
        let exit = step
            .exit_code
            .map_or_else(|| "-".to_owned(), |code| code.to_string());
        println!(
            "  step {:>3}  {:<10} exit {:>4} {:>8}  {}",
            step.index + 1,
            step.state.as_str(),
            exit,
            format_duration(std::time::Duration::from_millis(step.duration_ms)),
            step.label.as_deref().unwrap_or("")
        );
    }
    for artifact in &detail.artifacts {
        println!(
            "  artifact {} ({})",
            artifact.name,
            format_bytes(artifact.size)
        );
    }
}

fn get(
    store: &LocalStore,
    name: &str,
    artifact: &str,
    output: Option<&Path>,
) -> anyhow::Result<()> {
    let mut content = store.get_artifact(name, artifact).map_err(store_failure)?;
    match output {
        None => {
            let mut stdout = io::stdout().lock();
            match io::copy(&mut content.reader, &mut stdout).and_then(|_| stdout.flush()) {
                Ok(()) => Ok(()),
                // A closed pipe, as in `| head`, is not an error.
                Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(()),
                Err(error) => Err(error).context("writing the artifact to stdout"),
            }
        }
        Some(path) => {
            let folder = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            let mut temp = tempfile::NamedTempFile::new_in(folder)
                .with_context(|| format!("creating a temp file in {}", folder.display()))?;
            io::copy(&mut content.reader, &mut temp)
                .with_context(|| format!("writing {}", path.display()))?;
            temp.persist(path)
                .with_context(|| format!("writing {}", path.display()))?;
            note!(
                "Wrote {} ({})",
                path.display(),
                format_bytes(content.artifact.size)
            );
            Ok(())
        }
    }
}

/// Converts a store error into a failure: unknown names are usage errors.
fn store_failure(error: StoreError) -> anyhow::Error {
    let exit = match error {
        StoreError::ContextNotFound(_)
        | StoreError::ArtifactNotFound { .. }
        | StoreError::InvalidContextName { .. }
        | StoreError::InvalidArtifactName { .. }
        | StoreError::ExportFolderNotEmpty(_) => Exit::Usage,
        StoreError::ContextBusy { .. } => Exit::ContextBusy,
        _ => Exit::SandboxFailed,
    };
    let message = error.to_string();
    anyhow::Error::new(error).context(Failure::new(exit, message))
}

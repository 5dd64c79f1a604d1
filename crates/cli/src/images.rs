//! `upstream image` and image resolution for sandboxes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::Context;
use clap::Subcommand;
use upstream_image::{ImageStore, LocalImage, PullProgress};
use upstream_vmm::DataDir;

use crate::exit::{Exit, Failure};
use crate::terminal::{format_bytes, StatusLine};

/// The image used when none is named: built by `upstream setup` from
/// Debian's packages.
pub const DEFAULT_IMAGE: &str = "base";

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Pull an image from its registry into the local cache.
    Pull {
        /// Image reference, such as python:3.12 or localhost:5000/app@sha256:...
        reference: String,
    },
    /// List cached images: reference, digest, size and last use.
    Ls,
    /// Remove a cached image.
    Rm { reference: String },
    /// Delete blobs and root file systems no image uses.
    Prune,
    /// Import an OCI layout folder or a `docker save` tarball.
    Import { path: PathBuf },
}

pub fn open_store(data: &DataDir) -> anyhow::Result<ImageStore> {
    ImageStore::open(&data.images())
        .with_context(|| format!("opening the image cache in {}", data.images().display()))
}

pub async fn run(data: &DataDir, command: ImageCommand) -> anyhow::Result<u8> {
    let store = open_store(data)?;
    match command {
        ImageCommand::Pull { reference } => {
            pull(&store, &reference).await?;
        }
        ImageCommand::Ls => list(&store)?,
        ImageCommand::Rm { reference } => {
            store.remove(&reference)?;
            note!("Removed {reference}");
        }
        ImageCommand::Prune => {
            let report = store.prune()?;
            note!(
                "Removed {} blobs and {} root file systems, freed {}",
                report.blobs_removed,
                report.rootfs_removed,
                format_bytes(report.bytes_freed)
            );
        }
        ImageCommand::Import { path } => {
            let images = store.import(&path)?;
            for image in images {
                println!("{}\t{}", image.reference, image.digest);
            }
        }
    }
    Ok(0)
}

fn list(store: &ImageStore) -> anyhow::Result<()> {
    println!(
        "{:<48} {:<19} {:>10}  LAST USED",
        "REFERENCE", "DIGEST", "SIZE"
    );
    for image in store.list()? {
        let digest = image
            .digest
            .strip_prefix("sha256:")
            .unwrap_or(&image.digest);
        println!(
            "{:<48} {:<19} {:>10}  {}",
            image.reference,
            format!("sha256:{}", &digest[..digest.len().min(12)]),
            format_bytes(image.size),
            ago(image.last_used)
        );
    }
    Ok(())
}

fn ago(time: SystemTime) -> String {
    match time.elapsed() {
        Ok(age) if age.as_secs() < 60 => "just now".into(),
        Ok(age) if age.as_secs() < 3600 => format!("{} minutes ago", age.as_secs() / 60),
        Ok(age) if age.as_secs() < 86_400 => format!("{} hours ago", age.as_secs() / 3600),
        Ok(age) => format!("{} days ago", age.as_secs() / 86_400),
        Err(_) => "just now".into(),
    }
}

/// The local image for `reference`, pulled first when it is not cached.
pub async fn resolve(data: &DataDir, reference: &str) -> anyhow::Result<LocalImage> {
    let store = open_store(data)?;
    if let Some(image) = store.get(reference)? {
        store.touch(&image);
        return Ok(image);
    }
    if reference == DEFAULT_IMAGE {
        return Err(Failure::new(
            Exit::NotReady,
            "The default image 'base' is missing; run `upstream setup` to build it",
        )
        .into());
    }
    pull(&store, reference).await
}

async fn pull(store: &ImageStore, reference: &str) -> anyhow::Result<LocalImage> {
    // A reference that cannot be valid fails before any "Pulling" line.
    upstream_image::check_reference(reference)?;
    let progress = PullLine::new(reference);
    match store.pull(reference, &progress).await {
        Ok(image) => {
            progress.line.finish("done");
            Ok(image)
        }
        Err(err) => {
            progress.line.finish("failed");
            Err(err.into())
        }
    }
}

/// Renders pull progress on one status line.
struct PullLine {
    line: StatusLine,
    layers: Mutex<HashMap<String, (u64, u64)>>,
}

impl PullLine {
    fn new(reference: &str) -> Self {
        Self {
            line: StatusLine::new(format!("Pulling {reference}")),
            layers: Mutex::default(),
        }
    }
}

impl PullProgress for PullLine {
    fn resolved(&self, _manifest_digest: &str, layers: &[(String, u64)]) {
        let mut known = self.layers.lock().unwrap();
        for (digest, size) in layers {
            known.insert(digest.clone(), (0, *size));
        }
    }

    fn layer_progress(&self, layer: &str, downloaded: u64, total: u64) {
        let (done, all, count) = {
            let mut known = self.layers.lock().unwrap();
            known.insert(layer.to_string(), (downloaded, total));
            let done: u64 = known.values().map(|(d, _)| d).sum();
            let all: u64 = known.values().map(|(_, t)| t).sum();
            (done, all, known.len())
        };
        self.line.update(&format!(
            "{} / {} ({count} layers)",
            format_bytes(done),
            format_bytes(all)
        ));
    }

    fn building_rootfs(&self) {
        self.line.update("building the root file system");
    }
}

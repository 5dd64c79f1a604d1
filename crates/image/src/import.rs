//! Importing OCI image layouts and `docker save` archives, for offline use.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::config::ConfigBlob;
use crate::index::{now_millis, IndexEntry};
use crate::reference::{canonical, parse};
use crate::unpack::{LayerFile, Unpacker};
use crate::{ImageError, ImageStore, LocalImage};

const OCI_INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// `index.json` of an OCI layout, and the image index blobs it may point to.
#[derive(Debug, Deserialize)]
struct OciIndex {
    manifests: Vec<OciDescriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciDescriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Debug, Deserialize)]
struct OciManifest {
    config: OciDescriptor,
    layers: Vec<OciDescriptor>,
}

/// One image of a `docker save` archive's `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SavedImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// An image read from an archive, ready to store.
struct Candidate {
    references: Vec<String>,
    digest: String,
    config_digest: String,
    layers: Vec<String>,
}

impl ImageStore {
    /// Imports every image of an OCI image layout (a directory, or a tar of one) or a
    /// `docker save` archive (a tar, optionally gzip-compressed, or its unpacked directory).
    ///
    /// Archives that are both (`docker save` since Docker 25) are read as OCI layouts, so the
    /// image digest is the manifest digest a registry would report. Names come from the
    /// `io.containerd.image.name` annotation, from an `org.opencontainers.image.ref.name`
    /// that is a full reference, from a tag-only `ref.name` combined with the layout's file
    /// name, or from `RepoTags`. Untagged images are stored under their digest. Each blob is
    /// checked against its digest, and an image index resolves to linux/amd64.
    pub fn import(&self, path: &Path) -> Result<Vec<LocalImage>, ImageError> {
        let source = path.display().to_string();
        let metadata = fs::metadata(path).map_err(|error| ImageError::io(&source, path, error))?;
        let _gc = self.gc_lock(false)?;

        // A tar is unpacked with the layer unpacker, so a hostile archive gets the same
        // treatment as a hostile layer.
        let extracted;
        let dir = if metadata.is_dir() {
            path.to_path_buf()
        } else {
            extracted = tempfile::Builder::new()
                .prefix("import-")
                .tempdir_in(self.tmp_dir())
                .map_err(|error| ImageError::io(&source, self.tmp_dir(), error))?;
            let mut unpacker = Unpacker::new(&source, extracted.path(), self.options.limits);
            unpacker.apply(&LayerFile {
                path: path.to_path_buf(),
                digest: source.clone(),
                diff_id: None,
            })?;
            extracted.path().to_path_buf()
        };

        let default_name = archive_name(path);
        let candidates = if dir.join("index.json").is_file() {
            self.read_oci_layout(&source, &dir, &default_name)?
        } else if dir.join("manifest.json").is_file() {
            self.read_docker_save(&source, &dir)?
        } else {
            return Err(ImageError::InvalidImage {
                reference: source,
                reason: "neither an OCI layout (index.json) nor a docker save archive \
                         (manifest.json)"
                    .to_string(),
            });
        };
        if candidates.is_empty() {
            return Err(ImageError::InvalidImage {
                reference: source,
                reason: "the archive contains no image".to_string(),
            });
        }
        candidates
            .into_iter()
            .map(|candidate| self.store_candidate(&source, candidate))
            .collect::<Result<Vec<Vec<LocalImage>>, _>>()
            .map(|images| images.into_iter().flatten().collect())
    }

    fn read_oci_layout(
        &self,
        source: &str,
        dir: &Path,
        default_name: &str,
    ) -> Result<Vec<Candidate>, ImageError> {
        let index: OciIndex = read_json(source, dir, Path::new("index.json"))?;
        let mut candidates = Vec::new();
        for descriptor in index.manifests {
            let names = layout_names(&descriptor, default_name);
            let manifest_descriptor = if OCI_INDEX_TYPES.contains(&descriptor.media_type.as_str()) {
                self.copy_layout_blob(source, dir, &descriptor.digest)?;
                let text = self.read_blob(source, &descriptor.digest)?;
                let nested: OciIndex = parse_json(source, Path::new("image index"), &text)?;
                nested
                    .manifests
                    .into_iter()
                    .find(|entry| {
                        entry
                            .platform
                            .as_ref()
                            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
                    })
                    .ok_or_else(|| ImageError::NoMatchingPlatform {
                        reference: names.first().cloned().unwrap_or(source.to_string()),
                    })?
            } else {
                descriptor
            };
            self.copy_layout_blob(source, dir, &manifest_descriptor.digest)?;
            let text = self.read_blob(source, &manifest_descriptor.digest)?;
            let manifest: OciManifest = parse_json(source, Path::new("manifest"), &text)?;
            let config_digest = manifest.config.digest.clone();
            self.copy_layout_blob(source, dir, &config_digest)?;
            let mut layers = Vec::new();
            for layer in &manifest.layers {
                self.copy_layout_blob(source, dir, &layer.digest)?;
                layers.push(layer.digest.clone());
            }
            let digest = manifest_descriptor.digest.clone();
            let references = if names.is_empty() {
                vec![format!("{default_name}@{digest}")]
            } else {
                names
            };
            candidates.push(Candidate {
                references,
                digest,
                config_digest,
                layers,
            });
        }
        Ok(candidates)
    }

    /// Copies `blobs/sha256/<hex>` of a layout into the cache, checking its digest, and
    /// returns the cached path.
    fn copy_layout_blob(
        &self,
        source: &str,
        dir: &Path,
        digest: &str,
    ) -> Result<PathBuf, ImageError> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|hex| hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(|| ImageError::InvalidImage {
                reference: source.to_string(),
                reason: format!("unsupported blob digest '{digest}'"),
            })?;
        let cached = self.blob_path(digest);
        if !cached.is_file() {
            let relative = PathBuf::from("blobs/sha256").join(hex);
            let mut file = open_inside(source, dir, &relative)?;
            self.store_blob(source, &mut file, Some(digest))?;
        }
        Ok(cached)
    }

    fn read_docker_save(&self, source: &str, dir: &Path) -> Result<Vec<Candidate>, ImageError> {
        let saved: Vec<SavedImage> = read_json(source, dir, Path::new("manifest.json"))?;
        let mut candidates = Vec::new();
        for image in saved {
            let mut config = open_inside(source, dir, Path::new(&image.config))?;
            let config_digest = self.store_blob(source, &mut config, None)?;
            let mut layers = Vec::new();
            for layer in &image.layers {
                let mut file = open_inside(source, dir, Path::new(layer))?;
                layers.push(self.store_blob(source, &mut file, None)?);
            }
            let references = image.repo_tags.unwrap_or_default();
            let references = if references.is_empty() {
                vec![config_digest.clone()]
            } else {
                references
            };
            candidates.push(Candidate {
                references,
                digest: config_digest.clone(),
                config_digest,
                layers,
            });
        }
        Ok(candidates)
    }

    /// Builds the rootfs of a candidate whose blobs are cached, then indexes each name.
    fn store_candidate(
        &self,
        source: &str,
        candidate: Candidate,
    ) -> Result<Vec<LocalImage>, ImageError> {
        let mut references = Vec::new();
        for name in &candidate.references {
            if name.starts_with("sha256:") {
                references.push(name.clone());
            } else {
                references.push(canonical(&parse(name)?));
            }
        }
        let label = references.first().cloned().unwrap_or(source.to_string());
        let config_text = self.read_blob(&label, &candidate.config_digest)?;
        let config: ConfigBlob =
            serde_json::from_slice(&config_text).map_err(|error| ImageError::InvalidImage {
                reference: label.clone(),
                reason: format!("invalid image config: {error}"),
            })?;
        if config.rootfs.diff_ids.len() != candidate.layers.len() {
            return Err(ImageError::InvalidImage {
                reference: label,
                reason: format!(
                    "the image has {} layers but its config lists {} diff_ids",
                    candidate.layers.len(),
                    config.rootfs.diff_ids.len()
                ),
            });
        }
        let layer_files: Vec<LayerFile> = candidate
            .layers
            .iter()
            .zip(&config.rootfs.diff_ids)
            .map(|(digest, diff_id)| LayerFile {
                path: self.blob_path(digest),
                digest: digest.clone(),
                diff_id: Some(diff_id.clone()),
            })
            .collect();
        self.build_rootfs(&label, &candidate.config_digest, &layer_files)?;

        let mut blobs = vec![candidate.config_digest.clone()];
        blobs.extend(candidate.layers.iter().cloned());
        let now = now_millis();
        let mut images = Vec::new();
        for reference in references {
            let entry = IndexEntry {
                reference,
                digest: candidate.digest.clone(),
                id: candidate.config_digest.clone(),
                blobs: blobs.clone(),
                config: config.image_config(),
                created: now,
                last_used: now,
            };
            self.index.insert(entry.clone())?;
            images.push(self.local_image(&entry));
        }
        Ok(images)
    }
}

/// Returns the names a layout's annotations give an image.
fn layout_names(descriptor: &OciDescriptor, default_name: &str) -> Vec<String> {
    if let Some(name) = descriptor.annotations.get("io.containerd.image.name") {
        return vec![name.clone()];
    }
    match descriptor
        .annotations
        .get("org.opencontainers.image.ref.name")
    {
        Some(name) if name.contains('/') || name.contains(':') => vec![name.clone()],
        Some(tag) => vec![format!("{default_name}:{tag}")],
        None => Vec::new(),
    }
}

/// Turns an archive's file name into an image name: `python-3.12.tar` becomes
/// `python-3.12`, lower-cased, with characters a name cannot hold replaced by `-`.
fn archive_name(path: &Path) -> String {
    let stem = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = stem
        .trim_end_matches(".gz")
        .trim_end_matches(".tar")
        .to_ascii_lowercase();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    if name.is_empty() {
        "imported".to_string()
    } else {
        name
    }
}

/// Opens `relative` under `dir` for reading, rejecting paths that leave `dir` directly or
/// through a symlink, since archives name their own files.
fn open_inside(source: &str, dir: &Path, relative: &Path) -> Result<File, ImageError> {
    let invalid = |reason: String| ImageError::InvalidImage {
        reference: source.to_string(),
        reason,
    };
    if relative
        .components()
        .any(|component| !matches!(component, Component::Normal(_) | Component::CurDir))
    {
        return Err(invalid(format!(
            "path '{}' leaves the archive",
            relative.display()
        )));
    }
    let path = dir.join(relative);
    let missing = |error| invalid(format!("'{}' is missing: {error}", relative.display()));
    let real = fs::canonicalize(&path).map_err(missing)?;
    let real_dir = fs::canonicalize(dir).map_err(missing)?;
    if !real.starts_with(&real_dir) || !real.is_file() {
        return Err(invalid(format!(
            "'{}' is not a file inside the archive",
            relative.display()
        )));
    }
    File::open(&real).map_err(|error| ImageError::io(source, real, error))
}

fn read_json<T: serde::de::DeserializeOwned>(
    source: &str,
    dir: &Path,
    relative: &Path,
) -> Result<T, ImageError> {
    let mut file = open_inside(source, dir, relative)?;
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut text)
        .map_err(|error| ImageError::io(source, dir.join(relative), error))?;
    parse_json(source, relative, &text)
}

fn parse_json<T: serde::de::DeserializeOwned>(
    source: &str,
    name: &Path,
    text: &[u8],
) -> Result<T, ImageError> {
    serde_json::from_slice(text).map_err(|error| ImageError::InvalidImage {
        reference: source.to_string(),
        reason: format!("invalid {}: {error}", name.display()),
    })
}

//! Pulling images from registries with the OCI distribution client.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{linux_amd64_resolver, BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

use crate::config::ConfigBlob;
use crate::index::{now_millis, FileLock, IndexEntry};
use crate::reference::{canonical, is_loopback_registry, parse};
use crate::unpack::LayerFile;
use crate::{auth, ImageError, ImageStore, LocalImage, NoProgress, PullProgress};

/// Context of one pull, shared by its layer downloads.
struct Pull<'a> {
    store: &'a ImageStore,
    client: Client,
    parsed: Reference,
    /// Canonical reference, used in messages and the index.
    reference: String,
    progress: &'a dyn PullProgress,
}

impl ImageStore {
    /// Pulls `reference` from its registry and builds its rootfs, or reuses what the store
    /// already has.
    ///
    /// Accepts every usual form: `python:3.12` and `docker.io/library/python:3.12` (Docker
    /// Hub), `ghcr.io/org/image:tag`, `localhost:5000/image@sha256:<hex>`. An image index
    /// resolves to its linux/amd64 manifest. Registries on loopback (`localhost`, 127.0.0.0/8,
    /// `::1`) are reached over plain HTTP, all others over HTTPS. Credentials come from the
    /// Docker config file (see [`crate::StoreOptions::docker_config`]), else the pull is
    /// anonymous; token and basic challenges both work.
    ///
    /// Every blob is checked against its digest, and every layer's uncompressed content
    /// against the config's `diff_ids`. Layers already in the blob cache are not
    /// downloaded, and nothing is downloaded when the image's rootfs is already built. A
    /// download cut short resumes from its partial file on the next pull. The index entry
    /// is written last, so a failed pull never leaves an image that [`ImageStore::get`]
    /// returns.
    pub async fn pull(
        &self,
        reference: &str,
        progress: &dyn PullProgress,
    ) -> Result<LocalImage, ImageError> {
        let parsed = parse(reference)?;
        let canonical_reference = canonical(&parsed);
        let store = self.clone();
        let _gc = blocking(move || store.gc_lock(false)).await?;

        let registry = parsed.registry().to_string();
        let config_file = self.options.docker_config.clone();
        let auth = blocking(move || auth::credentials(config_file.as_deref(), &registry)).await?;
        let pull = Pull {
            store: self,
            client: client_for(&parsed),
            parsed,
            reference: canonical_reference,
            progress,
        };
        pull.run(&auth).await
    }
}

/// Runs blocking file work off the async executor.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(work)
        .await
        .expect("blocking image task panicked")
}

fn client_for(reference: &Reference) -> Client {
    let registry = reference.resolve_registry().to_string();
    let protocol = if is_loopback_registry(&registry) {
        ClientProtocol::HttpsExcept(vec![registry])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        ..ClientConfig::default()
    })
}

impl Pull<'_> {
    async fn run(&self, auth: &RegistryAuth) -> Result<LocalImage, ImageError> {
        tracing::info!(reference = %self.reference, "Pulling image");
        let (manifest, digest) = self
            .client
            .pull_image_manifest(&self.parsed, auth)
            .await
            .map_err(|error| self.registry_error(error))?;
        let layers: Vec<(String, u64)> = manifest
            .layers
            .iter()
            .map(|layer| (layer.digest.clone(), layer.size.max(0) as u64))
            .collect();
        self.progress.resolved(&digest, &layers);

        self.download(&manifest.config, false).await?;
        let store = self.store.clone();
        let reference = self.reference.clone();
        let config_digest = manifest.config.digest.clone();
        let config_text = blocking(move || store.read_blob(&reference, &config_digest)).await?;
        let config: ConfigBlob =
            serde_json::from_slice(&config_text).map_err(|error| self.invalid(error))?;
        self.check_platform(&config)?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(self.invalid(format!(
                "the manifest has {} layers but the config lists {} diff_ids",
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }

        let id = manifest.config.digest.clone();
        let rootfs_exists = self.store.rootfs_path(&id).is_file();
        if rootfs_exists {
            for layer in &manifest.layers {
                self.progress.layer_done(&layer.digest, true);
            }
        } else {
            futures_util::stream::iter(
                manifest
                    .layers
                    .iter()
                    .map(|layer| self.download(layer, true)),
            )
            .buffer_unordered(self.store.options.concurrent_downloads.max(1))
            .try_collect::<Vec<()>>()
            .await?;
            self.progress.building_rootfs();
            let layer_files: Vec<LayerFile> = manifest
                .layers
                .iter()
                .zip(&config.rootfs.diff_ids)
                .map(|(layer, diff_id)| LayerFile {
                    path: self.store.blob_path(&layer.digest),
                    digest: layer.digest.clone(),
                    diff_id: Some(diff_id.clone()),
                })
                .collect();
            let store = self.store.clone();
            let reference = self.reference.clone();
            let build_id = id.clone();
            blocking(move || store.build_rootfs(&reference, &build_id, &layer_files)).await?;
        }

        let mut blobs = vec![manifest.config.digest.clone()];
        blobs.extend(manifest.layers.iter().map(|layer| layer.digest.clone()));
        let now = now_millis();
        let entry = IndexEntry {
            reference: self.reference.clone(),
            digest,
            id,
            blobs,
            config: config.image_config(),
            created: now,
            last_used: now,
        };
        let store = self.store.clone();
        let committed = entry.clone();
        blocking(move || store.index.insert(committed)).await?;
        tracing::info!(reference = %self.reference, digest = %entry.digest, "Pulled image");
        Ok(self.store.local_image(&entry))
    }

    fn check_platform(&self, config: &ConfigBlob) -> Result<(), ImageError> {
        let os_ok = config.os.as_deref().is_none_or(|os| os == "linux");
        let arch_ok = config
            .architecture
            .as_deref()
            .is_none_or(|arch| arch == "amd64");
        if os_ok && arch_ok {
            return Ok(());
        }
        Err(ImageError::NoMatchingPlatform {
            reference: self.reference.clone(),
        })
    }

    fn invalid(&self, reason: impl ToString) -> ImageError {
        ImageError::InvalidImage {
            reference: self.reference.clone(),
            reason: reason.to_string(),
        }
    }

    /// Downloads one blob into the cache unless it is there, resuming a partial download
    /// left by an earlier pull. Progress is reported for layers only, not for the config.
    async fn download(&self, descriptor: &OciDescriptor, is_layer: bool) -> Result<(), ImageError> {
        let silent = NoProgress;
        let progress: &dyn PullProgress = if is_layer { self.progress } else { &silent };
        let digest = &descriptor.digest;
        if !digest.starts_with("sha256:") || digest.len() != 71 {
            return Err(self.invalid(format!("unsupported blob digest '{digest}'")));
        }
        let size = descriptor.size.max(0) as u64;
        let target = self.store.blob_path(digest);
        if target.is_file() {
            progress.layer_done(digest, true);
            return Ok(());
        }

        // Two pulls of images that share a layer download it once: the second waits for the
        // first's lock and then finds the blob in place.
        let partial = self
            .store
            .tmp_dir()
            .join(format!("{}.partial", &digest[7..]));
        let lock_path = partial.with_extension("lock");
        let reference = self.reference.clone();
        let _lock = blocking(move || {
            FileLock::exclusive(&lock_path).map_err(|e| ImageError::io(&reference, lock_path, e))
        })
        .await?;
        if target.is_file() {
            progress.layer_done(digest, true);
            return Ok(());
        }

        let result = self.download_to(descriptor, &partial, size, progress).await;
        if let Err(ImageError::DigestMismatch { .. }) = &result {
            // Corrupt bytes must not seed the next attempt's resume.
            let _ = fs::remove_file(&partial);
        }
        result?;
        let store = self.store.clone();
        let reference = self.reference.clone();
        let target_path = target.clone();
        blocking(move || store.publish(&reference, &partial, &target_path)).await?;
        progress.layer_done(digest, false);
        Ok(())
    }

    async fn download_to(
        &self,
        descriptor: &OciDescriptor,
        partial: &Path,
        size: u64,
        progress: &dyn PullProgress,
    ) -> Result<(), ImageError> {
        let digest = &descriptor.digest;
        let io_error = |source| ImageError::io(&self.reference, partial, source);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(partial)
            .map_err(io_error)?;
        let mut offset = file.metadata().map_err(io_error)?.len();
        if offset > size {
            offset = 0;
        }

        let mut hasher = Sha256::new();
        let stream = if offset == 0 {
            self.client
                .pull_blob_stream(&self.parsed, descriptor)
                .await
                .map_err(|error| self.registry_error(error))?
        } else {
            let response = self
                .client
                .pull_blob_stream_partial(&self.parsed, descriptor, offset, None)
                .await
                .map_err(|error| self.registry_error(error))?;
            match response {
                BlobResponse::Partial(stream) => {
                    hash_prefix(&mut file, offset, &mut hasher).map_err(io_error)?;
                    tracing::debug!(layer = %digest, offset, "Resuming blob download");
                    stream
                }
                BlobResponse::Full(stream) => {
                    offset = 0;
                    stream
                }
            }
        };
        file.set_len(offset).map_err(io_error)?;
        file.seek(SeekFrom::Start(offset)).map_err(io_error)?;

        let mut downloaded = offset;
        progress.layer_progress(digest, downloaded, size);
        let mut chunks = stream.stream;
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                // The client's own digest check fails at the end of the stream; report it
                // as our own check would.
                Err(_) if downloaded == size => break,
                Err(source) => {
                    return Err(ImageError::Registry {
                        reference: self.reference.clone(),
                        registry: self.parsed.registry().to_string(),
                        source: Box::new(source),
                    })
                }
            };
            downloaded += chunk.len() as u64;
            if downloaded > size {
                return Err(ImageError::DigestMismatch {
                    reference: self.reference.clone(),
                    expected: digest.clone(),
                    actual: format!("a blob larger than the {size} bytes the manifest states"),
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(io_error)?;
            progress.layer_progress(digest, downloaded, size);
        }
        file.sync_all().map_err(io_error)?;

        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != *digest {
            return Err(ImageError::DigestMismatch {
                reference: self.reference.clone(),
                expected: digest.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Turns a client error into the error a user can act on: not found, access refused,
    /// digest mismatch, or a registry failure.
    fn registry_error(&self, error: OciDistributionError) -> ImageError {
        let reference = self.reference.clone();
        let registry = self.parsed.registry().to_string();
        let not_found = |codes: &[&OciErrorCode]| {
            codes.iter().any(|code| {
                matches!(
                    code,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            })
        };
        let denied = |codes: &[&OciErrorCode]| {
            codes
                .iter()
                .any(|code| matches!(code, OciErrorCode::Unauthorized | OciErrorCode::Denied))
        };
        match error {
            OciDistributionError::ImageManifestNotFoundError(ref text)
                if text.contains("platform") || text.contains("resolve") =>
            {
                ImageError::NoMatchingPlatform { reference }
            }
            OciDistributionError::ImageManifestNotFoundError(_) => {
                ImageError::NotFound { reference }
            }
            OciDistributionError::RegistryError { ref envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if not_found(&codes) {
                    ImageError::NotFound { reference }
                } else if denied(&codes) {
                    ImageError::AuthRefused {
                        reference,
                        registry,
                        source: Box::new(error),
                    }
                } else {
                    ImageError::Registry {
                        reference,
                        registry,
                        source: Box::new(error),
                    }
                }
            }
            OciDistributionError::ServerError { code: 404, .. } => {
                ImageError::NotFound { reference }
            }
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::ServerError {
                code: 401 | 403, ..
            } => ImageError::AuthRefused {
                reference,
                registry,
                source: Box::new(error),
            },
            OciDistributionError::DigestError(ref digest_error) => ImageError::DigestMismatch {
                reference,
                expected: "the digest in the reference or manifest".to_string(),
                actual: digest_error.to_string(),
            },
            other => ImageError::Registry {
                reference,
                registry,
                source: Box::new(other),
            },
        }
    }
}

/// Feeds the first `length` bytes of `file` to `hasher`, for a resumed download.
fn hash_prefix(file: &mut fs::File, length: u64, hasher: &mut Sha256) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    let mut limited = (&mut *file).take(length);
    let mut buffer = vec![0; 128 << 10];
    loop {
        let count = limited.read(&mut buffer)?;
        if count == 0 {
            return Ok(());
        }
        hasher.update(&buffer[..count]);
    }
}

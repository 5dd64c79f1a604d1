//! The error type of every image operation.

use std::io;
use std::path::PathBuf;

/// An image operation that failed.
///
/// Each message names the reference, path or digest involved and, where there is one, the
/// fix. The wrapped cause is reachable through [`std::error::Error::source`] and is not
/// repeated in the message, so callers print the whole chain once.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference does not follow the `[registry/]name[:tag][@digest]` grammar.
    #[error("Invalid image reference '{reference}': {reason}")]
    InvalidReference { reference: String, reason: String },

    /// The registry has no such repository, tag or digest.
    #[error("Image '{reference}' was not found in its registry: check the name and the tag")]
    NotFound { reference: String },

    /// The registry rejected the credentials, or anonymous access is not allowed.
    #[error(
        "Registry refused access to '{reference}': log in with `docker login {registry}` \
         or fix the entry for {registry} in the Docker config file"
    )]
    AuthRefused {
        reference: String,
        registry: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The registry could not be reached or returned a failure that is not one of the above.
    #[error("Pulling '{reference}' from {registry} failed: check that the registry is up")]
    Registry {
        reference: String,
        registry: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A blob's content does not hash to the digest that names it.
    #[error(
        "Digest mismatch for '{reference}': blob {expected} hashes to {actual}; \
         the registry or the file is corrupt, pull again"
    )]
    DigestMismatch {
        reference: String,
        expected: String,
        actual: String,
    },

    /// The image has no manifest for linux/amd64.
    #[error("Image '{reference}' has no linux/amd64 variant; sandboxes run linux/amd64 only")]
    NoMatchingPlatform { reference: String },

    /// A manifest, config or archive that does not follow the OCI or Docker formats.
    #[error("Invalid image '{reference}': {reason}")]
    InvalidImage { reference: String, reason: String },

    /// A layer entry that would write outside the root or otherwise break the unpack rules.
    #[error("Layer {layer} of '{reference}' was rejected: entry '{entry}' {reason}")]
    HostileLayer {
        reference: String,
        layer: String,
        entry: String,
        reason: String,
    },

    /// A layer set that unpacks past the configured byte or entry limit.
    #[error(
        "Image '{reference}' unpacks to more than {limit}; raise UnpackLimits if it is trusted"
    )]
    UnpackLimit { reference: String, limit: String },

    /// The disk holding the image store filled up.
    #[error("Disk full while storing '{reference}' under {path}: free space and pull again")]
    DiskFull {
        reference: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// No local image has this reference or digest.
    #[error("No local image '{reference}': pull or import it first")]
    NotLocal { reference: String },

    /// `mkfs.ext4` or `debugfs` is missing or failed.
    #[error("Building the ext4 root filesystem for '{reference}' failed: {reason}")]
    Mkfs { reference: String, reason: String },

    /// The Docker config file exists but cannot be read as JSON with valid `auth` values.
    #[error("Invalid Docker config file {path}: {reason}")]
    DockerConfig { path: PathBuf, reason: String },

    /// A file system operation failed on the given path.
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    /// Wraps an I/O error on `path`, or turns it into [`ImageError::DiskFull`] when the
    /// disk is full, so that callers see the one cause a user can act on.
    pub(crate) fn io(reference: &str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if is_disk_full(&source) {
            return ImageError::DiskFull {
                reference: reference.to_string(),
                path,
                source,
            };
        }
        ImageError::Io { path, source }
    }
}

/// Reports whether an I/O error means the file system ran out of space or quota.
pub(crate) fn is_disk_full(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT)
    )
}

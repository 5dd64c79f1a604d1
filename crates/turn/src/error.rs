//! The error type of the turn executor.

use std::io;
use std::path::PathBuf;

use upstream_runbook::ParseError;

/// A turn that could not be run or recorded.
///
/// A failing step is not an error: it is an outcome in [`crate::TurnResult`]. Messages name
/// the document, setting or path involved and the fix, and do not repeat the wrapped cause,
/// so callers print the chain once.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    /// The document could not be read.
    #[error("Failed to read {path}")]
    ReadDocument {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The document is not a valid turn document.
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        // Not `#[source]`: the message already contains it, line number included.
        source: ParseError,
    },

    /// A front matter setting or a run option is valid Markdown but cannot be honoured.
    #[error("{path}: {message}")]
    InvalidSetting { path: PathBuf, message: String },

    /// The document with its results could not be written.
    #[error("Failed to write {path}; the previous version of the file is unchanged")]
    WriteDocument {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The default image is missing from the image store.
    #[error("The default image '{0}' is missing; run `upstream setup` to build it")]
    DefaultImageMissing(String),

    /// The image could not be found or pulled.
    #[error(transparent)]
    Image(#[from] upstream_image::ImageError),

    /// The sandbox failed to boot, or the guest agent failed or went away.
    #[error(transparent)]
    Sandbox(#[from] upstream_vmm::Error),

    /// Preparing the guest for the turn failed: a helper command exited non-zero.
    #[error("Preparing the sandbox failed while {action}: {detail}")]
    GuestSetup {
        action: &'static str,
        detail: String,
    },

    /// The context store rejected an operation, for example because another run holds the
    /// context.
    #[error(transparent)]
    Store(#[from] upstream_store::StoreError),

    /// A temporary file on the host could not be created or used.
    #[error("Failed to {action} a temporary file on the host")]
    TempFile {
        action: &'static str,
        #[source]
        source: io::Error,
    },
}

impl TurnError {
    /// Whether the error comes from the document or the options rather than from running
    /// it, so that a command line can report it as a usage error.
    pub fn is_usage_error(&self) -> bool {
        matches!(
            self,
            TurnError::Parse { .. }
                | TurnError::InvalidSetting { .. }
                | TurnError::ReadDocument { .. }
        )
    }
}

pub(crate) fn temp_file_error(action: &'static str) -> impl FnOnce(io::Error) -> TurnError {
    move |source| TurnError::TempFile { action, source }
}

//! Importing OCI layouts and `docker save` archives.

use std::path::Path;

use crate::{ImageError, ImageStore, LocalImage};

impl ImageStore {
    /// Imports every image of an OCI layout directory or a `docker save` archive.
    pub fn import(&self, path: &Path) -> Result<Vec<LocalImage>, ImageError> {
        Err(ImageError::InvalidImage {
            reference: path.display().to_string(),
            reason: "imports are not implemented yet".to_string(),
        })
    }
}

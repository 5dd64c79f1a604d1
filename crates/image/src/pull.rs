//! Pulling images from registries.

use crate::{ImageError, ImageStore, LocalImage, PullProgress};

impl ImageStore {
    /// Pulls `reference` from its registry and builds its rootfs.
    pub async fn pull(
        &self,
        reference: &str,
        _progress: &dyn PullProgress,
    ) -> Result<LocalImage, ImageError> {
        Err(ImageError::InvalidImage {
            reference: reference.to_string(),
            reason: "pulls are not implemented yet".to_string(),
        })
    }
}

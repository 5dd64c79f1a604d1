//! OCI images for upstream sandboxes.
//!
//! A sandbox boots from a read-only ext4 root filesystem that the guest agent mounts under a
//! writable overlay. This crate produces that file: it pulls OCI images from registries,
//! imports OCI layouts and `docker save` archives, or builds an image from a directory;
//! applies the layers into a tree safely; and turns the tree into ext4 with `mkfs.ext4 -d`.
//! Everything lives in an [`ImageStore`], which caches blobs and root filesystems by digest.
//!
//! ```no_run
//! # async fn example() -> Result<(), upstream_image::ImageError> {
//! use upstream_image::{ImageStore, NoProgress};
//!
//! let store = ImageStore::open("/var/lib/upstream/images".as_ref())?;
//! let image = match store.get("python:3.12")? {
//!     Some(image) => image,
//!     None => store.pull("python:3.12", &NoProgress).await?,
//! };
//! store.touch(&image);
//! println!("boot from {}", image.rootfs.display());
//! # Ok(())
//! # }
//! ```

mod auth;
mod build;
mod config;
mod error;
mod import;
mod index;
mod progress;
mod pull;
mod reference;
mod rootfs;
mod store;
mod unpack;

pub use config::ImageConfig;
pub use error::ImageError;
pub use progress::{NoProgress, PullProgress};
pub use store::{ImageStore, ImageSummary, LocalImage, PruneReport, StoreOptions};
pub use unpack::UnpackLimits;

/// Checks that `reference` is a valid image reference, without contacting a registry.
pub fn check_reference(reference: &str) -> Result<(), ImageError> {
    reference::parse(reference).map(drop)
}

//! Pull progress reporting.

/// Receives progress events of a pull, for display.
///
/// Layers are named by their blob digest. Events of different layers interleave because
/// layers download concurrently. Every method has an empty default, so an implementation
/// picks the events it renders.
pub trait PullProgress: Send + Sync {
    /// Reports that the manifest is resolved and lists every layer with its compressed size
    /// in bytes.
    fn resolved(&self, _manifest_digest: &str, _layers: &[(String, u64)]) {}

    /// Reports that `downloaded` of `total` bytes of a layer are on disk. A resumed
    /// download starts at the bytes already present.
    fn layer_progress(&self, _layer: &str, _downloaded: u64, _total: u64) {}

    /// Reports that a layer is complete and verified. `cached` is true when nothing was
    /// downloaded because the blob cache already held it.
    fn layer_done(&self, _layer: &str, _cached: bool) {}

    /// Reports that all layers are present and the root filesystem is being built.
    fn building_rootfs(&self) {}
}

/// A [`PullProgress`] that ignores every event.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl PullProgress for NoProgress {}

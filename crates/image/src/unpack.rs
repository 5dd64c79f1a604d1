//! Applying layer tars to a directory tree, safely.

/// Caps on what the layers of one image may unpack to, against decompression bombs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Total bytes of file content across all layers, counted after decompression.
    pub max_bytes: u64,
    /// Total tar entries across all layers.
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    /// 32 GiB and 4 million entries: above the largest common images (CUDA and ML framework
    /// images unpack to roughly 10-20 GB), and low enough to stop a bomb before it fills
    /// a typical disk.
    fn default() -> Self {
        UnpackLimits {
            max_bytes: 32 << 30,
            max_entries: 4_000_000,
        }
    }
}

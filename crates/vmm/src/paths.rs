//! The data directory and where each kind of state lives in it.

use std::path::{Path, PathBuf};

/// Root of everything upstream keeps on disk: `$UPSTREAM_HOME`, else
/// `$XDG_DATA_HOME/upstream`, else `~/.local/share/upstream`.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The data directory chosen by the environment.
    pub fn from_env() -> Self {
        if let Some(home) = std::env::var_os("UPSTREAM_HOME").filter(|v| !v.is_empty()) {
            return Self::new(home);
        }
        if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return Self::new(PathBuf::from(data).join("upstream"));
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        Self::new(PathBuf::from(home).join(".local/share/upstream"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Built guest kernels, one folder per hash of their inputs.
    pub fn kernels(&self) -> PathBuf {
        self.root.join("kernel")
    }

    /// Guest agents and their initramfs, one folder per agent hash.
    pub fn agents(&self) -> PathBuf {
        self.root.join("agent")
    }

    /// The image cache, owned by the image crate.
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The context store, owned by the store crate.
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    /// Per-sandbox runtime folders: sockets, scratch disk, pid files.
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Empty formatted scratch disks, one per size, copied for each sandbox.
    pub fn disk_templates(&self) -> PathBuf {
        self.root.join("disks")
    }

    /// Snapshots of booted sandboxes.
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// What `upstream setup` installed: the kernel and agent in use.
    pub fn setup_state(&self) -> PathBuf {
        self.root.join("setup.json")
    }
}

//! The Firecracker backend.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::backend::{Backend, BackendKind, RunningVm, VmSpec};
use crate::{Error, Result};

pub struct FirecrackerBackend {
    #[allow(dead_code)]
    binary: PathBuf,
}

impl FirecrackerBackend {
    pub fn new(binary: PathBuf) -> Self {
        Self { binary }
    }

    /// `$UPSTREAM_FIRECRACKER`, else `firecracker` on `PATH`.
    pub fn find_binary() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("UPSTREAM_FIRECRACKER").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(path));
        }
        crate::qemu::find_in_path("firecracker")
    }
}

#[async_trait]
impl Backend for FirecrackerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    async fn start(&self, _spec: &VmSpec) -> Result<RunningVm> {
        // TODO: drive the API socket; until then the backend reports itself
        // unusable instead of pretending to boot.
        Err(Error::BackendUnavailable {
            backend: "firecracker",
            reason: "not implemented yet".into(),
        })
    }
}

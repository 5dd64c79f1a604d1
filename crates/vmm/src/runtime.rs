//! The runtime: host facts, the chosen backend, and the guest kernel and
//! agent, resolved once per process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendKind};
use crate::firecracker::FirecrackerBackend;
use crate::host::{Accel, HostInfo};
use crate::paths::DataDir;
use crate::qemu::QemuBackend;
use crate::{initramfs, sweep, Error, Result};

/// What `upstream setup` recorded in `setup.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SetupState {
    pub kernel: Option<PathBuf>,
    pub agent: Option<PathBuf>,
    pub base_image: Option<String>,
    /// Hash of the script that built the base image, so a changed script
    /// rebuilds it.
    #[serde(default)]
    pub base_image_key: Option<String>,
}

impl SetupState {
    pub fn load(data: &DataDir) -> Self {
        std::fs::read(data.setup_state())
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, data: &DataDir) -> std::io::Result<()> {
        let path = data.setup_state();
        let temp = path.with_extension("json.tmp");
        std::fs::create_dir_all(data.root())?;
        std::fs::write(
            &temp,
            serde_json::to_vec_pretty(self).expect("serializable"),
        )?;
        std::fs::rename(temp, path)
    }
}

/// Choices that override auto-detection and `setup.json`.
#[derive(Clone, Debug, Default)]
pub struct RuntimeOptions {
    pub backend: Option<String>,
    pub kernel: Option<PathBuf>,
    pub agent: Option<PathBuf>,
    /// Whether sandboxes start from snapshots; `None` reads
    /// `UPSTREAM_SNAPSHOTS` (`on` or `off`, default on).
    pub snapshots: Option<bool>,
}

/// Everything needed to create sandboxes on this host.
pub struct Runtime {
    pub data: DataDir,
    pub host: HostInfo,
    pub backend: Arc<dyn Backend>,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Whether [`crate::Sandbox::create`] restores sandboxes from snapshots
    /// where the backend supports them.
    pub snapshots: bool,
}

impl Runtime {
    /// Resolves the kernel, agent and backend, and sweeps what dead upstream
    /// processes left behind.
    pub fn open(data: DataDir, options: RuntimeOptions) -> Result<Self> {
        let state = SetupState::load(&data);
        let kernel = options
            .kernel
            .or_else(|| std::env::var_os("UPSTREAM_KERNEL").map(PathBuf::from))
            .or(state.kernel)
            .unwrap_or_else(|| data.kernels().join("vmlinux"));
        check_kernel(&kernel)?;
        let agent = options
            .agent
            .or_else(|| std::env::var_os("UPSTREAM_AGENT").map(PathBuf::from))
            .or(state.agent)
            .unwrap_or_else(|| data.agents().join("upstream-agent"));
        if !agent.is_file() {
            return Err(Error::AgentMissing(agent));
        }
        let initramfs = initramfs::ensure(&data.agents(), &agent)?;
        let snapshots = match options.snapshots {
            Some(on) => on,
            None => snapshots_from_env()?,
        };

        let host = HostInfo::detect();
        let backend = select_backend(options.backend.as_deref(), &host)?;
        let report = sweep::sweep(&data.run());
        if report.folders > 0 {
            tracing::warn!(
                folders = report.folders,
                vmms_killed = report.vmms_killed,
                "cleaned up sandboxes left by an upstream process that died"
            );
        }
        if let Accel::Tcg { reason } = &host.accel {
            notice_once(
                &data,
                &format!("upstream: using QEMU TCG emulation, slower than KVM: {reason}"),
            );
        }
        Ok(Self {
            data,
            host,
            backend,
            kernel,
            initramfs,
            snapshots,
        })
    }
}

/// Checks that `path` is a readable ELF file, as the backends need a guest kernel to be.
/// A compressed `bzImage` or a wrong file would otherwise fail only at boot, with a
/// message about the agent.
pub fn check_kernel(path: &Path) -> Result<()> {
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path).and_then(|mut file| {
        use std::io::Read;
        file.read_exact(&mut magic)
    });
    match read {
        Err(_) => Err(Error::KernelMissing(path.to_path_buf())),
        Ok(()) if &magic == b"\x7fELF" => Ok(()),
        Ok(()) => Err(Error::KernelInvalid(path.to_path_buf())),
    }
}

/// Reads `UPSTREAM_SNAPSHOTS`: snapshots are on unless it says off.
fn snapshots_from_env() -> Result<bool> {
    let Ok(value) = std::env::var("UPSTREAM_SNAPSHOTS") else {
        return Ok(true);
    };
    match value.to_ascii_lowercase().as_str() {
        "" | "on" | "1" | "true" | "yes" => Ok(true),
        "off" | "0" | "false" | "no" => Ok(false),
        _ => Err(Error::InvalidEnv {
            name: "UPSTREAM_SNAPSHOTS",
            value,
            expected: "on or off",
        }),
    }
}

/// Picks the backend: an explicit name, else Firecracker where its binary
/// and hardware KVM are present, else QEMU.
pub fn select_backend(name: Option<&str>, host: &HostInfo) -> Result<Arc<dyn Backend>> {
    let name = name.map(str::to_owned).or_else(|| {
        std::env::var("UPSTREAM_BACKEND")
            .ok()
            .filter(|v| !v.is_empty())
    });
    let kind = match name.as_deref() {
        Some(name) => Some(BackendKind::parse(name)?),
        None => None,
    };
    let firecracker = FirecrackerBackend::find_binary();
    match kind {
        Some(BackendKind::Firecracker) => {
            let binary = firecracker.ok_or_else(|| Error::BackendUnavailable {
                backend: "firecracker",
                reason: "no firecracker binary on PATH or in UPSTREAM_FIRECRACKER".into(),
            })?;
            if !host.is_kvm() {
                return Err(Error::BackendUnavailable {
                    backend: "firecracker",
                    reason: tcg_reason(host),
                });
            }
            Ok(Arc::new(FirecrackerBackend::new(binary)))
        }
        Some(BackendKind::Qemu) => qemu(host),
        None if firecracker.is_some() && host.is_kvm() => {
            Ok(Arc::new(FirecrackerBackend::new(firecracker.unwrap())))
        }
        None => qemu(host),
    }
}

fn qemu(host: &HostInfo) -> Result<Arc<dyn Backend>> {
    let binary = QemuBackend::find_binary().ok_or_else(|| Error::BackendUnavailable {
        backend: "qemu",
        reason: "qemu-system-x86_64 not found; install the qemu-system-x86 package".into(),
    })?;
    Ok(Arc::new(QemuBackend::new(binary, host.clone())))
}

fn tcg_reason(host: &HostInfo) -> String {
    match &host.accel {
        Accel::Tcg { reason } => format!("it needs hardware KVM, and {reason}"),
        Accel::Kvm => String::new(),
    }
}

/// Prints a notice the first time it comes up for this data directory.
fn notice_once(data: &DataDir, message: &str) {
    let marker = data.root().join(".notice-tcg");
    if Path::new(&marker).exists() {
        tracing::debug!("{message}");
        return;
    }
    // A closed stderr is not worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{message}\n").as_bytes());
    let _ = std::fs::create_dir_all(data.root());
    let _ = std::fs::write(marker, message);
}

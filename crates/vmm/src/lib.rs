//! The sandbox core: microVM backends behind one trait, the host side of the
//! agent channel, and sandboxes built from both.
//!
//! A [`Runtime`] knows the data directory, the guest kernel and agent, and
//! the backend chosen for this host. [`Sandbox::create`] boots a microVM
//! from a read-only image root plus a writable scratch disk and returns once
//! the guest agent has said hello; [`Sandbox::exec`] runs commands in it.

pub mod agent;
pub mod backend;
mod disk;
mod error;
pub mod firecracker;
pub mod host;
pub mod initramfs;
pub mod net;
pub mod paths;
mod pool;
pub mod qemu;
mod qemu_snapshot;
mod qmp;
mod runtime;
mod sandbox;
mod snapshot;
mod sweep;
mod tail;
mod vmm_process;

pub use agent::{AgentClient, ExecEvent, ExecHandle, StdinWriter};
pub use backend::{AgentChannel, Backend, BackendKind, RunningVm, VmProcess, VmSpec};
pub use error::{Error, Result};
pub use host::{Accel, HostInfo};
pub use net::{NetworkLimits, NetworkPolicy, NetworkStats, PortForward, PublishedPort};
pub use paths::DataDir;
pub use pool::{Pool, PoolConfig};
pub use runtime::{check_kernel, select_backend, Runtime, RuntimeOptions, SetupState};
pub use sandbox::{Limits, Sandbox, SandboxSpec, StartMode};
pub use snapshot::SnapshotInputs;
pub use upstream_protocol::{ExecRequest, ExitStatus, Hello};

//! Sandboxes: one microVM with an agent, created, used and destroyed.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use upstream_protocol::{ExecRequest, Hello};

use crate::agent::{AgentClient, ExecHandle};
use crate::backend::{AgentChannel, RunningVm, VmProcess, VmSpec};
use crate::net::{self, NetworkPolicy, NetworkStats, PortForward, PublishedPort};
use crate::runtime::Runtime;
use crate::{disk, snapshot, sweep, Error, Result};

/// Resource limits of one sandbox, applied by the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Size of the writable disk: everything the sandbox writes outside
    /// tmpfs mounts counts against it.
    pub disk_mib: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            vcpus: 1,
            memory_mib: 512,
            disk_mib: 2048,
        }
    }
}

impl Limits {
    pub fn validate(&self) -> Result<()> {
        check_range("vcpus", self.vcpus, 1, 32, "1 to 32")?;
        check_range(
            "memory (MiB)",
            self.memory_mib,
            64,
            262_144,
            "64 to 262144 MiB",
        )?;
        check_range(
            "disk (MiB)",
            self.disk_mib,
            64,
            4_194_304,
            "64 to 4194304 MiB",
        )
    }
}

fn check_range(
    name: &'static str,
    value: u32,
    min: u32,
    max: u32,
    range: &'static str,
) -> Result<()> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(Error::OutOfRange {
            name,
            value: u64::from(value),
            range,
        })
    }
}

/// What a sandbox is made of, apart from the runtime.
#[derive(Clone, Debug, Default)]
pub struct SandboxSpec {
    /// The image's read-only root file system (ext4).
    pub root_disk: PathBuf,
    /// The image's environment, used by every command unless overridden.
    pub env: Vec<(String, String)>,
    /// Default working directory of commands.
    pub workdir: Option<String>,
    /// Default user of commands.
    pub user: Option<String>,
    pub limits: Limits,
    /// How long the guest may take to boot before the sandbox fails.
    pub boot_timeout: Option<Duration>,
    /// Outbound network access; none by default.
    pub network: NetworkPolicy,
    /// Guest ports to publish on the host's loopback.
    pub publish: Vec<PortForward>,
    /// Start the VM at background CPU priority, for sandboxes made ahead of
    /// demand; [`Sandbox::to_foreground`] ends it.
    pub background: bool,
}

impl SandboxSpec {
    /// Whether the sandbox gets a network device: for outbound access or
    /// for published ports.
    pub fn wants_network(&self) -> bool {
        self.network.egress || !self.publish.is_empty()
    }
}

/// How a sandbox's VM was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartMode {
    /// The guest booted from its kernel.
    ColdBoot,
    /// The guest was restored from a snapshot of a booted guest.
    Snapshot,
}

/// How [`Sandbox::launch`] starts the VM.
pub(crate) enum Launch<'a> {
    /// Boot the kernel; with a memory file when the VM is to be saved as a
    /// snapshot.
    Boot { memory_file: Option<PathBuf> },
    /// Restore the snapshot in `dir`, whose agent sent `hello` when it was
    /// saved.
    Restore { dir: &'a Path, hello: Box<Hello> },
}

/// A running microVM with its agent.
pub struct Sandbox {
    id: String,
    /// The host side of the network; dropped after the VM is killed.
    network: Option<net::SandboxNetwork>,
    run_dir: PathBuf,
    process: Box<dyn VmProcess>,
    agent: AgentClient,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    user: Option<String>,
    limits: Limits,
    start_mode: StartMode,
    /// Whether the VMM still runs at background priority.
    background: bool,
}

impl Sandbox {
    /// Creates a sandbox and returns once its agent is ready: restored from
    /// the snapshot of its image and shape when the runtime has snapshots
    /// on and the backend supports them, else booted.
    pub async fn create(runtime: &Runtime, spec: SandboxSpec) -> Result<Self> {
        check_spec(&spec)?;
        // A snapshot's guest booted without this sandbox's network.
        if runtime.snapshots && runtime.backend.supports_snapshots() && !spec.wants_network() {
            return snapshot::start(runtime, spec).await;
        }
        Self::launch(runtime, spec, Launch::Boot { memory_file: None }).await
    }

    /// Boots a sandbox from its kernel, without snapshots.
    pub async fn boot(runtime: &Runtime, spec: SandboxSpec) -> Result<Self> {
        check_spec(&spec)?;
        Self::launch(runtime, spec, Launch::Boot { memory_file: None }).await
    }

    pub(crate) async fn launch(
        runtime: &Runtime,
        spec: SandboxSpec,
        launch: Launch<'_>,
    ) -> Result<Self> {
        let id = new_id();
        let run_dir = runtime.data.run().join(&id);
        fs::create_dir_all(&run_dir)
            .map_err(Error::io(format!("creating {}", run_dir.display())))?;
        // From here on the folder is removed on every error path: the guard
        // owns it until the sandbox does.
        let guard = RunDirGuard(Some(run_dir.clone()));
        fs::write(run_dir.join("owner"), sweep::owner_record())
            .map_err(Error::io(format!("writing {}", run_dir.display())))?;

        let relay = crate::initramfs::agent_beside(&runtime.initramfs);
        let backend = runtime.backend.as_ref();
        let network = net::prepare(&id, &run_dir, &spec.network, &spec.publish, backend, &relay)?;

        let scratch = run_dir.join("scratch.ext4");
        let memory_file = match &launch {
            Launch::Boot { memory_file } => {
                let template =
                    disk::template(&runtime.data.disk_templates(), spec.limits.disk_mib)?;
                disk::copy_sparse(&template, &scratch)?;
                memory_file.clone()
            }
            // The backend copies the snapshot's scratch disk.
            Launch::Restore { .. } => None,
        };

        let vm_spec = VmSpec {
            id: id.clone(),
            run_dir: run_dir.clone(),
            kernel: runtime.kernel.clone(),
            initramfs: runtime.initramfs.clone(),
            root_disk: spec.root_disk.clone(),
            scratch_disk: scratch,
            vcpus: spec.limits.vcpus,
            memory_mib: spec.limits.memory_mib,
            memory_file,
            kernel_args: network.kernel_args.clone(),
            network: network.vm.clone(),
            background: spec.background,
        };
        let started = Instant::now();
        let running = match &launch {
            Launch::Boot { .. } => runtime.backend.start(&vm_spec).await?,
            Launch::Restore { dir, .. } => runtime.backend.restore(&vm_spec, dir).await?,
        };
        let RunningVm {
            mut process,
            channel,
        } = running;
        let boot_timeout = spec.boot_timeout.unwrap_or(if runtime.host.is_kvm() {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(120)
        });

        let (agent, start_mode) = tokio::select! {
            handshake = tokio::time::timeout(boot_timeout, connect_agent(channel, &launch, &id)) => {
                match handshake {
                    Ok(Ok(agent)) => agent,
                    Ok(Err(err)) => {
                        let reason = err.to_string();
                        process.destroy().await;
                        return Err(boot_error(&id, reason, process.as_ref()));
                    }
                    Err(_) => {
                        process.destroy().await;
                        let reason = format!("the guest agent did not start within {boot_timeout:?}");
                        return Err(boot_error(&id, reason, process.as_ref()));
                    }
                }
            }
            reason = process.wait_exit() => {
                return Err(boot_error(&id, reason, process.as_ref()));
            }
        };
        tracing::debug!(
            sandbox = %id,
            mode = ?start_mode,
            start_ms = started.elapsed().as_millis() as u64,
            "sandbox ready"
        );
        std::mem::forget(guard);

        Ok(Self {
            id,
            env: network.merge_env(spec.env),
            network: network.network,
            run_dir,
            process,
            agent,
            workdir: spec.workdir,
            user: spec.user,
            limits: spec.limits,
            start_mode,
            background: spec.background,
        })
    }

    /// Runs `argv` with the sandbox's defaults and waits for it to end, discarding its
    /// output. Fails only when the command could not run, not on its exit code.
    pub(crate) async fn run_to_end(&self, argv: &[&str]) -> Result<()> {
        let request = ExecRequest {
            argv: argv.iter().map(|arg| (*arg).to_owned()).collect(),
            ..ExecRequest::default()
        };
        self.exec(request).await?.collect().await.map(drop)
    }

    /// Moves a sandbox started at background priority to normal priority,
    /// as it is handed to a user. A failure is logged: the sandbox works,
    /// only slower while the host is busy.
    pub fn to_foreground(&mut self) {
        if !std::mem::take(&mut self.background) {
            return;
        }
        let Some(pid) = self.process.pid() else {
            return;
        };
        if let Err(err) = crate::vmm_process::restore_priority(pid) {
            tracing::warn!(sandbox = %self.id, error = %err, "restoring the VMM's CPU priority failed");
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Guest ports published on the host, with the address to connect to.
    pub fn published_ports(&self) -> &[PublishedPort] {
        self.network
            .as_ref()
            .map_or(&[], |network| network.published())
    }

    /// Counters of the sandbox's outbound traffic; zero without egress.
    pub fn network_stats(&self) -> NetworkStats {
        self.network
            .as_ref()
            .map(net::SandboxNetwork::stats)
            .unwrap_or_default()
    }

    /// Whether the VM booted or was restored from a snapshot.
    pub fn start_mode(&self) -> StartMode {
        self.start_mode
    }

    /// The VMM process, for saving a snapshot of it.
    pub(crate) fn process_mut(&mut self) -> &mut dyn VmProcess {
        self.process.as_mut()
    }

    /// Replaces the defaults that commands inherit: environment, working
    /// directory and user. A pool hands out sandboxes created for another
    /// spec of the same image and shape.
    pub(crate) fn set_command_defaults(&mut self, spec: &SandboxSpec) {
        self.env = spec.env.clone();
        self.workdir = spec.workdir.clone();
        self.user = spec.user.clone();
    }

    /// Whether the VM still runs and its agent channel is open.
    pub fn is_alive(&mut self) -> bool {
        self.agent.is_connected() && !self.process.has_exited()
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The agent connection, for file transfers and other requests.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Completes `request` with the image's defaults and starts it: image
    /// environment first, then the request's own variables, which win.
    pub async fn exec(&self, mut request: ExecRequest) -> Result<ExecHandle> {
        let mut env = self.env.clone();
        for (key, value) in request.env.drain(..) {
            env.retain(|(existing, _)| *existing != key);
            env.push((key, value));
        }
        request.env = env;
        if request.cwd.is_none() {
            request.cwd = self.workdir.clone();
        }
        if request.user.is_none() {
            request.user = self.user.clone();
        }
        self.agent.exec(request).await
    }

    /// Waits until the VM stops by itself and returns the reason as an error.
    pub async fn wait_lost(&mut self) -> Error {
        let reason = self.process.wait_exit().await;
        Error::SandboxLost {
            id: self.id.clone(),
            reason,
        }
    }

    /// The end of the guest console, for diagnosing failures.
    pub fn console_tail(&self) -> String {
        self.process.console_tail()
    }

    /// Kills the VM and removes everything the sandbox had on disk.
    pub async fn destroy(mut self) {
        self.process.destroy().await;
        // Drop removes the folder.
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.process.kill();
        // The network goes first, so a crash before the folder is removed
        // leaves only what the sweep of the folder finds.
        self.network.take();
        let _ = fs::remove_dir_all(&self.run_dir);
    }
}

/// Checks the limits and that the image root exists.
fn check_spec(spec: &SandboxSpec) -> Result<()> {
    spec.limits.validate()?;
    if !spec.root_disk.is_file() {
        return Err(Error::Io {
            context: format!(
                "image root file system {} not found",
                spec.root_disk.display()
            ),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    Ok(())
}

/// Opens the agent session of a started VM. A booted agent sends its hello;
/// a restored one continues the session of its snapshot, so it is asked
/// to respond and then refreshed: clock, RNG and host name would otherwise
/// repeat the snapshot's. An agent that dials the host (vsock) after the
/// restore sends a fresh hello instead.
async fn connect_agent(
    channel: AgentChannel,
    launch: &Launch<'_>,
    id: &str,
) -> Result<(AgentClient, StartMode)> {
    let hello = match launch {
        Launch::Boot { .. } => {
            let agent = AgentClient::handshake(channel.connect().await?).await?;
            return Ok((agent, StartMode::ColdBoot));
        }
        Launch::Restore { hello, .. } => hello,
    };
    let agent = match channel {
        AgentChannel::Connected(stream) => AgentClient::resume(stream, (**hello).clone()).await?,
        pending => AgentClient::handshake(pending.connect().await?).await?,
    };
    refresh(&agent, id).await?;
    Ok((agent, StartMode::Snapshot))
}

/// A refresh round trip above which the guest clock may be off by more
/// than is acceptable, so the refresh is sent again.
const CLOCK_TOLERANCE: Duration = Duration::from_millis(50);

/// Refreshes a restored guest's clock, RNG and host name.
///
/// The request carries the host's time when it was sent, so the guest clock
/// ends behind by the time the request took to arrive. Under TCG the first
/// request after a restore can take over a second on a loaded host, while
/// the guest runs its code through an empty translation cache. The refresh
/// is therefore sent up to three times, until one completes within
/// [`CLOCK_TOLERANCE`], which bounds the error to that round trip.
async fn refresh(agent: &AgentClient, id: &str) -> Result<()> {
    for attempt in 1..=3 {
        let started = Instant::now();
        agent.refresh(snapshot::host_entropy()?, id).await?;
        let round_trip = started.elapsed();
        if round_trip <= CLOCK_TOLERANCE {
            break;
        }
        tracing::debug!(
            sandbox = %id,
            attempt,
            round_trip_ms = round_trip.as_millis() as u64,
            "a slow refresh may have left the guest clock behind"
        );
    }
    Ok(())
}

/// Removes a run folder unless forgotten.
struct RunDirGuard(Option<PathBuf>);

impl Drop for RunDirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

fn boot_error(id: &str, reason: String, process: &dyn VmProcess) -> Error {
    let tail = process.console_tail();
    let tail = tail.trim();
    let console = if tail.is_empty() {
        String::new()
    } else {
        format!("\nGuest console:\n{}", crate::tail::last_chars(tail, 2000))
    };
    Error::Boot {
        id: id.to_string(),
        reason,
        console,
    }
}

/// A fresh sandbox id: `sb-` and 12 random hex digits.
fn new_id() -> String {
    let mut bytes = [0u8; 6];
    let filled = fs::File::open("/dev/urandom").and_then(|mut file| file.read_exact(&mut bytes));
    if filled.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes.copy_from_slice(&(nanos as u64 ^ u64::from(std::process::id())).to_le_bytes()[..6]);
    }
    format!("sb-{}", hex::encode(bytes))
}

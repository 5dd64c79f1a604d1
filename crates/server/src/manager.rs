//! [`SandboxManager`]: every sandbox of the server, its limits, timeout, processes and usage.
//!
//! HTTP handlers turn requests into the typed actions of this module ([`CreateAction`],
//! [`ExecAction`]) and call the manager, so this module uses no HTTP types.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use upstream_client::api;
use upstream_image::{ImageStore, NoProgress};
use upstream_protocol::ExecRequest;
use upstream_vmm::{Limits, Pool, PoolConfig, Runtime, Sandbox, SandboxSpec};

use crate::db::{Db, KeyRecord, UsageStart};
use crate::metrics::Metrics;
use crate::process::Process;

/// Finished processes kept per sandbox for `GET .../processes`; older ones are forgotten.
const FINISHED_PROCESSES_KEPT: usize = 32;

/// How long destroy waits for requests that still use a sandbox to let go of it before it
/// kills the VM under them.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Limits the manager enforces.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Live and booting sandboxes, over all callers.
    pub max_sandboxes: usize,
    /// Live and booting sandboxes per API key, unless the key sets its own limit.
    pub max_sandboxes_per_key: usize,
    /// Output kept per command; older output is dropped past it.
    pub max_output_bytes: u64,
    /// Image used when a create request names none.
    pub default_image: String,
    /// Ready sandboxes kept per image and shape by the warm pool; 0 turns
    /// the pool off, so every create boots or restores its own sandbox.
    pub pool_size: usize,
    /// A pool that handed out nothing for this long is emptied.
    pub pool_idle_timeout: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            max_sandboxes: 16,
            max_sandboxes_per_key: 8,
            max_output_bytes: 16 << 20,
            default_image: "base".into(),
            pool_size: 0,
            pool_idle_timeout: Duration::from_secs(300),
        }
    }
}

/// The identity behind a request: its API key, or none when the server runs without keys.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    pub key: Option<KeyRecord>,
}

impl Caller {
    fn key_id(&self) -> Option<&str> {
        self.key.as_ref().map(|key| key.id.as_str())
    }

    /// Whether this caller may see a sandbox owned by `owner`.
    fn owns(&self, owner: Option<&str>) -> bool {
        self.key.is_none() || self.key_id() == owner
    }
}

/// A validated create request.
#[derive(Clone, Debug)]
pub struct CreateAction {
    pub image: Option<String>,
    pub limits: Limits,
    pub env: BTreeMap<String, String>,
    pub timeout: Option<Duration>,
    pub metadata: BTreeMap<String, String>,
}

/// A validated exec request.
#[derive(Clone, Debug)]
pub struct ExecAction {
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub stdin: Option<Vec<u8>>,
    pub keep_stdin_open: bool,
    pub timeout_ms: Option<u64>,
    pub background: bool,
}

/// Errors of the manager: actions it rejected or that failed.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("Sandbox {0} not found")]
    SandboxNotFound(String),
    #[error("Process {process} not found in sandbox {sandbox}")]
    ProcessNotFound { sandbox: String, process: String },
    #[error("Sandbox limit reached: {count} of {max} sandboxes {scope}; destroy one first")]
    TooManySandboxes {
        count: usize,
        max: usize,
        scope: &'static str,
    },
    #[error("Image {reference} not found and could not be pulled: {reason}")]
    Image { reference: String, reason: String },
    #[error("The server is shutting down")]
    ShuttingDown,
    #[error("Sandbox {0} is being destroyed")]
    Destroying(String),
    #[error(transparent)]
    Sandbox(#[from] upstream_vmm::Error),
}

/// Result type of the manager.
pub type Result<T, E = ManagerError> = std::result::Result<T, E>;

/// Counts of sandboxes held, total and per key, including sandboxes still booting.
#[derive(Default)]
struct Slots {
    total: usize,
    by_key: HashMap<Option<String>, usize>,
}

/// One held place under the sandbox limits; returned by `release` or on drop.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    key: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut slots = self.slots.lock().unwrap();
        slots.total -= 1;
        if let Some(count) = slots.by_key.get_mut(&self.key) {
            *count -= 1;
        }
    }
}

/// The timeout of a sandbox: its length and when it expires.
#[derive(Clone, Copy, Debug)]
struct Deadline {
    secs: u64,
    at: Instant,
    wall: SystemTime,
}

/// A live sandbox with what the server keeps about it.
pub struct Entry {
    pub id: String,
    owner: Option<String>,
    image: String,
    limits: Limits,
    metadata: BTreeMap<String, String>,
    created_at: SystemTime,
    boot: Duration,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    deadline: Mutex<Option<Deadline>>,
    processes: Mutex<Vec<Arc<Process>>>,
    next_process: AtomicU64,
    /// Fires when the sandbox is being destroyed; running work stops.
    pub cancel: CancellationToken,
    slot: Mutex<Option<Slot>>,
}

impl Entry {
    /// The sandbox, unless it is being destroyed.
    pub fn sandbox(&self) -> Result<Arc<Sandbox>> {
        self.sandbox
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| ManagerError::Destroying(self.id.clone()))
    }

    pub fn info(&self) -> api::Sandbox {
        let deadline = *self.deadline.lock().unwrap();
        let destroying = self.sandbox.lock().unwrap().is_none();
        api::Sandbox {
            id: self.id.clone(),
            image: self.image.clone(),
            state: if destroying {
                api::SandboxState::Destroying
            } else {
                api::SandboxState::Running
            },
            vcpus: self.limits.vcpus,
            memory_mib: self.limits.memory_mib,
            disk_mib: self.limits.disk_mib,
            metadata: self.metadata.clone(),
            created_at: crate::rfc3339(self.created_at),
            boot_secs: self.boot.as_secs_f64(),
            timeout_secs: deadline.map(|deadline| deadline.secs),
            expires_at: deadline.map(|deadline| crate::rfc3339(deadline.wall)),
        }
    }

    fn set_timeout(&self, timeout: Option<Duration>) {
        *self.deadline.lock().unwrap() = timeout.map(|timeout| Deadline {
            secs: timeout.as_secs(),
            at: Instant::now() + timeout,
            wall: SystemTime::now() + timeout,
        });
    }

    fn expired(&self, now: Instant) -> bool {
        self.deadline
            .lock()
            .unwrap()
            .is_some_and(|deadline| deadline.at <= now)
    }

    pub fn process(&self, id: &str) -> Result<Arc<Process>> {
        self.processes
            .lock()
            .unwrap()
            .iter()
            .find(|process| process.id == id)
            .cloned()
            .ok_or_else(|| ManagerError::ProcessNotFound {
                sandbox: self.id.clone(),
                process: id.to_string(),
            })
    }

    pub fn processes(&self) -> Vec<api::Process> {
        let processes = self.processes.lock().unwrap();
        processes.iter().map(|process| process.summary()).collect()
    }

    /// Adds `process` and drops the oldest finished ones over `FINISHED_PROCESSES_KEPT`.
    fn add_process(&self, process: Arc<Process>) {
        let mut processes = self.processes.lock().unwrap();
        processes.push(process);
        let finished = processes.iter().filter(|p| !p.is_running()).count();
        let mut excess = finished.saturating_sub(FINISHED_PROCESSES_KEPT);
        processes.retain(|process| {
            if excess > 0 && !process.is_running() {
                excess -= 1;
                return false;
            }
            true
        });
    }
}

/// Owns every sandbox of the server.
pub struct SandboxManager {
    runtime: Arc<Runtime>,
    images: ImageStore,
    db: Arc<Db>,
    pub metrics: Arc<Metrics>,
    config: ManagerConfig,
    sandboxes: Mutex<HashMap<String, Arc<Entry>>>,
    slots: Arc<Mutex<Slots>>,
    /// Ready sandboxes, each handed out once; `None` when the pool is off.
    pool: Option<Pool>,
    /// Fires when the server stops: running commands end and no sandbox may be created.
    shutdown: CancellationToken,
}

impl SandboxManager {
    pub fn new(
        runtime: Arc<Runtime>,
        images: ImageStore,
        db: Arc<Db>,
        metrics: Arc<Metrics>,
        config: ManagerConfig,
    ) -> Arc<Self> {
        let pool = (config.pool_size > 0).then(|| {
            let pool_config = PoolConfig {
                size: config.pool_size,
                idle_timeout: config.pool_idle_timeout,
                ..PoolConfig::default()
            };
            Pool::new(Arc::clone(&runtime), pool_config)
        });
        Arc::new(Self {
            pool,
            runtime,
            images,
            db,
            metrics,
            config,
            sandboxes: Mutex::default(),
            slots: Arc::default(),
            shutdown: CancellationToken::new(),
        })
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub fn running(&self) -> usize {
        self.sandboxes.lock().unwrap().len()
    }

    /// Starts the once-a-second task that meters usage and destroys expired sandboxes.
    pub fn start_ticker(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let manager = Arc::clone(self);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_secs(1));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => manager.tick(),
                    _ = manager.shutdown.cancelled() => return,
                }
            }
        })
    }

    fn tick(self: &Arc<Self>) {
        let entries: Vec<Arc<Entry>> = self.sandboxes.lock().unwrap().values().cloned().collect();
        let ids: Vec<String> = entries.iter().map(|entry| entry.id.clone()).collect();
        if let Err(err) = self.db.heartbeat(&ids) {
            tracing::error!(error = %err, "metering heartbeat failed");
        }
        let now = Instant::now();
        for entry in entries.into_iter().filter(|entry| entry.expired(now)) {
            let manager = Arc::clone(self);
            tokio::spawn(async move {
                tracing::info!(sandbox = %entry.id, "sandbox timeout expired");
                manager.destroy_entry(&entry.id, "timeout").await;
            });
        }
    }

    /// Holds a place under the total and per-key limits for a new sandbox.
    fn reserve(&self, caller: &Caller) -> Result<Slot> {
        let mut slots = self.slots.lock().unwrap();
        if slots.total >= self.config.max_sandboxes {
            return Err(ManagerError::TooManySandboxes {
                count: slots.total,
                max: self.config.max_sandboxes,
                scope: "on this server",
            });
        }
        let key = caller.key_id().map(str::to_string);
        let held = slots.by_key.get(&key).copied().unwrap_or(0);
        if let Some(record) = &caller.key {
            let max = record
                .max_sandboxes
                .map_or(self.config.max_sandboxes_per_key, |max| max as usize);
            if held >= max {
                return Err(ManagerError::TooManySandboxes {
                    count: held,
                    max,
                    scope: "for this API key",
                });
            }
        }
        slots.total += 1;
        *slots.by_key.entry(key.clone()).or_default() += 1;
        Ok(Slot {
            slots: Arc::clone(&self.slots),
            key,
        })
    }

    /// Boots a sandbox and starts metering it.
    #[tracing::instrument(skip_all)]
    pub async fn create(&self, caller: &Caller, action: CreateAction) -> Result<api::Sandbox> {
        if self.shutdown.is_cancelled() {
            return Err(ManagerError::ShuttingDown);
        }
        let slot = self.reserve(caller)?;
        let reference = action
            .image
            .clone()
            .unwrap_or_else(|| self.config.default_image.clone());
        let started = Instant::now();
        let result = async {
            let image = self.resolve_image(&reference).await?;
            let mut env = crate::image_env(&image.config.env);
            for (key, value) in &action.env {
                env.retain(|(existing, _)| existing != key);
                env.push((key.clone(), value.clone()));
            }
            let spec = SandboxSpec {
                root_disk: image.rootfs.clone(),
                env,
                workdir: image.config.working_dir.clone().filter(|d| !d.is_empty()),
                user: image.config.user.clone().filter(|u| !u.is_empty()),
                limits: action.limits,
                ..SandboxSpec::default()
            };
            let create = async {
                match &self.pool {
                    Some(pool) => pool.acquire(spec).await,
                    None => Sandbox::create(&self.runtime, spec).await,
                }
            };
            tokio::select! {
                sandbox = create => Ok(sandbox?),
                _ = self.shutdown.cancelled() => Err(ManagerError::ShuttingDown),
            }
        }
        .await;
        let sandbox = match result {
            Ok(sandbox) => sandbox,
            Err(err) => {
                self.metrics
                    .sandbox_create_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(image = %reference, error = %err, "sandbox creation failed");
                return Err(err);
            }
        };
        let boot = started.elapsed();
        self.metrics.observe_boot(boot);
        self.metrics
            .sandboxes_created
            .fetch_add(1, Ordering::Relaxed);

        let entry = Arc::new(Entry {
            id: sandbox.id().to_string(),
            owner: caller.key_id().map(str::to_string),
            image: reference,
            limits: action.limits,
            metadata: action.metadata,
            created_at: SystemTime::now(),
            boot,
            sandbox: Mutex::new(Some(Arc::new(sandbox))),
            deadline: Mutex::new(None),
            processes: Mutex::default(),
            next_process: AtomicU64::new(1),
            cancel: self.shutdown.child_token(),
            slot: Mutex::new(Some(slot)),
        });
        entry.set_timeout(action.timeout);
        let usage = UsageStart {
            sandbox_id: &entry.id,
            key_id: entry.owner.as_deref(),
            image: &entry.image,
            vcpus: entry.limits.vcpus,
            memory_mib: entry.limits.memory_mib,
            metadata: &entry.metadata,
        };
        if let Err(err) = self.db.start_usage(&usage) {
            tracing::error!(sandbox = %entry.id, error = %err, "recording usage failed");
        }
        self.sandboxes
            .lock()
            .unwrap()
            .insert(entry.id.clone(), Arc::clone(&entry));
        tracing::info!(
            sandbox = %entry.id,
            image = %entry.image,
            boot_ms = boot.as_millis() as u64,
            "sandbox created"
        );
        // A shutdown that began during the boot has already destroyed the other sandboxes.
        if self.shutdown.is_cancelled() {
            self.destroy_entry(&entry.id, "server_shutdown").await;
            return Err(ManagerError::ShuttingDown);
        }
        Ok(entry.info())
    }

    async fn resolve_image(&self, reference: &str) -> Result<upstream_image::LocalImage> {
        let image_error = |reason: String| ManagerError::Image {
            reference: reference.to_string(),
            reason,
        };
        if let Some(image) = self
            .images
            .get(reference)
            .map_err(|err| image_error(err.to_string()))?
        {
            self.images.touch(&image);
            return Ok(image);
        }
        // The pull future is not provably `Send` (a higher-ranked lifetime inside the OCI
        // client), so it runs on a blocking thread of its own instead of a worker.
        let images = self.images.clone();
        let owned = reference.to_string();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || handle.block_on(images.pull(&owned, &NoProgress)))
            .await
            .map_err(|err| image_error(format!("the pull task failed: {err}")))?
            .map_err(|err| image_error(err.to_string()))
    }

    /// The entry of sandbox `id`, if `caller` may use it.
    pub fn get(&self, caller: &Caller, id: &str) -> Result<Arc<Entry>> {
        let sandboxes = self.sandboxes.lock().unwrap();
        sandboxes
            .get(id)
            .filter(|entry| caller.owns(entry.owner.as_deref()))
            .cloned()
            .ok_or_else(|| ManagerError::SandboxNotFound(id.to_string()))
    }

    /// Sandboxes of `caller` whose metadata contains every pair of `metadata`.
    pub fn list(
        &self,
        caller: &Caller,
        metadata: &BTreeMap<String, String>,
        state: Option<api::SandboxState>,
    ) -> Vec<api::Sandbox> {
        let entries: Vec<Arc<Entry>> = self.sandboxes.lock().unwrap().values().cloned().collect();
        let mut list: Vec<api::Sandbox> = entries
            .iter()
            .filter(|entry| caller.owns(entry.owner.as_deref()))
            .filter(|entry| {
                metadata
                    .iter()
                    .all(|(key, value)| entry.metadata.get(key) == Some(value))
            })
            .map(|entry| entry.info())
            .filter(|info| state.is_none_or(|state| info.state == state))
            .collect();
        list.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        list
    }

    /// Sets or removes the timeout of sandbox `id`, counted from now.
    pub fn set_timeout(
        &self,
        caller: &Caller,
        id: &str,
        timeout: Option<Duration>,
    ) -> Result<api::Sandbox> {
        let entry = self.get(caller, id)?;
        entry.set_timeout(timeout);
        Ok(entry.info())
    }

    /// Destroys sandbox `id` for `caller`.
    pub async fn destroy(&self, caller: &Caller, id: &str) -> Result<()> {
        self.get(caller, id)?;
        if self.destroy_entry(id, "destroyed").await {
            Ok(())
        } else {
            Err(ManagerError::SandboxNotFound(id.to_string()))
        }
    }

    /// Kills the commands and the VM of sandbox `id`, ends its usage with `reason` and
    /// frees its place under the limits. Returns false when another call got there first.
    async fn destroy_entry(&self, id: &str, reason: &str) -> bool {
        let Some(entry) = self.sandboxes.lock().unwrap().get(id).cloned() else {
            return false;
        };
        let Some(sandbox) = entry.sandbox.lock().unwrap().take() else {
            return false;
        };
        entry.cancel.cancel();
        let sandbox = wait_for_release(sandbox).await;
        match sandbox {
            Ok(sandbox) => sandbox.destroy().await,
            Err(shared) => {
                tracing::warn!(sandbox = %id, "a request still holds the sandbox; its VM dies when that request ends");
                drop(shared);
            }
        }
        if let Err(err) = self.db.end_usage(id, reason) {
            tracing::error!(sandbox = %id, error = %err, "recording the end of usage failed");
        }
        self.sandboxes.lock().unwrap().remove(id);
        drop(entry.slot.lock().unwrap().take());
        self.metrics
            .sandboxes_destroyed
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(sandbox = %id, reason, "sandbox destroyed");
        true
    }

    /// Starts a command in sandbox `id`.
    #[tracing::instrument(skip_all, fields(sandbox = %id))]
    pub async fn exec(
        &self,
        caller: &Caller,
        id: &str,
        action: ExecAction,
    ) -> Result<Arc<Process>> {
        let entry = self.get(caller, id)?;
        let sandbox = entry.sandbox()?;
        let request = ExecRequest {
            argv: action.command.clone(),
            env: action.env.into_iter().collect(),
            cwd: action.cwd,
            user: None,
            timeout_ms: action.timeout_ms,
            stdin: action.stdin.is_some() || action.keep_stdin_open,
        };
        let mut handle = sandbox.exec(request).await?;
        if let Some(data) = &action.stdin {
            handle.write_stdin(data).await?;
        }
        if !action.keep_stdin_open {
            handle.close_stdin().await?;
        }
        self.metrics.execs.fetch_add(1, Ordering::Relaxed);
        let number = entry.next_process.fetch_add(1, Ordering::Relaxed);
        let process = Process::start(
            format!("p-{number}"),
            action.command,
            action.background,
            handle,
            action.keep_stdin_open,
            self.config.max_output_bytes,
            &entry.cancel,
        );
        entry.add_process(Arc::clone(&process));
        Ok(process)
    }

    /// Stops every command, destroys every sandbox and ends their usage.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let ids: Vec<String> = self.sandboxes.lock().unwrap().keys().cloned().collect();
        let destroys = ids
            .iter()
            .map(|id| self.destroy_entry(id, "server_shutdown"));
        futures_util::future::join_all(destroys).await;
        if let Some(pool) = &self.pool {
            pool.shutdown().await;
        }
        if !ids.is_empty() {
            tracing::info!(count = ids.len(), "destroyed every sandbox at shutdown");
        }
    }
}

/// Waits up to `RELEASE_WAIT` for other holders of `sandbox` to drop it.
async fn wait_for_release(mut sandbox: Arc<Sandbox>) -> Result<Sandbox, Arc<Sandbox>> {
    let deadline = Instant::now() + RELEASE_WAIT;
    loop {
        match Arc::try_unwrap(sandbox) {
            Ok(sandbox) => return Ok(sandbox),
            Err(shared) if Instant::now() >= deadline => return Err(shared),
            Err(shared) => sandbox = shared,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

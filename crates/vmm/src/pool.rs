//! A warm pool: sandboxes created ahead of demand, so that acquiring one
//! takes a queue pop instead of a restore or a boot.
//!
//! There is one pool per image root and shape (vCPUs, memory, disk). It is
//! created by the first [`Pool::acquire`] for that image and shape, kept
//! full by a background task, and emptied once nothing was acquired from
//! it for [`PoolConfig::idle_timeout`]. A sandbox is handed out once and
//! never returns to the pool: the caller destroys it after use.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::runtime::Runtime;
use crate::sandbox::{Sandbox, SandboxSpec};
use crate::Result;

/// Commands run in a sandbox before it is pooled; see [`warm_up`].
const WARM_UP_COMMANDS: usize = 3;

/// How long a refill waits after a sandbox is handed out. A new owner
/// usually runs a command at once, and a restore started beside it takes
/// CPU from that command. On 2 cores under TCG, an immediate refill made the
/// first command 20 ms slower, even with the refill at background priority.
const REFILL_DELAY: Duration = Duration::from_millis(250);

/// Sizes and time limits of a [`Pool`].
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Ready sandboxes kept per image and shape. Each one is an idle VM
    /// that holds its memory.
    pub size: usize,
    /// A pool that handed out nothing for this long is emptied, and refills
    /// only on the next acquire.
    pub idle_timeout: Duration,
    /// Image-and-shape pools kept at once. Acquiring for another image or
    /// shape then creates a sandbox directly, without pooling it.
    pub max_pools: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            size: 2,
            idle_timeout: Duration::from_secs(300),
            max_pools: 4,
        }
    }
}

/// Ready sandboxes per image and shape; see the module documentation.
pub struct Pool {
    shared: Arc<Shared>,
    refills: Mutex<Vec<JoinHandle<()>>>,
}

struct Shared {
    runtime: Arc<Runtime>,
    config: PoolConfig,
    slots: Mutex<HashMap<PoolKey, Slot>>,
    closed: watch::Sender<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    root_disk: PathBuf,
    vcpus: u32,
    memory_mib: u32,
    disk_mib: u32,
}

impl PoolKey {
    fn of(spec: &SandboxSpec) -> Self {
        Self {
            root_disk: spec.root_disk.clone(),
            vcpus: spec.limits.vcpus,
            memory_mib: spec.limits.memory_mib,
            disk_mib: spec.limits.disk_mib,
        }
    }
}

/// The pool of one image and shape.
struct Slot {
    ready: VecDeque<Sandbox>,
    /// The spec that refills use; handed-out sandboxes get the acquiring
    /// spec's command defaults.
    spec: SandboxSpec,
    last_acquired: Instant,
    wake: Arc<Notify>,
}

impl Pool {
    /// Creates an empty pool. Must be called inside a Tokio runtime, which
    /// runs the refill tasks.
    pub fn new(runtime: Arc<Runtime>, config: PoolConfig) -> Self {
        let (closed, _) = watch::channel(false);
        Self {
            shared: Arc::new(Shared {
                runtime,
                config,
                slots: Mutex::default(),
                closed,
            }),
            refills: Mutex::default(),
        }
    }

    /// Hands out a ready sandbox of `spec`'s image and shape, or creates
    /// one when none is ready; either way the pool then refills. The
    /// sandbox belongs to the caller, who destroys it after use.
    pub async fn acquire(&self, spec: SandboxSpec) -> Result<Sandbox> {
        // A network is set up at boot, so pooled sandboxes have none, and a
        // sandbox that needs one is created for its own spec.
        if spec.wants_network() {
            return Sandbox::create(&self.shared.runtime, spec).await;
        }
        let key = PoolKey::of(&spec);
        loop {
            let Some(mut sandbox) = self.take_ready(&key, &spec) else {
                break;
            };
            if sandbox.is_alive() {
                sandbox.to_foreground();
                sandbox.set_command_defaults(&spec);
                return Ok(sandbox);
            }
            tracing::warn!(sandbox = %sandbox.id(), "a pooled sandbox died while idle");
            sandbox.destroy().await;
        }
        Sandbox::create(&self.shared.runtime, spec).await
    }

    /// Pops a ready sandbox, starting the pool of `key` if there is none.
    fn take_ready(&self, key: &PoolKey, spec: &SandboxSpec) -> Option<Sandbox> {
        let mut slots = self.shared.slots.lock().unwrap();
        if *self.shared.closed.borrow() {
            return None;
        }
        if let Some(slot) = slots.get_mut(key) {
            slot.last_acquired = Instant::now();
            slot.wake.notify_one();
            return slot.ready.pop_front();
        }
        if slots.len() >= self.shared.config.max_pools || self.shared.config.size == 0 {
            return None;
        }
        let wake = Arc::new(Notify::new());
        slots.insert(
            key.clone(),
            Slot {
                ready: VecDeque::new(),
                spec: spec.clone(),
                last_acquired: Instant::now(),
                wake: Arc::clone(&wake),
            },
        );
        let task = tokio::spawn(refill(Arc::clone(&self.shared), key.clone(), wake));
        let mut refills = self.refills.lock().unwrap();
        refills.retain(|task| !task.is_finished());
        refills.push(task);
        None
    }

    /// Ready sandboxes across all images and shapes.
    pub fn ready(&self) -> usize {
        let slots = self.shared.slots.lock().unwrap();
        slots.values().map(|slot| slot.ready.len()).sum()
    }

    /// Stops refilling and destroys every ready sandbox. Sandboxes already
    /// handed out are not affected.
    pub async fn shutdown(&self) {
        self.shared.closed.send_replace(true);
        let refills: Vec<_> = self.refills.lock().unwrap().drain(..).collect();
        for task in refills {
            let _ = task.await;
        }
        let drained: Vec<Sandbox> = {
            let mut slots = self.shared.slots.lock().unwrap();
            slots.drain().flat_map(|(_, slot)| slot.ready).collect()
        };
        for sandbox in drained {
            sandbox.destroy().await;
        }
    }
}

impl Drop for Pool {
    /// Stops the refill tasks; dropping the ready sandboxes kills their VMs.
    fn drop(&mut self) {
        self.shared.closed.send_replace(true);
        for task in self.refills.lock().unwrap().drain(..) {
            task.abort();
        }
        self.shared.slots.lock().unwrap().clear();
    }
}

/// The next action of a refill task.
enum Step {
    /// Create a sandbox of this spec, not before the instant.
    Create(Box<SandboxSpec>, Instant),
    Wait(Duration),
    Stop(Vec<Sandbox>),
}

/// Keeps the pool of `key` full until it idles out or the pool closes.
async fn refill(shared: Arc<Shared>, key: PoolKey, wake: Arc<Notify>) {
    let mut closed = shared.closed.subscribe();
    let mut backoff = Duration::from_millis(500);
    loop {
        match next_step(&shared, &key) {
            Step::Stop(idle) => {
                for sandbox in idle {
                    sandbox.destroy().await;
                }
                return;
            }
            Step::Wait(idle_left) => {
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(idle_left) => {}
                    _ = closed.changed() => {}
                }
            }
            Step::Create(spec, not_before) => {
                tokio::select! {
                    () = tokio::time::sleep_until(not_before.into()) => {}
                    _ = closed.changed() => continue,
                }
                create_one(&shared, &key, *spec, &mut backoff, &mut closed).await;
            }
        }
    }
}

/// Creates one sandbox for the pool of `key` and stores it; after a
/// failure, waits out `backoff` and doubles it.
async fn create_one(
    shared: &Shared,
    key: &PoolKey,
    spec: SandboxSpec,
    backoff: &mut Duration,
    closed: &mut watch::Receiver<bool>,
) {
    match Sandbox::create(&shared.runtime, spec).await {
        Ok(sandbox) => {
            *backoff = Duration::from_millis(500);
            warm_up(&sandbox).await;
            if let Some(unwanted) = store(shared, key, sandbox) {
                unwanted.destroy().await;
            }
        }
        Err(err) => {
            tracing::warn!(
                image = %key.root_disk.display(),
                error = %err,
                retry_ms = backoff.as_millis() as u64,
                "refilling the sandbox pool failed"
            );
            tokio::select! {
                () = tokio::time::sleep(*backoff) => {}
                _ = closed.changed() => {}
            }
            *backoff = (*backoff * 2).min(Duration::from_secs(30));
        }
    }
}

/// Runs a few commands in a new sandbox before it is pooled, so the
/// acquirer's first command does not pay for them. Under TCG the first
/// processes a restored guest starts cost hundreds of milliseconds, because
/// a new QEMU translates the guest's fork and exec paths afresh, and the
/// translation cache keeps filling over the first few commands.
async fn warm_up(sandbox: &Sandbox) {
    for _ in 0..WARM_UP_COMMANDS {
        if let Err(err) = sandbox.run_to_end(&["true"]).await {
            tracing::debug!(sandbox = %sandbox.id(), error = %err, "warming up a pooled sandbox failed");
            return;
        }
    }
}

fn next_step(shared: &Shared, key: &PoolKey) -> Step {
    let mut slots = shared.slots.lock().unwrap();
    if *shared.closed.borrow() {
        return Step::Stop(Vec::new());
    }
    let Some(slot) = slots.get_mut(key) else {
        return Step::Stop(Vec::new());
    };
    let idle = slot.last_acquired.elapsed();
    if idle >= shared.config.idle_timeout {
        let slot = slots.remove(key).expect("slot present");
        tracing::debug!(
            image = %key.root_disk.display(),
            destroyed = slot.ready.len(),
            "emptied an idle sandbox pool"
        );
        return Step::Stop(slot.ready.into());
    }
    if slot.ready.len() < shared.config.size {
        // Refills start at background priority, so that on a busy host they
        // do not slow the sandboxes in use, among them the one just taken.
        let spec = SandboxSpec {
            background: crate::vmm_process::can_restore_priority(),
            ..slot.spec.clone()
        };
        return Step::Create(Box::new(spec), slot.last_acquired + REFILL_DELAY);
    }
    Step::Wait(shared.config.idle_timeout - idle)
}

/// Adds a new sandbox to the pool of `key`; hands it back when the pool is
/// gone or closed.
fn store(shared: &Shared, key: &PoolKey, sandbox: Sandbox) -> Option<Sandbox> {
    let mut slots = shared.slots.lock().unwrap();
    match slots.get_mut(key) {
        Some(slot) if !*shared.closed.borrow() => {
            slot.ready.push_back(sandbox);
            None
        }
        _ => Some(sandbox),
    }
}

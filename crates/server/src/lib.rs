//! `upstream serve`: one long-running process that owns sandboxes, the image cache and the
//! context store, and offers them over a versioned HTTP+JSON API (`/v1`, described by
//! `openapi.json` in this crate).
//!
//! The crate has three layers:
//!
//! - [`api`]: axum handlers that parse and validate requests into typed actions;
//! - [`SandboxManager`]: every sandbox, its limits, timeout, processes and metering;
//! - [`Db`]: the SQLite file with API keys and per-second usage, `<data>/server/server.db`.
//!
//! [`Server::bind`] takes an exclusive lock on `<data>/server/server.lock`, so one data
//! directory has at most one server. Because of that lock, every usage row left open at
//! start-up belongs to a server that died: it is ended at its last heartbeat and
//! reported, and `Runtime::open` has already killed the VMs of such a server.
//!
//! # Known limitations
//!
//! - A sandbox whose VM crashes stays listed until it is destroyed or times out; its
//!   commands fail with 503.
//! - Turns submitted to `/v1/runs` boot their own sandbox, which counts neither against
//!   the sandbox limits nor in the usage records.
//! - Calls into SQLite run on the async threads; each is one short statement.

pub mod api;
mod db;
mod manager;
mod metrics;
mod process;

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use upstream_image::ImageStore;
use upstream_store::LocalStore;
use upstream_turn::TurnRunner;
use upstream_vmm::{DataDir, Runtime, RuntimeOptions};

pub use db::{Db, DbError, KeyRecord, NewKey, UsageGrouping, UsageLine};
pub use manager::{Caller, CreateAction, ExecAction, ManagerConfig, ManagerError, SandboxManager};
pub use metrics::Metrics;

/// Default address of the HTTP listener: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7878";

/// How long the server waits for open requests after a shutdown began.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of one server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// TCP address to listen on; `None` serves only the Unix socket.
    pub listen: Option<SocketAddr>,
    /// Unix socket to listen on as well, created with mode 0600.
    pub socket: Option<PathBuf>,
    /// Require an API key on every request. Always on for a listener that is not on a
    /// loopback address.
    pub require_keys: bool,
    /// Largest JSON request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest file upload, in bytes.
    pub max_upload_bytes: u64,
    pub manager: ManagerConfig,
    pub runtime: RuntimeOptions,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: Some(DEFAULT_LISTEN.parse().expect("a valid address")),
            socket: None,
            require_keys: false,
            max_body_bytes: 16 << 20,
            max_upload_bytes: 4 << 30,
            manager: ManagerConfig::default(),
            runtime: RuntimeOptions::default(),
        }
    }
}

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("Another `upstream serve` uses {0}; stop it or set UPSTREAM_HOME to another folder")]
    AlreadyRunning(PathBuf),
    #[error(
        "Listening on {0} needs API keys, because it is not a loopback address; create one \
         with `upstream key create`"
    )]
    KeysRequired(SocketAddr),
    #[error("API keys are required but none exists; create one with `upstream key create`")]
    NoKeys,
    #[error("Listening on {address} failed")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] upstream_vmm::Error),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("Opening the image cache failed")]
    Images(#[source] upstream_image::ImageError),
    #[error("Opening the context store failed")]
    Store(#[source] upstream_store::StoreError),
}

/// The server's folder under the data directory.
pub fn server_dir(data: &DataDir) -> PathBuf {
    data.root().join("server")
}

/// Opens the server database of `data`, for the key and usage commands.
pub fn open_db(data: &DataDir) -> Result<Db, DbError> {
    Db::open(&server_dir(data).join("server.db"))
}

/// A sandbox that a previous server left running, found at start-up.
#[derive(Debug, Clone)]
pub struct RecoveredSandbox {
    pub id: String,
    /// Last time the previous server metered it, in Unix milliseconds.
    pub last_seen_ms: i64,
}

/// A bound server, ready to run.
pub struct Server {
    manager: Arc<SandboxManager>,
    router: axum::Router,
    routes: Vec<(axum::http::Method, &'static str)>,
    tcp: Option<tokio::net::TcpListener>,
    unix: Option<(tokio::net::UnixListener, PathBuf)>,
    recovered: Vec<RecoveredSandbox>,
    require_keys: bool,
    _lock: std::fs::File,
}

impl Server {
    /// Opens the runtime, the stores and the database, ends the usage of sandboxes a dead
    /// server left, and binds the listeners.
    pub async fn bind(data: DataDir, config: ServerConfig) -> Result<Self, ServerError> {
        let dir = server_dir(&data);
        std::fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
        let lock = lock_server_dir(&dir)?;

        let db = Arc::new(Db::open(&dir.join("server.db"))?);
        let non_loopback = config.listen.filter(|addr| !addr.ip().is_loopback());
        let require_keys = config.require_keys || non_loopback.is_some();
        if require_keys && !db.has_active_keys()? {
            return Err(match non_loopback {
                Some(addr) => ServerError::KeysRequired(addr),
                None => ServerError::NoKeys,
            });
        }

        // Opening the runtime kills the VMs of sandboxes whose owner process died.
        let runtime = Arc::new(Runtime::open(data.clone(), config.runtime.clone())?);
        let recovered: Vec<RecoveredSandbox> = db
            .end_orphans("server_lost")?
            .into_iter()
            .map(|orphan| RecoveredSandbox {
                id: orphan.sandbox_id,
                last_seen_ms: orphan.last_seen_ms,
            })
            .collect();
        for sandbox in &recovered {
            tracing::warn!(
                sandbox = %sandbox.id,
                "destroyed a sandbox left by a server that stopped without shutting down"
            );
        }

        let images = ImageStore::open(&data.images()).map_err(ServerError::Images)?;
        let store = Arc::new(LocalStore::open(data.root()).map_err(ServerError::Store)?);
        let runner = TurnRunner::new(Arc::clone(&runtime), images.clone(), store.clone());
        let metrics = Arc::new(Metrics::default());
        let manager = SandboxManager::new(
            runtime,
            images,
            Arc::clone(&db),
            metrics,
            config.manager.clone(),
        );
        let state = api::AppState {
            manager: Arc::clone(&manager),
            db,
            store,
            runner: Arc::new(runner),
            require_keys,
            max_upload_bytes: config.max_upload_bytes,
        };
        let (router, routes) = api::router(state, config.max_body_bytes);

        let tcp =
            match config.listen {
                Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(
                    |source| ServerError::Bind {
                        address: addr.to_string(),
                        source,
                    },
                )?),
                None => None,
            };
        let unix = match &config.socket {
            Some(path) => Some((bind_unix(path)?, path.clone())),
            None => None,
        };
        Ok(Self {
            manager,
            router,
            routes,
            tcp,
            unix,
            recovered,
            require_keys,
            _lock: lock,
        })
    }

    /// The bound TCP address, useful after binding port 0.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|tcp| tcp.local_addr().ok())
    }

    /// Sandboxes a previous server left, destroyed and metered up to their last heartbeat.
    pub fn recovered(&self) -> &[RecoveredSandbox] {
        &self.recovered
    }

    pub fn require_keys(&self) -> bool {
        self.require_keys
    }

    /// Every (method, path) the router serves.
    pub fn routes(&self) -> &[(axum::http::Method, &'static str)] {
        &self.routes
    }

    /// Serves until `shutdown` completes, then stops accepting, kills running commands,
    /// destroys every sandbox and waits up to `DRAIN_TIMEOUT` for open requests.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        let ticker = self.manager.start_ticker();
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(listener) = self.tcp {
            let serve = axum::serve(listener, self.router.clone())
                .with_graceful_shutdown(stop.clone().cancelled_owned());
            tasks.spawn(async move { serve.await });
        }
        let socket_path = self.unix.as_ref().map(|(_, path)| path.clone());
        if let Some((listener, _)) = self.unix {
            let serve = axum::serve(listener, self.router.clone())
                .with_graceful_shutdown(stop.clone().cancelled_owned());
            tasks.spawn(async move { serve.await });
        }

        let failed = tokio::select! {
            _ = shutdown => None,
            Some(result) = tasks.join_next() => Some(result),
        };
        tracing::info!("shutting down");
        stop.cancel();
        self.manager.shutdown().await;
        ticker.abort();
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("open requests did not finish in time; closing them");
        }
        if let Some(path) = socket_path {
            let _ = std::fs::remove_file(path);
        }
        match failed {
            Some(Ok(Err(err))) => Err(err),
            _ => Ok(()),
        }
    }
}

fn lock_server_dir(dir: &Path) -> Result<std::fs::File, ServerError> {
    let path = dir.join("server.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error(format!("opening {}", path.display())))?;
    // SAFETY: flock takes a valid descriptor that `file` owns for this call.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !locked {
        return Err(ServerError::AlreadyRunning(
            dir.parent().unwrap_or(dir).to_path_buf(),
        ));
    }
    Ok(file)
}

/// Binds the Unix socket at `path` with mode 0600. A file left at `path` is removed first:
/// with the server lock held, no other server can be using it.
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ServerError> {
    use std::os::unix::fs::PermissionsExt;
    let bind_error = |source| ServerError::Bind {
        address: path.display().to_string(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(bind_error(err)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    Ok(listener)
}

fn io_error(context: String) -> impl FnOnce(std::io::Error) -> ServerError {
    move |source| ServerError::Io { context, source }
}

/// RFC 3339 form of `time` in UTC, with milliseconds.
pub(crate) fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// An image's `KEY=VALUE` environment as pairs.
pub(crate) fn image_env(env: &[String]) -> Vec<(String, String)> {
    env.iter()
        .filter_map(|entry| entry.split_once('='))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

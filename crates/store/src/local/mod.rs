//! [`LocalStore`]: the context store of one machine, in SQLite plus a blob folder.

mod maintenance;
mod queries;
mod turns;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::Connection;

use crate::blob::{BlobRef, BlobStore, Digest, FsBlobStore};
use crate::context::{ContextStore, TurnGuard};
use crate::error::{Result, StoreError};
use crate::lock::{FileLock, LockMode};
use crate::records::{
    ArtifactRecord, BeginOptions, ContextDetail, ContextManifest, ContextSummary, DocumentInfo,
    GcReport, Limits, RemovedContext, StepInput, StepRecord, TurnOutcome, TurnRecord,
    VisibleArtifact, WorkspaceSnapshot,
};
use crate::schema;

/// How long a write waits for another process's write transaction before failing. Store
/// transactions are short (no I/O outside SQLite happens inside one), so this only runs out
/// when a process hangs while holding the write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The context store of one machine.
///
/// Layout under `<data_dir>/store/`:
///
/// - `upstream.db`: SQLite database in WAL mode (with `-wal` and `-shm` files beside it).
/// - `blobs/sha256/ab/abcdef…`: blobs named by their SHA-256, read-only files.
/// - `blobs/tmp/`: blobs being written; see [`FsBlobStore`].
/// - `locks/<sha256 of the context name>.lock`: one lock file per context.
/// - `gc.lock`: coordinates [`ContextStore::gc`](crate::ContextStore::gc) with writers.
///
/// Locking: a turn holds an exclusive `flock` on its context's lock file from
/// [`begin_turn`](crate::ContextStore::begin_turn) to
/// [`finish_turn`](crate::ContextStore::finish_turn). The kernel drops the lock when the
/// process dies, even by `kill -9`. So when the lock can be taken while the database still
/// shows a running turn, that turn's process is gone. [`LocalStore::open`] and the next
/// `begin_turn` of that context then mark the turn interrupted.
///
/// Garbage collection: a writer publishes a blob and inserts the row that references it
/// while holding `gc.lock` shared, and gc deletes unreferenced blobs while holding it
/// exclusively, so gc never deletes a blob whose row is about to be written. Temp blobs are
/// locked by their writer, so gc deletes only those of writers that have ended.
///
/// Cloning is cheap and clones share one SQLite connection; separate processes each open
/// their own.
#[derive(Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

struct Inner {
    store_dir: PathBuf,
    db_path: PathBuf,
    conn: Mutex<Connection>,
    blobs: FsBlobStore,
    limits: Limits,
}

impl LocalStore {
    /// Opens the store under `<data_dir>/store`, creating and migrating it as needed, with
    /// the default [`Limits`].
    pub fn open(data_dir: &Path) -> Result<LocalStore> {
        LocalStore::open_with_limits(data_dir, Limits::default())
    }

    /// Opens the store under `<data_dir>/store` with `limits`.
    ///
    /// Also marks turns whose process has died as interrupted and deletes temp blobs of
    /// writers that have ended, so the store is consistent after a crash.
    pub fn open_with_limits(data_dir: &Path, limits: Limits) -> Result<LocalStore> {
        let store_dir = data_dir.join("store");
        let locks_dir = store_dir.join("locks");
        fs::create_dir_all(&locks_dir)
            .map_err(|source| StoreError::io("create", &locks_dir, source))?;
        let blobs = FsBlobStore::open(store_dir.join("blobs"))?;

        let db_path = store_dir.join("upstream.db");
        let mut conn = open_connection(&db_path)?;
        schema::migrate(&mut conn, &db_path)?;

        let store = LocalStore {
            inner: Arc::new(Inner {
                store_dir,
                db_path,
                conn: Mutex::new(conn),
                blobs,
                limits,
            }),
        };
        store.recover_orphaned_turns()?;
        let swept = store.inner.blobs.sweep_temp_files()?;
        if swept.files > 0 {
            tracing::info!(
                files = swept.files,
                bytes = swept.bytes,
                "deleted temp blobs left by ended writers"
            );
        }
        Ok(store)
    }

    /// Folder of the store: `<data_dir>/store`.
    pub fn store_dir(&self) -> &Path {
        &self.inner.store_dir
    }

    pub fn database_path(&self) -> &Path {
        &self.inner.db_path
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn blob_store(&self) -> &FsBlobStore {
        &self.inner.blobs
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.inner.conn()
    }

    fn context_lock_path(&self, context: &str) -> PathBuf {
        // Hashing keeps any context name (a folder path, say) a valid file name.
        let digest = Digest::of(context.as_bytes());
        self.inner
            .store_dir
            .join("locks")
            .join(format!("{digest}.lock"))
    }

    /// Takes `gc.lock` shared, for the span from publishing a blob to committing its row.
    fn gc_shared_lock(&self) -> Result<FileLock> {
        FileLock::acquire(&self.inner.store_dir.join("gc.lock"), LockMode::Shared)
    }

    fn gc_exclusive_lock(&self) -> Result<FileLock> {
        FileLock::acquire(&self.inner.store_dir.join("gc.lock"), LockMode::Exclusive)
    }
}

impl Inner {
    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while the mutex was held cannot leave the connection inside a transaction,
        // because rusqlite rolls back a transaction when it is dropped during unwinding.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).map_err(StoreError::db("open the database"))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(StoreError::db("set the busy timeout"))?;

    // WAL lets readers (a `context show`, say) run while a turn writes. FULL sync makes each
    // committed turn record survive a power loss, and costs little at a few writes per step.
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(StoreError::db("enable WAL mode"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(
            path = %path.display(),
            mode,
            "SQLite refused WAL mode; the store works but readers wait for writers"
        );
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(StoreError::db("set the sync mode"))?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(StoreError::db("enable foreign keys"))?;
    Ok(conn)
}

/// Default data folder: `$XDG_DATA_HOME/upstream`, else `$HOME/.local/share/upstream`.
pub fn default_data_dir() -> Option<PathBuf> {
    let from_xdg = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|path| path.is_absolute());
    let base = from_xdg.or_else(|| {
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share"))
    })?;
    Some(base.join("upstream"))
}

impl ContextStore for LocalStore {
    fn begin_turn(
        &self,
        context: &str,
        document: &DocumentInfo,
        options: &BeginOptions,
    ) -> Result<TurnGuard> {
        self.begin(context, document, options)
    }

    fn set_image_digest(&self, turn: &TurnGuard, image_digest: &str) -> Result<()> {
        self.set_image(turn, image_digest)
    }

    fn record_step(
        &self,
        turn: &TurnGuard,
        step: &StepInput,
        output: &mut dyn Read,
    ) -> Result<StepRecord> {
        self.step(turn, step, output)
    }

    fn add_artifact(
        &self,
        turn: &TurnGuard,
        name: &str,
        mode: u32,
        contents: &mut dyn Read,
    ) -> Result<ArtifactRecord> {
        self.artifact(turn, name, mode, contents)
    }

    fn set_workspace_snapshot(&self, turn: &TurnGuard, archive: &mut dyn Read) -> Result<BlobRef> {
        self.workspace_snapshot(turn, archive)
    }

    fn finish_turn(&self, turn: TurnGuard, outcome: TurnOutcome) -> Result<TurnRecord> {
        self.finish(turn, outcome)
    }

    fn discard_turn(&self, turn: TurnGuard) -> Result<()> {
        self.discard(turn)
    }

    fn list_contexts(&self) -> Result<Vec<ContextSummary>> {
        self.read(queries::list_contexts)
    }

    fn context(&self, name: &str) -> Result<ContextDetail> {
        self.read(|conn| queries::context_detail(conn, name))
    }

    fn visible_artifacts(&self, context: &str) -> Result<Vec<VisibleArtifact>> {
        self.read(|conn| {
            let (id, _) = queries::context_row(conn, context)?;
            queries::visible_artifacts(conn, id)
        })
    }

    fn manifest(&self, context: &str) -> Result<ContextManifest> {
        self.read(|conn| queries::manifest(conn, context))
    }

    fn blobs(&self) -> &dyn BlobStore {
        &self.inner.blobs
    }

    fn remove_context(&self, context: &str) -> Result<RemovedContext> {
        self.remove(context)
    }

    fn gc(&self) -> Result<GcReport> {
        self.collect_garbage()
    }

    fn latest_workspace_snapshot(&self, context: &str) -> Result<Option<WorkspaceSnapshot>> {
        let found = self.read(|conn| queries::latest_workspace_snapshot(conn, context))?;
        let Some((turn, blob)) = found else {
            return Ok(None);
        };
        let reader = self.inner.blobs.open(&blob.sha256)?;
        Ok(Some(WorkspaceSnapshot { turn, blob, reader }))
    }
}

impl LocalStore {
    /// Runs several queries in one read transaction, so that they see one state of the
    /// database even while other processes write.
    fn read<T>(&self, query: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn
            .transaction()
            .map_err(StoreError::db("start a read transaction"))?;
        let value = query(&tx)?;
        tx.commit()
            .map_err(StoreError::db("end a read transaction"))?;
        Ok(value)
    }
}

#[cfg(test)]
mod tests;

//! Versioned schema of the SQLite database.
//!
//! The version is SQLite's `user_version` header field. Migration `n` (1-based) moves a
//! database from version `n - 1` to `n`. Each runs in its own `BEGIN IMMEDIATE` transaction
//! that also sets the new version, so a crash leaves the database at either version. Two
//! processes that open an old database at once apply each migration once, because each checks
//! the version again after taking the write lock. Migrations are append-only: a released step
//! is never edited.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use crate::error::{Result, StoreError};

const MIGRATIONS: &[&str] = &[
    // 1: contexts, turns, steps and artifacts.
    "
    CREATE TABLE contexts (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );

    -- `seq` orders turns by insertion, which is exact where ULID order is only to the
    -- millisecond.
    CREATE TABLE turns (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        context_id INTEGER NOT NULL REFERENCES contexts (id) ON DELETE CASCADE,
        document_path TEXT NOT NULL,
        document_sha256 TEXT NOT NULL,
        image TEXT,
        image_digest TEXT,
        started_at INTEGER NOT NULL,
        ended_at INTEGER,
        state TEXT NOT NULL
            CHECK (state IN ('running', 'succeeded', 'failed', 'interrupted')),
        host_pid INTEGER NOT NULL
    );
    CREATE INDEX turns_by_context ON turns (context_id, seq);
    CREATE INDEX turns_running ON turns (state) WHERE state = 'running';

    CREATE TABLE steps (
        turn_seq INTEGER NOT NULL REFERENCES turns (seq) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        label TEXT,
        command TEXT NOT NULL,
        exit_code INTEGER,
        duration_ms INTEGER NOT NULL,
        state TEXT NOT NULL,
        output BLOB NOT NULL,
        truncated_bytes INTEGER NOT NULL,
        output_sha256 TEXT,
        output_size INTEGER,
        PRIMARY KEY (turn_seq, idx)
    );

    CREATE TABLE artifacts (
        turn_seq INTEGER NOT NULL REFERENCES turns (seq) ON DELETE CASCADE,
        name TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        mode INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (turn_seq, name)
    );
    CREATE INDEX artifacts_by_name ON artifacts (name, turn_seq);
    ",
    // 2: workspace snapshots, the archive of a turn's working directory.
    "
    ALTER TABLE turns ADD COLUMN workspace_sha256 TEXT;
    ALTER TABLE turns ADD COLUMN workspace_size INTEGER;
    ",
];

/// Schema version that this build writes.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database to [`SCHEMA_VERSION`].
pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    migrate_to(conn, path, SCHEMA_VERSION)
}

/// Brings the database to `target`, which tests set below [`SCHEMA_VERSION`] to build an old
/// database.
pub(crate) fn migrate_to(conn: &mut Connection, path: &Path, target: i64) -> Result<()> {
    let found = user_version(conn)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: path.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }

    for (index, sql) in MIGRATIONS.iter().enumerate().take(target as usize) {
        let version = index as i64 + 1;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::db("start a migration"))?;

        // Another process may have migrated while this one waited for the write lock.
        let current: i64 = tx
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(StoreError::db("read the schema version"))?;
        if current >= version {
            continue;
        }

        tx.execute_batch(sql)
            .map_err(StoreError::db("apply a schema migration"))?;
        tx.pragma_update(None, "user_version", version)
            .map_err(StoreError::db("write the schema version"))?;
        tx.commit()
            .map_err(StoreError::db("commit a schema migration"))?;
        tracing::info!(path = %path.display(), version, "migrated store database");
    }
    Ok(())
}

pub(crate) fn user_version(conn: &Connection) -> Result<i64> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(StoreError::db("read the schema version"))
}

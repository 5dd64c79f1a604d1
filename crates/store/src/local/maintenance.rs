//! Crash recovery, context removal and garbage collection of [`LocalStore`].

use std::collections::HashSet;

use rusqlite::Connection;

use super::queries::context_row;
use super::turns::{immediate, interrupt_running_turns};
use super::LocalStore;
use crate::blob::{BlobStore, Digest};
use crate::error::{Result, StoreError};
use crate::lock::{FileLock, LockMode};
use crate::records::{GcReport, RemovedContext};
use crate::sql::to_u64;

impl LocalStore {
    /// Marks running turns interrupted in every context whose lock is free, because a free
    /// lock means the process that ran them has died.
    pub(super) fn recover_orphaned_turns(&self) -> Result<()> {
        let contexts = {
            let conn = self.conn();
            let mut statement = conn
                .prepare(
                    "SELECT DISTINCT c.id, c.name FROM turns t JOIN contexts c
                     ON c.id = t.context_id WHERE t.state = 'running'",
                )
                .map_err(StoreError::db("look up running turns"))?;
            let rows = statement
                .query_map([], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
                })
                .map_err(StoreError::db("look up running turns"))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(StoreError::db("look up running turns"))?
        };

        for (context_id, name) in contexts {
            let path = self.context_lock_path(&name);
            let Some(_lock) = FileLock::try_acquire(&path, LockMode::Exclusive)? else {
                continue;
            };
            let mut conn = self.conn();
            let tx = immediate(&mut conn, "recover interrupted turns")?;
            interrupt_running_turns(&tx, context_id)?;
            tx.commit()
                .map_err(StoreError::db("commit interrupted turns"))?;
        }
        Ok(())
    }

    pub(super) fn remove(&self, context: &str) -> Result<RemovedContext> {
        let path = self.context_lock_path(context);
        let Some(_lock) = FileLock::try_acquire(&path, LockMode::Exclusive)? else {
            return Err(StoreError::ContextBusy {
                context: context.to_owned(),
                holder: self.lock_holder(context)?,
            });
        };

        let mut conn = self.conn();
        let tx = immediate(&mut conn, "remove a context")?;
        let (context_id, _) = context_row(&tx, context)?;
        let removed = tx
            .query_row(
                "SELECT (SELECT COUNT(*) FROM turns WHERE context_id = ?1),
                        (SELECT COUNT(*) FROM artifacts a JOIN turns t ON t.seq = a.turn_seq
                         WHERE t.context_id = ?1)",
                [context_id],
                |row| {
                    Ok(RemovedContext {
                        turns: to_u64(row.get(0)?),
                        artifacts: to_u64(row.get(1)?),
                    })
                },
            )
            .map_err(StoreError::db("count the context's records"))?;

        // Turns, steps and artifacts go with the context through ON DELETE CASCADE.
        tx.execute("DELETE FROM contexts WHERE id = ?1", [context_id])
            .map_err(StoreError::db("remove a context"))?;
        tx.commit()
            .map_err(StoreError::db("commit the removal of a context"))?;
        tracing::info!(context, turns = removed.turns, "removed context");
        Ok(removed)
    }

    pub(super) fn collect_garbage(&self) -> Result<GcReport> {
        let swept = self.inner.blobs.sweep_temp_files()?;
        let mut report = GcReport {
            temp_files_removed: swept.files,
            temp_bytes_freed: swept.bytes,
            ..GcReport::default()
        };

        // Writers hold this lock shared from publishing a blob until its row commits, so
        // every blob listed below is either referenced in the database or truly unused.
        let _gc_lock = self.gc_exclusive_lock()?;
        let referenced = referenced_blobs(&self.conn())?;
        for blob in self.inner.blobs.list()? {
            if referenced.contains(&blob.sha256) {
                continue;
            }
            if self.inner.blobs.delete(&blob.sha256)? {
                report.blobs_removed += 1;
                report.blob_bytes_freed += blob.size;
            }
        }

        tracing::info!(
            blobs_removed = report.blobs_removed,
            blob_bytes_freed = report.blob_bytes_freed,
            temp_files_removed = report.temp_files_removed,
            temp_bytes_freed = report.temp_bytes_freed,
            "collected garbage"
        );
        Ok(report)
    }
}

/// Returns every digest that an artifact, a step's full output or a workspace snapshot uses.
fn referenced_blobs(conn: &Connection) -> Result<HashSet<Digest>> {
    let mut statement = conn
        .prepare(
            "SELECT sha256 FROM artifacts
             UNION SELECT output_sha256 FROM steps WHERE output_sha256 IS NOT NULL
             UNION SELECT workspace_sha256 FROM turns WHERE workspace_sha256 IS NOT NULL",
        )
        .map_err(StoreError::db("list referenced blobs"))?;
    let rows = statement
        .query_map([], |row| row.get::<_, Digest>(0))
        .map_err(StoreError::db("list referenced blobs"))?;
    rows.collect::<rusqlite::Result<_>>()
        .map_err(StoreError::db("list referenced blobs"))
}

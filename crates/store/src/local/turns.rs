//! Turn lifecycle of [`LocalStore`]: begin, record steps and artifacts, finish.

use std::io::{self, Read};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::{Inner, LocalStore};
use crate::blob::BlobRef;
use crate::context::{TurnGuard, TurnLease};
use crate::error::{LockHolder, Result, StoreError};
use crate::lock::{FileLock, LockMode};
use crate::names::{validate_artifact_name, validate_context_name};
use crate::records::{
    ArtifactRecord, BeginOptions, DocumentInfo, StepInput, StepRecord, Timestamp, TurnId,
    TurnOutcome, TurnRecord, TurnState,
};
use crate::sql::{to_i64, to_u64};

/// Interval between attempts to take a busy context lock while waiting.
const LOCK_POLL_INTERVAL: Duration = Duration::from_millis(50);

impl LocalStore {
    pub(super) fn begin(
        &self,
        context: &str,
        document: &DocumentInfo,
        options: &BeginOptions,
    ) -> Result<TurnGuard> {
        validate_context_name(context)?;
        let lock = self.acquire_context_lock(context, options.wait)?;
        let id = TurnId::generate();
        let now = Timestamp::now();

        let mut conn = self.conn();
        let tx = immediate(&mut conn, "begin a turn")?;
        tx.execute(
            "INSERT INTO contexts (name, created_at) VALUES (?1, ?2)
             ON CONFLICT (name) DO NOTHING",
            params![context, now],
        )
        .map_err(StoreError::db("create the context"))?;
        let context_id: i64 = tx
            .query_row(
                "SELECT id FROM contexts WHERE name = ?1",
                [context],
                |row| row.get(0),
            )
            .map_err(StoreError::db("look up the context"))?;

        // Holding the lock proves that no live process runs a turn here, so any turn still
        // marked running belongs to a process that died.
        let interrupted = interrupt_running_turns(&tx, context_id)?;
        tx.execute(
            "INSERT INTO turns (id, context_id, document_path, document_sha256, image,
                                image_digest, started_at, state, host_pid)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                id,
                context_id,
                document.path.to_string_lossy(),
                document.sha256,
                document.image,
                document.image_digest,
                now,
                TurnState::Running,
                std::process::id(),
            ],
        )
        .map_err(StoreError::db("record the new turn"))?;
        tx.commit().map_err(StoreError::db("commit the new turn"))?;
        drop(conn);

        tracing::debug!(turn = %id, context, "began turn");
        let lease = LocalLease {
            inner: Arc::clone(&self.inner),
            turn: id.clone(),
            _lock: lock,
        };
        Ok(TurnGuard::new(
            id,
            context.to_owned(),
            interrupted,
            Box::new(lease),
        ))
    }

    /// Takes the context's lock, polling until `wait` runs out when another turn holds it.
    fn acquire_context_lock(&self, context: &str, wait: Option<Duration>) -> Result<FileLock> {
        let path = self.context_lock_path(context);
        let started = Instant::now();
        loop {
            if let Some(lock) = FileLock::try_acquire(&path, LockMode::Exclusive)? {
                return Ok(lock);
            }
            let waited = started.elapsed();
            match wait {
                Some(limit) if waited < limit => thread::sleep(LOCK_POLL_INTERVAL),
                Some(_) => {
                    return Err(StoreError::ContextWaitTimedOut {
                        context: context.to_owned(),
                        holder: self.lock_holder(context)?,
                        waited,
                    })
                }
                None => {
                    return Err(StoreError::ContextBusy {
                        context: context.to_owned(),
                        holder: self.lock_holder(context)?,
                    })
                }
            }
        }
    }

    /// Returns the running turn of `context`, which names the holder of its lock.
    pub(super) fn lock_holder(&self, context: &str) -> Result<LockHolder> {
        let holder = self
            .conn()
            .query_row(
                "SELECT t.id, t.host_pid FROM turns t JOIN contexts c ON c.id = t.context_id
                 WHERE c.name = ?1 AND t.state = 'running' ORDER BY t.seq DESC LIMIT 1",
                [context],
                |row| Ok((row.get::<_, TurnId>(0)?, row.get::<_, u32>(1)?)),
            )
            .optional()
            .map_err(StoreError::db("look up the running turn"))?;
        Ok(LockHolder {
            turn: holder.as_ref().map(|(turn, _)| turn.clone()),
            pid: holder.map(|(_, pid)| pid),
        })
    }

    pub(super) fn set_image(&self, turn: &TurnGuard, image_digest: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn, "record the image digest")?;
        running_turn_seq(&tx, turn.id())?;
        tx.execute(
            "UPDATE turns SET image_digest = ?2 WHERE id = ?1",
            params![turn.id(), image_digest],
        )
        .map_err(StoreError::db("record the image digest"))?;
        tx.commit()
            .map_err(StoreError::db("commit the image digest"))
    }

    pub(super) fn step(
        &self,
        turn: &TurnGuard,
        step: &StepInput,
        output: &mut dyn Read,
    ) -> Result<StepRecord> {
        let limits = self.inner.limits;
        let input = format!("output of step {} of turn {}", step.index, turn.id());
        let mut tail = TailReader::new(output, limits.max_step_output_bytes);

        let staged = if step.keep_full_output {
            let staged = self
                .inner
                .blobs
                .stage(&mut tail, limits.max_artifact_bytes, &input)
                .map_err(|error| match error {
                    StoreError::BlobTooLarge { limit } => StoreError::StepOutputTooLarge {
                        turn: turn.id().clone(),
                        index: step.index,
                        limit,
                    },
                    other => other,
                })?;
            Some(staged)
        } else {
            io::copy(&mut tail, &mut io::sink())
                .map_err(|source| StoreError::ReadInput { input, source })?;
            None
        };
        let (kept, truncated_bytes) = tail.finish();

        // The full output is only worth a blob when the record lost part of it; dropping the
        // staged blob deletes its temp file.
        let staged = staged.filter(|_| truncated_bytes > 0);
        let _gc_lock = staged.as_ref().map(|_| self.gc_shared_lock()).transpose()?;
        let full_output = staged
            .map(|staged| self.inner.blobs.commit(staged))
            .transpose()?;

        let duration_ms = u64::try_from(step.duration.as_millis()).unwrap_or(u64::MAX);
        let mut conn = self.conn();
        let tx = immediate(&mut conn, "record a step")?;
        let seq = running_turn_seq(&tx, turn.id())?;
        tx.execute(
            "INSERT OR REPLACE INTO steps (turn_seq, idx, label, command, exit_code,
                duration_ms, state, output, truncated_bytes, output_sha256, output_size)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                seq,
                step.index,
                step.label,
                step.command,
                step.exit_code,
                to_i64(duration_ms),
                step.state,
                kept,
                to_i64(truncated_bytes),
                full_output.map(|blob| blob.sha256),
                full_output.map(|blob| to_i64(blob.size)),
            ],
        )
        .map_err(StoreError::db("record a step"))?;
        tx.commit().map_err(StoreError::db("commit a step"))?;

        Ok(StepRecord {
            index: step.index,
            label: step.label.clone(),
            command: step.command.clone(),
            exit_code: step.exit_code,
            duration_ms,
            state: step.state,
            output: String::from_utf8_lossy(&kept).into_owned(),
            truncated_bytes,
            full_output,
        })
    }

    pub(super) fn artifact(
        &self,
        turn: &TurnGuard,
        name: &str,
        mode: u32,
        contents: &mut dyn Read,
    ) -> Result<ArtifactRecord> {
        validate_artifact_name(name)?;

        // Checking before the copy fails fast; the check is repeated in the write transaction
        // because another thread may add artifacts to the same turn meanwhile.
        let usage = {
            let conn = self.conn();
            let seq = running_turn_seq(&conn, turn.id())?;
            artifact_usage(&conn, seq, name)?
        };
        self.check_artifact_limits(turn, name, usage, 0)?;

        let limits = self.inner.limits;
        let remaining = limits.max_turn_bytes.saturating_sub(usage.bytes);
        let max_size = limits.max_artifact_bytes.min(remaining);
        let input = format!("artifact '{name}'");
        let staged =
            self.inner
                .blobs
                .stage(contents, max_size, &input)
                .map_err(|error| match error {
                    StoreError::BlobTooLarge { .. } if limits.max_artifact_bytes <= remaining => {
                        StoreError::ArtifactTooLarge {
                            name: name.to_owned(),
                            limit: limits.max_artifact_bytes,
                        }
                    }
                    StoreError::BlobTooLarge { .. } => StoreError::TurnTooLarge {
                        turn: turn.id().clone(),
                        name: name.to_owned(),
                        limit: limits.max_turn_bytes,
                    },
                    other => other,
                })?;

        let _gc_lock = self.gc_shared_lock()?;
        let blob = self.inner.blobs.commit(staged)?;
        let mode = mode & 0o7777;

        let mut conn = self.conn();
        let tx = immediate(&mut conn, "record an artifact")?;
        let seq = running_turn_seq(&tx, turn.id())?;
        let usage = artifact_usage(&tx, seq, name)?;
        self.check_artifact_limits(turn, name, usage, blob.size)?;
        tx.execute(
            "INSERT INTO artifacts (turn_seq, name, size, sha256, mode, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (turn_seq, name) DO UPDATE SET
                size = excluded.size, sha256 = excluded.sha256,
                mode = excluded.mode, created_at = excluded.created_at",
            params![
                seq,
                name,
                to_i64(blob.size),
                blob.sha256,
                mode,
                Timestamp::now()
            ],
        )
        .map_err(StoreError::db("record an artifact"))?;
        tx.commit().map_err(StoreError::db("commit an artifact"))?;

        Ok(ArtifactRecord {
            name: name.to_owned(),
            size: blob.size,
            sha256: blob.sha256,
            mode,
        })
    }

    /// Checks that adding `name` with `size` bytes keeps the turn within its limits, given the
    /// turn's other artifacts.
    fn check_artifact_limits(
        &self,
        turn: &TurnGuard,
        name: &str,
        others: ArtifactUsage,
        size: u64,
    ) -> Result<()> {
        let limits = self.inner.limits;
        if others.count >= limits.max_artifacts_per_turn {
            return Err(StoreError::TooManyArtifacts {
                turn: turn.id().clone(),
                name: name.to_owned(),
                limit: limits.max_artifacts_per_turn,
            });
        }
        if others.bytes.saturating_add(size) > limits.max_turn_bytes {
            return Err(StoreError::TurnTooLarge {
                turn: turn.id().clone(),
                name: name.to_owned(),
                limit: limits.max_turn_bytes,
            });
        }
        Ok(())
    }

    pub(super) fn workspace_snapshot(
        &self,
        turn: &TurnGuard,
        archive: &mut dyn Read,
    ) -> Result<BlobRef> {
        let limit = self.inner.limits.max_workspace_snapshot_bytes;
        let input = format!("workspace snapshot of turn {}", turn.id());
        let staged =
            self.inner
                .blobs
                .stage(archive, limit, &input)
                .map_err(|error| match error {
                    StoreError::BlobTooLarge { limit } => StoreError::WorkspaceSnapshotTooLarge {
                        turn: turn.id().clone(),
                        limit,
                    },
                    other => other,
                })?;

        let _gc_lock = self.gc_shared_lock()?;
        let blob = self.inner.blobs.commit(staged)?;
        let mut conn = self.conn();
        let tx = immediate(&mut conn, "record the workspace snapshot")?;
        running_turn_seq(&tx, turn.id())?;
        tx.execute(
            "UPDATE turns SET workspace_sha256 = ?2, workspace_size = ?3 WHERE id = ?1",
            params![turn.id(), blob.sha256, to_i64(blob.size)],
        )
        .map_err(StoreError::db("record the workspace snapshot"))?;
        tx.commit()
            .map_err(StoreError::db("commit the workspace snapshot"))?;
        Ok(blob)
    }

    pub(super) fn finish(&self, turn: TurnGuard, outcome: TurnOutcome) -> Result<TurnRecord> {
        let state = TurnState::from(outcome);
        let record = {
            let mut conn = self.conn();
            let tx = immediate(&mut conn, "finish a turn")?;
            running_turn_seq(&tx, turn.id())?;
            tx.execute(
                "UPDATE turns SET state = ?2, ended_at = ?3 WHERE id = ?1",
                params![turn.id(), state, Timestamp::now()],
            )
            .map_err(StoreError::db("finish a turn"))?;
            let record = super::queries::turn_record(&tx, turn.id())?;
            tx.commit()
                .map_err(StoreError::db("commit a finished turn"))?;
            record
        };
        tracing::debug!(turn = %turn.id(), %state, "finished turn");

        // Dropping the guard releases the context lock; the state is final by now, so the
        // lease's interrupt-on-drop update changes nothing.
        drop(turn);
        Ok(record)
    }

    pub(super) fn discard(&self, turn: TurnGuard) -> Result<()> {
        {
            let mut conn = self.conn();
            let tx = immediate(&mut conn, "discard a turn")?;
            running_turn_seq(&tx, turn.id())?;
            // Steps and artifacts go with the turn through ON DELETE CASCADE.
            tx.execute("DELETE FROM turns WHERE id = ?1", [turn.id()])
                .map_err(StoreError::db("discard a turn"))?;
            tx.commit()
                .map_err(StoreError::db("commit a discarded turn"))?;
        }
        tracing::debug!(turn = %turn.id(), "discarded turn");
        // The row is gone, so the lease's interrupt-on-drop update changes nothing.
        drop(turn);
        Ok(())
    }
}

/// Lock on a context held by a [`TurnGuard`] of [`LocalStore`].
struct LocalLease {
    inner: Arc<Inner>,
    turn: TurnId,
    // Released after `drop` below has run, so no other turn can begin in between.
    _lock: FileLock,
}

impl TurnLease for LocalLease {}

impl Drop for LocalLease {
    fn drop(&mut self) {
        let updated = self.inner.conn().execute(
            "UPDATE turns SET state = 'interrupted', ended_at = ?2
             WHERE id = ?1 AND state = 'running'",
            params![self.turn, Timestamp::now()],
        );
        match updated {
            Ok(0) => {}
            Ok(_) => tracing::warn!(
                turn = %self.turn,
                "turn dropped before finish_turn; marked interrupted"
            ),
            Err(error) => tracing::warn!(
                turn = %self.turn,
                %error,
                "failed to mark dropped turn interrupted; the next turn of its context will"
            ),
        }
    }
}

/// Marks every running turn of a context interrupted and returns their ids. The caller must
/// hold the context's lock, which proves that their processes have died.
pub(super) fn interrupt_running_turns(
    tx: &Transaction<'_>,
    context_id: i64,
) -> Result<Vec<TurnId>> {
    let ids = {
        let mut statement = tx
            .prepare("SELECT id FROM turns WHERE context_id = ?1 AND state = 'running'")
            .map_err(StoreError::db("look up running turns"))?;
        let rows = statement
            .query_map([context_id], |row| row.get::<_, TurnId>(0))
            .map_err(StoreError::db("look up running turns"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(StoreError::db("look up running turns"))?
    };
    if ids.is_empty() {
        return Ok(ids);
    }

    // ended_at stays empty: the time of death is unknown.
    tx.execute(
        "UPDATE turns SET state = 'interrupted' WHERE context_id = ?1 AND state = 'running'",
        [context_id],
    )
    .map_err(StoreError::db("mark dead turns interrupted"))?;
    for id in &ids {
        tracing::warn!(turn = %id, "marked turn interrupted: its process ended before finishing it");
    }
    Ok(ids)
}

/// Starts a write transaction that takes SQLite's write lock at its start, where the busy
/// timeout applies. A deferred transaction that reads and then writes can instead fail with
/// `SQLITE_BUSY` when it tries to upgrade its read lock.
pub(super) fn immediate<'c>(
    conn: &'c mut Connection,
    action: &'static str,
) -> Result<Transaction<'c>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(StoreError::db(action))
}

/// Returns the row of a turn that must still be running.
fn running_turn_seq(conn: &Connection, turn: &TurnId) -> Result<i64> {
    let (seq, state) = turn_seq_and_state(conn, turn)?;
    match state {
        TurnState::Running => Ok(seq),
        state => Err(StoreError::TurnNotRunning {
            turn: turn.clone(),
            state,
        }),
    }
}

fn turn_seq_and_state(conn: &Connection, turn: &TurnId) -> Result<(i64, TurnState)> {
    conn.query_row(
        "SELECT seq, state FROM turns WHERE id = ?1",
        [turn],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
    .optional()
    .map_err(StoreError::db("look up a turn"))?
    .ok_or_else(|| StoreError::TurnNotFound(turn.clone()))
}

/// Count and total size of a turn's artifacts other than `name`.
#[derive(Debug, Clone, Copy)]
struct ArtifactUsage {
    count: u64,
    bytes: u64,
}

fn artifact_usage(conn: &Connection, turn_seq: i64, name: &str) -> Result<ArtifactUsage> {
    conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM artifacts
         WHERE turn_seq = ?1 AND name <> ?2",
        params![turn_seq, name],
        |row| {
            Ok(ArtifactUsage {
                count: to_u64(row.get(0)?),
                bytes: to_u64(row.get(1)?),
            })
        },
    )
    .map_err(StoreError::db("count the turn's artifacts"))
}

/// Passes a stream through while keeping its last `max` bytes.
struct TailReader<'a> {
    inner: &'a mut dyn Read,
    tail: Vec<u8>,
    max: usize,
    total: u64,
}

impl<'a> TailReader<'a> {
    fn new(inner: &'a mut dyn Read, max: usize) -> TailReader<'a> {
        TailReader {
            inner,
            tail: Vec::new(),
            max,
            total: 0,
        }
    }

    /// Returns the kept tail and the number of bytes cut before it. The cut is moved forward
    /// past UTF-8 continuation bytes so that text output does not start with a broken
    /// character.
    fn finish(mut self) -> (Vec<u8>, u64) {
        let excess = self.tail.len().saturating_sub(self.max);
        self.tail.drain(..excess);
        if self.total > self.tail.len() as u64 {
            let partial = self
                .tail
                .iter()
                .take(3)
                .take_while(|byte| (**byte & 0b1100_0000) == 0b1000_0000)
                .count();
            self.tail.drain(..partial);
        }
        let truncated = self.total - self.tail.len() as u64;
        (self.tail, truncated)
    }
}

impl Read for TailReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let count = self.inner.read(buf)?;
        self.total += count as u64;
        self.tail.extend_from_slice(&buf[..count]);

        // Trimming only once the buffer passes twice the bound (and 64 KiB) keeps the cost per
        // byte constant.
        if self.tail.len() > self.max.saturating_mul(2).max(64 * 1024) {
            let excess = self.tail.len() - self.max;
            self.tail.drain(..excess);
        }
        Ok(count)
    }
}

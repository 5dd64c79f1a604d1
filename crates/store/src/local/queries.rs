//! Read queries of [`LocalStore`](super::LocalStore), as functions over a connection so that
//! callers can run several in one transaction.

use rusqlite::{Connection, OptionalExtension, Row};

use crate::blob::{BlobRef, Digest};
use crate::error::{Result, StoreError};
use crate::records::{
    ArtifactRecord, ContextDetail, ContextManifest, ContextSummary, ManifestArtifact, StepRecord,
    Timestamp, TurnDetail, TurnId, TurnRecord, VisibleArtifact, ARTIFACTS_FOLDER,
    MANIFEST_FORMAT_VERSION,
};
use crate::sql::to_u64;

const TURN_COLUMNS: &str = "t.seq, t.id, c.name, t.document_path, t.document_sha256, t.image,
    t.image_digest, t.started_at, t.ended_at, t.state, t.host_pid, t.workspace_sha256,
    t.workspace_size";

/// Returns the id and creation time of a context.
pub(super) fn context_row(conn: &Connection, name: &str) -> Result<(i64, Timestamp)> {
    conn.query_row(
        "SELECT id, created_at FROM contexts WHERE name = ?1",
        [name],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
    .optional()
    .map_err(StoreError::db("look up a context"))?
    .ok_or_else(|| StoreError::ContextNotFound(name.to_owned()))
}

pub(super) fn turn_record(conn: &Connection, id: &TurnId) -> Result<TurnRecord> {
    let sql = format!(
        "SELECT {TURN_COLUMNS} FROM turns t JOIN contexts c ON c.id = t.context_id
         WHERE t.id = ?1"
    );
    conn.query_row(&sql, [id], map_turn)
        .optional()
        .map_err(StoreError::db("read a turn"))?
        .map(|(_, record)| record)
        .ok_or_else(|| StoreError::TurnNotFound(id.clone()))
}

fn map_turn(row: &Row<'_>) -> rusqlite::Result<(i64, TurnRecord)> {
    let workspace_sha256: Option<Digest> = row.get(11)?;
    let workspace_size: Option<i64> = row.get(12)?;
    let record = TurnRecord {
        id: row.get(1)?,
        context: row.get(2)?,
        document_path: row.get(3)?,
        document_sha256: row.get(4)?,
        image: row.get(5)?,
        image_digest: row.get(6)?,
        started_at: row.get(7)?,
        ended_at: row.get(8)?,
        state: row.get(9)?,
        host_pid: row.get(10)?,
        workspace_snapshot: workspace_sha256.map(|sha256| BlobRef {
            sha256,
            size: to_u64(workspace_size.unwrap_or(0)),
        }),
    };
    Ok((row.get(0)?, record))
}

/// Returns the turns of a context with their steps and artifacts, oldest first.
fn turn_details(
    conn: &Connection,
    context_id: i64,
    include_running: bool,
) -> Result<Vec<TurnDetail>> {
    let sql = format!(
        "SELECT {TURN_COLUMNS} FROM turns t JOIN contexts c ON c.id = t.context_id
         WHERE t.context_id = ?1 AND (?2 OR t.state <> 'running') ORDER BY t.seq"
    );
    let mut statement = conn.prepare(&sql).map_err(StoreError::db("read turns"))?;
    let turns = statement
        .query_map(rusqlite::params![context_id, include_running], map_turn)
        .map_err(StoreError::db("read turns"))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(StoreError::db("read turns"))?;

    turns
        .into_iter()
        .map(|(seq, turn)| {
            Ok(TurnDetail {
                turn,
                steps: steps_of(conn, seq)?,
                artifacts: artifacts_of(conn, seq)?,
            })
        })
        .collect()
}

fn steps_of(conn: &Connection, turn_seq: i64) -> Result<Vec<StepRecord>> {
    let mut statement = conn
        .prepare(
            "SELECT idx, label, command, exit_code, duration_ms, state, output,
                    truncated_bytes, output_sha256, output_size
             FROM steps WHERE turn_seq = ?1 ORDER BY idx",
        )
        .map_err(StoreError::db("read steps"))?;
    let rows = statement
        .query_map([turn_seq], |row| {
            let output: Vec<u8> = row.get(6)?;
            let full_sha256: Option<Digest> = row.get(8)?;
            let full_size: Option<i64> = row.get(9)?;
            Ok(StepRecord {
                index: row.get(0)?,
                label: row.get(1)?,
                command: row.get(2)?,
                exit_code: row.get(3)?,
                duration_ms: to_u64(row.get(4)?),
                state: row.get(5)?,
                output: String::from_utf8_lossy(&output).into_owned(),
                truncated_bytes: to_u64(row.get(7)?),
                full_output: full_sha256.map(|sha256| BlobRef {
                    sha256,
                    size: to_u64(full_size.unwrap_or(0)),
                }),
            })
        })
        .map_err(StoreError::db("read steps"))?;
    rows.collect::<rusqlite::Result<_>>()
        .map_err(StoreError::db("read steps"))
}

fn artifacts_of(conn: &Connection, turn_seq: i64) -> Result<Vec<ArtifactRecord>> {
    let mut statement = conn
        .prepare("SELECT name, size, sha256, mode FROM artifacts WHERE turn_seq = ?1 ORDER BY name")
        .map_err(StoreError::db("read artifacts"))?;
    let rows = statement
        .query_map([turn_seq], |row| {
            Ok(ArtifactRecord {
                name: row.get(0)?,
                size: to_u64(row.get(1)?),
                sha256: row.get(2)?,
                mode: row.get(3)?,
            })
        })
        .map_err(StoreError::db("read artifacts"))?;
    rows.collect::<rusqlite::Result<_>>()
        .map_err(StoreError::db("read artifacts"))
}

/// Returns, for each artifact name, the version from the latest succeeded or failed turn.
pub(super) fn visible_artifacts(
    conn: &Connection,
    context_id: i64,
) -> Result<Vec<VisibleArtifact>> {
    let mut statement = conn
        .prepare(
            "SELECT name, size, sha256, mode, turn_id FROM (
                SELECT a.name, a.size, a.sha256, a.mode, t.id AS turn_id,
                       ROW_NUMBER() OVER (PARTITION BY a.name ORDER BY t.seq DESC) AS version
                FROM artifacts a JOIN turns t ON t.seq = a.turn_seq
                WHERE t.context_id = ?1 AND t.state IN ('succeeded', 'failed'))
             WHERE version = 1 ORDER BY name",
        )
        .map_err(StoreError::db("read visible artifacts"))?;
    let rows = statement
        .query_map([context_id], |row| {
            Ok(VisibleArtifact {
                name: row.get(0)?,
                size: to_u64(row.get(1)?),
                sha256: row.get(2)?,
                mode: row.get(3)?,
                turn: row.get(4)?,
            })
        })
        .map_err(StoreError::db("read visible artifacts"))?;
    rows.collect::<rusqlite::Result<_>>()
        .map_err(StoreError::db("read visible artifacts"))
}

pub(super) fn list_contexts(conn: &Connection) -> Result<Vec<ContextSummary>> {
    let mut statement = conn
        .prepare(
            "SELECT c.id, c.name, c.created_at,
                (SELECT COUNT(*) FROM turns t WHERE t.context_id = c.id),
                (SELECT t.id FROM turns t WHERE t.context_id = c.id
                 ORDER BY t.seq DESC LIMIT 1),
                (SELECT MAX(COALESCE(t.ended_at, t.started_at)) FROM turns t
                 WHERE t.context_id = c.id)
             FROM contexts c ORDER BY c.name",
        )
        .map_err(StoreError::db("list contexts"))?;
    let rows = statement
        .query_map([], |row| {
            let id: i64 = row.get(0)?;
            let summary = ContextSummary {
                name: row.get(1)?,
                created_at: row.get(2)?,
                turn_count: to_u64(row.get(3)?),
                artifact_count: 0,
                last_turn: row.get(4)?,
                last_used_at: row.get(5)?,
            };
            Ok((id, summary))
        })
        .map_err(StoreError::db("list contexts"))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(StoreError::db("list contexts"))?;

    rows.into_iter()
        .map(|(id, mut summary)| {
            summary.artifact_count = visible_artifacts(conn, id)?.len() as u64;
            Ok(summary)
        })
        .collect()
}

pub(super) fn context_detail(conn: &Connection, name: &str) -> Result<ContextDetail> {
    let (id, created_at) = context_row(conn, name)?;
    Ok(ContextDetail {
        name: name.to_owned(),
        created_at,
        turns: turn_details(conn, id, true)?,
    })
}

pub(super) fn manifest(conn: &Connection, name: &str) -> Result<ContextManifest> {
    let (id, _) = context_row(conn, name)?;
    let artifacts = visible_artifacts(conn, id)?
        .into_iter()
        .map(|artifact| ManifestArtifact {
            path: format!("{ARTIFACTS_FOLDER}/{}", artifact.name),
            name: artifact.name,
            turn: artifact.turn,
            size: artifact.size,
            sha256: artifact.sha256,
            mode: artifact.mode,
        })
        .collect();
    Ok(ContextManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        context: name.to_owned(),
        turns: turn_details(conn, id, false)?,
        artifacts,
    })
}

/// Returns the workspace snapshot of the latest succeeded or failed turn that stored one.
pub(super) fn latest_workspace_snapshot(
    conn: &Connection,
    name: &str,
) -> Result<Option<(TurnId, BlobRef)>> {
    let (id, _) = context_row(conn, name)?;
    conn.query_row(
        "SELECT id, workspace_sha256, workspace_size FROM turns
         WHERE context_id = ?1 AND state IN ('succeeded', 'failed')
               AND workspace_sha256 IS NOT NULL
         ORDER BY seq DESC LIMIT 1",
        [id],
        |row| {
            let blob = BlobRef {
                sha256: row.get(1)?,
                size: to_u64(row.get(2)?),
            };
            Ok((row.get(0)?, blob))
        },
    )
    .optional()
    .map_err(StoreError::db("look up the workspace snapshot"))
}

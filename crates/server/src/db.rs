//! The server's SQLite file, `<data>/server/server.db`: API keys and per-sandbox usage.
//!
//! Usage is metered per second: every live sandbox has a row whose `last_seen_ms` the
//! server advances once a second, so a server that dies loses at most about a second of
//! each sandbox's usage. A row's wall time is `ended_ms` (or `last_seen_ms` while it runs)
//! minus `started_ms`; vCPU-seconds and GiB-seconds are the wall time times its size.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    max_sandboxes INTEGER,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE TABLE IF NOT EXISTS sandbox_usage (
    sandbox_id TEXT PRIMARY KEY,
    key_id TEXT,
    image TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    end_reason TEXT
);
CREATE INDEX IF NOT EXISTS sandbox_usage_open ON sandbox_usage (ended_ms);
";

/// Errors of the server database. The message names the file or the operation.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("Opening the server database {path} failed")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("Server database query failed")]
    Query(#[from] rusqlite::Error),
    #[error("API key {0} not found; `upstream key ls` lists the keys")]
    KeyNotFound(String),
}

/// An API key as stored: never the key itself, only its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    /// Overrides the server's per-key sandbox limit when set.
    pub max_sandboxes: Option<u32>,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// A newly created key: the only time the secret is available.
pub struct NewKey {
    pub record: KeyRecord,
    pub secret: String,
}

/// Fields of a new usage row.
pub struct UsageStart<'a> {
    pub sandbox_id: &'a str,
    pub key_id: Option<&'a str>,
    pub image: &'a str,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub metadata: &'a BTreeMap<String, String>,
}

/// A usage row whose sandbox had no recorded end when the server started.
#[derive(Debug)]
pub struct OrphanUsage {
    pub sandbox_id: String,
    pub last_seen_ms: i64,
}

/// Grouping of the rows of `usage_report`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsageGrouping {
    /// One line with everything.
    Total,
    /// One line per API key (`-` for requests without a key).
    Key,
    /// One line per value of this metadata key (`-` where it is absent).
    Metadata(String),
}

/// One line of a usage report.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct UsageLine {
    pub group: String,
    pub sandboxes: u64,
    pub wall_secs: f64,
    pub vcpu_secs: f64,
    pub gib_secs: f64,
}

/// The server database, one connection behind a lock. Every statement is short, so
/// callers on async tasks run them inline.
pub struct Db {
    conn: Mutex<Connection>,
}

impl Db {
    /// Opens (creating when missing) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let open_error = |source| DbError::Open {
            path: path.display().to_string(),
            source,
        };
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let conn = Connection::open(path).map_err(open_error)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_error)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_error)?;
        conn.execute_batch(SCHEMA).map_err(open_error)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// Creates a key with a fresh random secret.
    pub fn create_key(&self, name: &str, max_sandboxes: Option<u32>) -> Result<NewKey, DbError> {
        // The id part is public (it names the key in listings); the 256 random bits after
        // it are the secret.
        let id_part = random_hex(12);
        let id = format!("key_{id_part}");
        let secret = format!("upk_{id_part}_{}", random_hex(64));
        let record = KeyRecord {
            id: id.clone(),
            name: name.to_string(),
            max_sandboxes,
            created_ms: now_ms(),
            revoked_ms: None,
        };
        self.conn.lock().unwrap().execute(
            "INSERT INTO api_keys (id, name, sha256, max_sandboxes, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                id,
                name,
                hash_key(&secret),
                max_sandboxes,
                record.created_ms
            ],
        )?;
        Ok(NewKey { record, secret })
    }

    pub fn list_keys(&self) -> Result<Vec<KeyRecord>, DbError> {
        let conn = self.conn.lock().unwrap();
        let mut statement = conn.prepare(
            "SELECT id, name, max_sandboxes, created_ms, revoked_ms FROM api_keys
             ORDER BY created_ms",
        )?;
        let rows = statement.query_map([], key_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks a key revoked; requests with it fail from then on.
    pub fn revoke_key(&self, id: &str) -> Result<(), DbError> {
        let changed = self.conn.lock().unwrap().execute(
            "UPDATE api_keys SET revoked_ms = coalesce(revoked_ms, ?2) WHERE id = ?1",
            params![id, now_ms()],
        )?;
        if changed == 0 {
            return Err(DbError::KeyNotFound(id.to_string()));
        }
        Ok(())
    }

    /// Whether any key that is not revoked exists.
    pub fn has_active_keys(&self) -> Result<bool, DbError> {
        let count: i64 = self.conn.lock().unwrap().query_row(
            "SELECT count(*) FROM api_keys WHERE revoked_ms IS NULL",
            [],
            |row| row.get(0),
        )?;
        Ok(count > 0)
    }

    /// Finds the active key whose secret is `secret`.
    pub fn authenticate(&self, secret: &str) -> Result<Option<KeyRecord>, DbError> {
        let conn = self.conn.lock().unwrap();
        let key = conn
            .query_row(
                "SELECT id, name, max_sandboxes, created_ms, revoked_ms FROM api_keys
                 WHERE sha256 = ?1 AND revoked_ms IS NULL",
                params![hash_key(secret)],
                key_from_row,
            )
            .optional()?;
        Ok(key)
    }

    pub fn start_usage(&self, usage: &UsageStart<'_>) -> Result<(), DbError> {
        let now = now_ms();
        let metadata = serde_json::to_string(usage.metadata).expect("a string map serializes");
        self.conn.lock().unwrap().execute(
            "INSERT INTO sandbox_usage
                 (sandbox_id, key_id, image, vcpus, memory_mib, metadata, started_ms,
                  last_seen_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
            params![
                usage.sandbox_id,
                usage.key_id,
                usage.image,
                usage.vcpus,
                usage.memory_mib,
                metadata,
                now
            ],
        )?;
        Ok(())
    }

    /// Advances `last_seen_ms` of every sandbox in `ids` to now, in one transaction.
    pub fn heartbeat(&self, ids: &[String]) -> Result<(), DbError> {
        if ids.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut conn = self.conn.lock().unwrap();
        let transaction = conn.transaction()?;
        {
            let mut statement = transaction.prepare_cached(
                "UPDATE sandbox_usage SET last_seen_ms = ?2
                 WHERE sandbox_id = ?1 AND ended_ms IS NULL",
            )?;
            for id in ids {
                statement.execute(params![id, now])?;
            }
        }
        transaction.commit()?;
        Ok(())
    }

    /// Records the end of a sandbox's usage now.
    pub fn end_usage(&self, sandbox_id: &str, reason: &str) -> Result<(), DbError> {
        let now = now_ms();
        self.conn.lock().unwrap().execute(
            "UPDATE sandbox_usage SET last_seen_ms = ?2, ended_ms = ?2, end_reason = ?3
             WHERE sandbox_id = ?1 AND ended_ms IS NULL",
            params![sandbox_id, now, reason],
        )?;
        Ok(())
    }

    /// Ends every open usage row at its last heartbeat and returns them. Called at
    /// start-up, while the server lock guarantees no other server meters sandboxes.
    pub fn end_orphans(&self, reason: &str) -> Result<Vec<OrphanUsage>, DbError> {
        let mut conn = self.conn.lock().unwrap();
        let transaction = conn.transaction()?;
        let orphans = {
            let mut statement = transaction.prepare(
                "SELECT sandbox_id, last_seen_ms FROM sandbox_usage WHERE ended_ms IS NULL",
            )?;
            let rows = statement.query_map([], |row| {
                Ok(OrphanUsage {
                    sandbox_id: row.get(0)?,
                    last_seen_ms: row.get(1)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        transaction.execute(
            "UPDATE sandbox_usage SET ended_ms = last_seen_ms, end_reason = ?1
             WHERE ended_ms IS NULL",
            params![reason],
        )?;
        transaction.commit()?;
        Ok(orphans)
    }

    /// Sums usage from `since_ms` (Unix milliseconds; rows are clipped to it) to now.
    pub fn usage_report(
        &self,
        since_ms: Option<i64>,
        grouping: &UsageGrouping,
    ) -> Result<Vec<UsageLine>, DbError> {
        let since = since_ms.unwrap_or(0);
        let group = match grouping {
            UsageGrouping::Total => "'total'".to_string(),
            UsageGrouping::Key => "coalesce(k.name || ' (' || u.key_id || ')', '-')".to_string(),
            UsageGrouping::Metadata(_) => "coalesce(json_extract(u.metadata, ?2), '-')".to_string(),
        };
        // Wall seconds of a row: from the later of its start and `since` to its end (or
        // last heartbeat), never negative.
        let sql = format!(
            "SELECT {group} AS grp, count(*),
                    sum(w), sum(w * u.vcpus), sum(w * u.memory_mib / 1024.0)
             FROM (SELECT *, max(0, coalesce(ended_ms, last_seen_ms) - max(started_ms, ?1))
                             / 1000.0 AS w
                   FROM sandbox_usage
                   WHERE coalesce(ended_ms, last_seen_ms) >= ?1) AS u
             LEFT JOIN api_keys AS k ON k.id = u.key_id
             GROUP BY grp ORDER BY grp"
        );
        let conn = self.conn.lock().unwrap();
        let mut statement = conn.prepare(&sql)?;
        let map_row = |row: &rusqlite::Row<'_>| {
            Ok(UsageLine {
                group: row.get(0)?,
                sandboxes: row.get::<_, i64>(1)? as u64,
                wall_secs: row.get(2)?,
                vcpu_secs: row.get(3)?,
                gib_secs: row.get(4)?,
            })
        };
        let rows = match grouping {
            UsageGrouping::Metadata(key) => {
                let path = format!("$.\"{}\"", key.replace('"', "\\\""));
                statement.query_map(params![since, path], map_row)?
            }
            _ => statement.query_map(params![since], map_row)?,
        };
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn key_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    Ok(KeyRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        max_sandboxes: row.get(2)?,
        created_ms: row.get(3)?,
        revoked_ms: row.get(4)?,
    })
}

/// Hex SHA-256 of a key's secret, the only form in which keys are stored.
fn hash_key(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// `len` random hex digits from the kernel's CSPRNG.
fn random_hex(len: usize) -> String {
    let mut bytes = vec![0u8; len.div_ceil(2)];
    // SAFETY: the buffer is valid for writes of its length.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    assert_eq!(
        filled as usize,
        bytes.len(),
        "getrandom(2) failed, so no API key can be made"
    );
    let mut text = hex::encode(bytes);
    text.truncate(len);
    text
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("server.db")).unwrap();
        (dir, db)
    }

    #[test]
    fn key_authenticates_until_revoked() {
        let (_dir, db) = open();
        let key = db.create_key("ci", Some(3)).unwrap();

        let found = db.authenticate(&key.secret).unwrap().unwrap();
        assert_eq!(found.id, key.record.id);
        assert_eq!(found.max_sandboxes, Some(3));
        assert!(db.authenticate("upk_wrong").unwrap().is_none());

        db.revoke_key(&key.record.id).unwrap();
        assert!(db.authenticate(&key.secret).unwrap().is_none());
        assert!(!db.has_active_keys().unwrap());
    }

    #[test]
    fn key_secret_has_256_random_bits() {
        let (_dir, db) = open();
        let key = db.create_key("ci", None).unwrap();
        let secret = key.secret.rsplit('_').next().unwrap();
        assert_eq!(secret.len(), 64);
        assert!(secret.chars().all(|c| c.is_ascii_hexdigit()));
        assert!(key
            .secret
            .starts_with(&format!("upk_{}_", &key.record.id[4..])));
    }

    #[test]
    fn key_secret_is_not_stored() {
        let (dir, db) = open();
        let key = db.create_key("ci", None).unwrap();
        drop(db);
        let bytes = std::fs::read(dir.path().join("server.db")).unwrap();
        let needle = key.secret.as_bytes();
        assert!(!bytes.windows(needle.len()).any(|window| window == needle));
    }

    #[test]
    fn revoke_unknown_key_fails() {
        let (_dir, db) = open();
        assert!(matches!(
            db.revoke_key("key_nothere"),
            Err(DbError::KeyNotFound(_))
        ));
    }

    #[test]
    fn usage_groups_by_metadata() {
        let (_dir, db) = open();
        let team_a = BTreeMap::from([("team".to_string(), "a".to_string())]);
        let none = BTreeMap::new();
        for (id, metadata) in [("sb-1", &team_a), ("sb-2", &team_a), ("sb-3", &none)] {
            db.start_usage(&UsageStart {
                sandbox_id: id,
                key_id: None,
                image: "base",
                vcpus: 2,
                memory_mib: 2048,
                metadata,
            })
            .unwrap();
        }
        // Backdate the starts so each row has ten seconds of wall time.
        db.conn
            .lock()
            .unwrap()
            .execute(
                "UPDATE sandbox_usage SET started_ms = last_seen_ms - 10000",
                [],
            )
            .unwrap();

        let lines = db
            .usage_report(None, &UsageGrouping::Metadata("team".into()))
            .unwrap();

        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].group, "-");
        assert_eq!(lines[1].group, "a");
        assert_eq!(lines[1].sandboxes, 2);
        assert!((lines[1].wall_secs - 20.0).abs() < 0.5);
        assert!((lines[1].vcpu_secs - 40.0).abs() < 1.0);
        assert!((lines[1].gib_secs - 40.0).abs() < 1.0);
    }

    #[test]
    fn orphans_end_at_last_heartbeat() {
        let (_dir, db) = open();
        db.start_usage(&UsageStart {
            sandbox_id: "sb-orphan",
            key_id: None,
            image: "base",
            vcpus: 1,
            memory_mib: 512,
            metadata: &BTreeMap::new(),
        })
        .unwrap();

        let orphans = db.end_orphans("server_lost").unwrap();

        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].sandbox_id, "sb-orphan");
        assert!(db.end_orphans("server_lost").unwrap().is_empty());
    }
}

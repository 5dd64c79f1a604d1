use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use rusqlite::Connection;

use super::LocalStore;
use crate::blob::Digest;
use crate::context::{ContextStore, TurnGuard};
use crate::error::StoreError;
use crate::records::{
    BeginOptions, ContextManifest, DocumentInfo, Limits, StepInput, StepState, TurnOutcome,
    TurnState,
};
use crate::schema::{self, SCHEMA_VERSION};

fn document(name: &str) -> DocumentInfo {
    DocumentInfo {
        path: format!("/work/{name}").into(),
        sha256: Digest::of(name.as_bytes()),
        image: Some("python:3.12".into()),
        image_digest: None,
    }
}

fn begin(store: &LocalStore, context: &str) -> TurnGuard {
    store
        .begin_turn(context, &document("doc.md"), &BeginOptions::default())
        .unwrap()
}

fn step(index: u32, exit_code: i32) -> StepInput {
    StepInput {
        index,
        label: Some(format!("step {index}")),
        command: format!("echo {index}"),
        exit_code: Some(exit_code),
        duration: Duration::from_millis(1500),
        state: if exit_code == 0 {
            StepState::Succeeded
        } else {
            StepState::Failed
        },
        keep_full_output: false,
    }
}

fn add(store: &LocalStore, turn: &TurnGuard, name: &str, contents: &[u8]) {
    store
        .add_artifact(turn, name, 0o644, &mut &contents[..])
        .unwrap();
}

fn read_artifact(store: &LocalStore, context: &str, name: &str) -> Vec<u8> {
    let mut content = store.get_artifact(context, name).unwrap();
    let mut bytes = Vec::new();
    content.reader.read_to_end(&mut bytes).unwrap();
    bytes
}

/// Bytes that are not text and not compressible, so that round trips catch any mangling.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn temp_files(store: &LocalStore) -> usize {
    fs::read_dir(store.blob_store().temp_dir()).unwrap().count()
}

#[test]
fn fresh_database_uses_wal_and_current_schema() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    assert_eq!(store.database_path(), dir.path().join("store/upstream.db"));

    let conn = Connection::open(store.database_path()).unwrap();
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(schema::user_version(&conn).unwrap(), SCHEMA_VERSION);
}

#[test]
fn migration_from_version_1_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("store/upstream.db");
    fs::create_dir_all(db_path.parent().unwrap()).unwrap();
    let turn_id = crate::records::TurnId::generate();
    let sha = Digest::of(b"report");
    {
        let mut conn = Connection::open(&db_path).unwrap();
        schema::migrate_to(&mut conn, &db_path, 1).unwrap();
        assert_eq!(schema::user_version(&conn).unwrap(), 1);
        conn.execute_batch(&format!(
            "INSERT INTO contexts (id, name, created_at) VALUES (1, 'old', 1000);
             INSERT INTO turns (seq, id, context_id, document_path, document_sha256,
                                started_at, ended_at, state, host_pid)
             VALUES (1, '{turn_id}', 1, '/old/doc.md', '{sha}', 1000, 2000, 'succeeded', 42);
             INSERT INTO artifacts (turn_seq, name, size, sha256, mode, created_at)
             VALUES (1, 'report.txt', 6, '{sha}', 420, 1500);"
        ))
        .unwrap();
    }

    let store = LocalStore::open(dir.path()).unwrap();
    let conn = Connection::open(&db_path).unwrap();
    assert_eq!(schema::user_version(&conn).unwrap(), SCHEMA_VERSION);

    let detail = store.context("old").unwrap();
    assert_eq!(detail.turns.len(), 1);
    let turn = &detail.turns[0].turn;
    assert_eq!(turn.id, turn_id);
    assert_eq!(turn.state, TurnState::Succeeded);
    assert_eq!(turn.host_pid, 42);
    assert_eq!(turn.workspace_snapshot, None);
    assert_eq!(detail.turns[0].artifacts[0].name, "report.txt");
    assert_eq!(detail.turns[0].artifacts[0].sha256, sha);

    // The migrated database accepts turns with the columns that version 2 added.
    let guard = begin(&store, "old");
    store
        .set_workspace_snapshot(&guard, &mut &b"tar"[..])
        .unwrap();
    store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();
    assert!(store.latest_workspace_snapshot("old").unwrap().is_some());
}

#[test]
fn newer_schema_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    drop(LocalStore::open(dir.path()).unwrap());
    let db_path = dir.path().join("store/upstream.db");
    Connection::open(&db_path)
        .unwrap()
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();

    let error = LocalStore::open(dir.path()).err().unwrap();
    assert!(matches!(error, StoreError::SchemaTooNew { found, .. } if found == SCHEMA_VERSION + 1));
    assert!(error.to_string().contains("upgrade upstream"), "{error}");
}

#[test]
fn concurrent_begin_in_threads_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(dir.path()).unwrap());
    let first = begin(&store, "ctx");

    let other = Arc::clone(&store);
    let error = thread::spawn(move || {
        other
            .begin_turn("ctx", &document("doc.md"), &BeginOptions::default())
            .err()
    })
    .join()
    .unwrap()
    .expect("second begin_turn on a busy context succeeded");

    match &error {
        StoreError::ContextBusy { context, holder } => {
            assert_eq!(context, "ctx");
            assert_eq!(holder.turn.as_ref(), Some(first.id()));
            assert_eq!(holder.pid, Some(std::process::id()));
        }
        other => panic!("expected ContextBusy, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains("'ctx'"), "{message}");
    assert!(message.contains(first.id().as_str()), "{message}");
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );

    store.finish_turn(first, TurnOutcome::Succeeded).unwrap();
    let second = begin(&store, "ctx");
    assert!(second.interrupted_turns().is_empty());
}

#[test]
fn waiting_begins_run_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(dir.path()).unwrap());
    let (started, started_rx) = mpsc::channel();

    // Each thread keeps its turn open for a while; with waiting enabled, none may fail and
    // their turns must not overlap in time.
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let store = Arc::clone(&store);
            let started = started.clone();
            thread::spawn(move || {
                let options = BeginOptions {
                    wait: Some(Duration::from_secs(30)),
                };
                let guard = store
                    .begin_turn("ctx", &document("doc.md"), &options)
                    .unwrap();
                started.send(()).unwrap();
                thread::sleep(Duration::from_millis(200));
                store.finish_turn(guard, TurnOutcome::Succeeded).unwrap()
            })
        })
        .collect();
    let records: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(started_rx.try_iter().count(), 2);

    let (a, b) = (&records[0], &records[1]);
    let (first, second) = if a.started_at <= b.started_at {
        (a, b)
    } else {
        (b, a)
    };
    assert!(first.ended_at.unwrap() <= second.started_at);
    assert_eq!(store.context("ctx").unwrap().turns.len(), 2);
}

#[test]
fn begin_waits_then_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let _first = begin(&store, "ctx");

    let options = BeginOptions {
        wait: Some(Duration::from_millis(200)),
    };
    let error = store
        .begin_turn("ctx", &document("doc.md"), &options)
        .err()
        .unwrap();
    match error {
        StoreError::ContextWaitTimedOut { waited, .. } => {
            assert!(waited >= Duration::from_millis(200));
        }
        other => panic!("expected ContextWaitTimedOut, got {other:?}"),
    }
}

#[test]
fn different_contexts_run_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let a = begin(&store, "a");
    let b = begin(&store, "b");
    store.finish_turn(a, TurnOutcome::Succeeded).unwrap();
    store.finish_turn(b, TurnOutcome::Failed).unwrap();
}

#[test]
fn dropped_guard_marks_turn_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let guard = begin(&store, "ctx");
    let id = guard.id().clone();
    drop(guard);

    let detail = store.context("ctx").unwrap();
    assert_eq!(detail.turns[0].turn.id, id);
    assert_eq!(detail.turns[0].turn.state, TurnState::Interrupted);

    // The lock was released with the guard.
    let next = begin(&store, "ctx");
    assert!(next.interrupted_turns().is_empty());
}

#[test]
fn finish_records_state_and_end_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let guard = begin(&store, "ctx");
    store.set_image_digest(&guard, "sha256:abc").unwrap();
    let record = store.finish_turn(guard, TurnOutcome::Failed).unwrap();

    assert_eq!(record.state, TurnState::Failed);
    assert_eq!(record.image.as_deref(), Some("python:3.12"));
    assert_eq!(record.image_digest.as_deref(), Some("sha256:abc"));
    assert_eq!(record.host_pid, std::process::id());
    assert!(record.ended_at.unwrap() >= record.started_at);
    assert_eq!(record.document_sha256, Digest::of(b"doc.md"));
}

#[test]
fn steps_are_recorded_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let guard = begin(&store, "ctx");
    store
        .record_step(&guard, &step(1, 3), &mut &b"boom\n"[..])
        .unwrap();
    store
        .record_step(&guard, &step(0, 0), &mut &b"ok\n"[..])
        .unwrap();
    store.finish_turn(guard, TurnOutcome::Failed).unwrap();

    let steps = &store.context("ctx").unwrap().turns[0].steps;
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0].index, 0);
    assert_eq!(steps[0].exit_code, Some(0));
    assert_eq!(steps[0].output, "ok\n");
    assert_eq!(steps[1].exit_code, Some(3));
    assert_eq!(steps[1].state, StepState::Failed);
    assert_eq!(steps[1].duration_ms, 1500);
    assert_eq!(steps[1].label.as_deref(), Some("step 1"));
    assert_eq!(steps[1].command, "echo 1");
}

#[test]
fn step_output_keeps_tail_and_full_blob() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_step_output_bytes: 100,
        ..Limits::default()
    };
    let store = LocalStore::open_with_limits(dir.path(), limits).unwrap();
    let guard = begin(&store, "ctx");
    let output: Vec<u8> = (0..1000u32)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();

    let mut full = step(0, 0);
    full.keep_full_output = true;
    let record = store
        .record_step(&guard, &full, &mut output.as_slice())
        .unwrap();
    assert_eq!(record.output.as_bytes(), &output[output.len() - 100..]);
    assert_eq!(record.truncated_bytes, output.len() as u64 - 100);
    let blob = record.full_output.expect("full output was not stored");
    assert_eq!(blob.size, output.len() as u64);
    let mut stored = Vec::new();
    store
        .blobs()
        .open(&blob.sha256)
        .unwrap()
        .read_to_end(&mut stored)
        .unwrap();
    assert_eq!(stored, output);

    // Short output gets no blob, even with keep_full_output set.
    let record = store
        .record_step(&guard, &full, &mut &b"short"[..])
        .unwrap();
    assert_eq!(record.truncated_bytes, 0);
    assert_eq!(record.full_output, None);
    assert_eq!(temp_files(&store), 0);
}

#[test]
fn step_output_cut_skips_partial_character() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_step_output_bytes: 5,
        ..Limits::default()
    };
    let store = LocalStore::open_with_limits(dir.path(), limits).unwrap();
    let guard = begin(&store, "ctx");

    // "é" is two bytes; the last 5 bytes start with its second byte.
    let record = store
        .record_step(&guard, &step(0, 0), &mut "xxé1234".as_bytes())
        .unwrap();
    assert_eq!(record.output, "1234");
    assert_eq!(record.truncated_bytes, 4);
}

#[test]
fn step_full_output_over_limit_fails() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_step_output_bytes: 10,
        max_artifact_bytes: 100,
        ..Limits::default()
    };
    let store = LocalStore::open_with_limits(dir.path(), limits).unwrap();
    let guard = begin(&store, "ctx");
    let mut full = step(2, 0);
    full.keep_full_output = true;

    let error = store
        .record_step(&guard, &full, &mut &[b'x'; 101][..])
        .err()
        .unwrap();
    assert!(matches!(
        error,
        StoreError::StepOutputTooLarge {
            index: 2,
            limit: 100,
            ..
        }
    ));
    assert_eq!(temp_files(&store), 0);
}

#[test]
fn duplicate_artifacts_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let contents = noise(10_000, 1);

    let guard = begin(&store, "a");
    add(&store, &guard, "one.bin", &contents);
    add(&store, &guard, "copy/two.bin", &contents);
    store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();
    let guard = begin(&store, "b");
    add(&store, &guard, "three.bin", &contents);
    store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();

    let blobs = store.blobs().list().unwrap();
    assert_eq!(blobs.len(), 1);
    assert_eq!(blobs[0].sha256, Digest::of(&contents));
    assert_eq!(blobs[0].size, 10_000);
    assert_eq!(temp_files(&store), 0);
    assert_eq!(read_artifact(&store, "a", "copy/two.bin"), contents);
    assert_eq!(read_artifact(&store, "b", "three.bin"), contents);
}

#[test]
fn blob_path_is_sharded_by_digest() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let blob = store.blobs().put(&mut &b"hello"[..], 100).unwrap();
    let hex = blob.sha256.to_hex();
    let expected = dir
        .path()
        .join("store/blobs/sha256")
        .join(&hex[..2])
        .join(&hex);
    assert_eq!(
        store.blobs().local_path(&blob.sha256),
        Some(expected.clone())
    );
    assert_eq!(fs::read(&expected).unwrap(), b"hello");
    assert!(store.blobs().exists(&blob.sha256).unwrap());
    let mode = fs::metadata(&expected).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o444);
}

#[test]
fn visible_artifacts_take_latest_finished_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();

    let first = begin(&store, "ctx");
    let first_id = first.id().clone();
    add(&store, &first, "a.txt", b"a1");
    add(&store, &first, "b.txt", b"b1");
    store.finish_turn(first, TurnOutcome::Succeeded).unwrap();

    let second = begin(&store, "ctx");
    let second_id = second.id().clone();
    add(&store, &second, "a.txt", b"a2");
    store.finish_turn(second, TurnOutcome::Failed).unwrap();

    let third = begin(&store, "ctx");
    add(&store, &third, "a.txt", b"a3");
    store.finish_turn(third, TurnOutcome::Interrupted).unwrap();

    // A running turn's artifacts are not visible either.
    let running = begin(&store, "ctx");
    add(&store, &running, "a.txt", b"a4");
    add(&store, &running, "c.txt", b"c4");

    let visible = store.visible_artifacts("ctx").unwrap();
    let names: Vec<_> = visible.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["a.txt", "b.txt"]);
    assert_eq!(visible[0].turn, second_id);
    assert_eq!(visible[1].turn, first_id);
    assert_eq!(read_artifact(&store, "ctx", "a.txt"), b"a2");
    assert_eq!(read_artifact(&store, "ctx", "b.txt"), b"b1");
    assert!(matches!(
        store.get_artifact("ctx", "c.txt").err().unwrap(),
        StoreError::ArtifactNotFound { .. }
    ));
}

#[test]
fn artifact_added_twice_in_turn_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let guard = begin(&store, "ctx");
    add(&store, &guard, "a.txt", b"old");
    add(&store, &guard, "a.txt", b"newer");
    store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();

    let artifacts = &store.context("ctx").unwrap().turns[0].artifacts;
    assert_eq!(artifacts.len(), 1);
    assert_eq!(artifacts[0].size, 5);
    assert_eq!(read_artifact(&store, "ctx", "a.txt"), b"newer");
}

#[test]
fn invalid_artifact_name_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let guard = begin(&store, "ctx");
    let error = store
        .add_artifact(&guard, "../escape", 0o644, &mut &b"x"[..])
        .err()
        .unwrap();
    assert!(matches!(error, StoreError::InvalidArtifactName { .. }));
    assert!(error.to_string().contains("'..'"), "{error}");
}

#[test]
fn artifact_size_limit_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_artifact_bytes: 1000,
        ..Limits::default()
    };
    let store = LocalStore::open_with_limits(dir.path(), limits).unwrap();
    let guard = begin(&store, "ctx");

    add(&store, &guard, "exact.bin", &noise(1000, 2));
    let error = store
        .add_artifact(&guard, "big.bin", 0o644, &mut &noise(1001, 3)[..])
        .err()
        .unwrap();
    assert!(matches!(
        &error,
        StoreError::ArtifactTooLarge { name, limit: 1000 } if name == "big.bin"
    ));
    assert!(error.to_string().contains("max_artifact_bytes"), "{error}");

    let artifacts = store.context("ctx").unwrap().turns[0].artifacts.clone();
    assert_eq!(artifacts.len(), 1);
    assert_eq!(store.blobs().list().unwrap().len(), 1);
    assert_eq!(temp_files(&store), 0);
}

#[test]
fn artifact_count_limit_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_artifacts_per_turn: 3,
        ..Limits::default()
    };
    let store = LocalStore::open_with_limits(dir.path(), limits).unwrap();
    let guard = begin(&store, "ctx");
    for name in ["1", "2", "3"] {
        add(&store, &guard, name, name.as_bytes());
    }
    // Replacing an existing name does not count as a new artifact.
    add(&store, &guard, "3", b"three");

    let error = store
        .add_artifact(&guard, "4", 0o644, &mut &b"4"[..])
        .err()
        .unwrap();
    assert!(matches!(
        error,
        StoreError::TooManyArtifacts { limit: 3, .. }
    ));
    assert_eq!(store.context("ctx").unwrap().turns[0].artifacts.len(), 3);
}

#[test]
fn turn_size_limit_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_artifact_bytes: 600,
        max_turn_bytes: 1000,
        ..Limits::default()
    };
    let store = LocalStore::open_with_limits(dir.path(), limits).unwrap();
    let guard = begin(&store, "ctx");
    add(&store, &guard, "a", &noise(600, 4));

    let error = store
        .add_artifact(&guard, "b", 0o644, &mut &noise(401, 5)[..])
        .err()
        .unwrap();
    assert!(matches!(
        &error,
        StoreError::TurnTooLarge { name, limit: 1000, .. } if name == "b"
    ));
    add(&store, &guard, "b", &noise(400, 5));

    // The limit applies to each turn on its own.
    store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();
    let next = begin(&store, "ctx");
    add(&store, &next, "c", &noise(600, 6));
}

#[test]
fn workspace_snapshot_round_trip_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_workspace_snapshot_bytes: 5000,
        ..Limits::default()
    };
    let store = LocalStore::open_with_limits(dir.path(), limits).unwrap();
    assert!(store.latest_workspace_snapshot("ctx").is_err());

    let archive = noise(5000, 7);
    let guard = begin(&store, "ctx");
    let id = guard.id().clone();
    store
        .set_workspace_snapshot(&guard, &mut archive.as_slice())
        .unwrap();
    store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();

    let guard = begin(&store, "ctx");
    let error = store
        .set_workspace_snapshot(&guard, &mut &noise(5001, 8)[..])
        .err()
        .unwrap();
    assert!(matches!(
        error,
        StoreError::WorkspaceSnapshotTooLarge { limit: 5000, .. }
    ));
    store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();

    let mut snapshot = store.latest_workspace_snapshot("ctx").unwrap().unwrap();
    assert_eq!(snapshot.turn, id);
    let mut bytes = Vec::new();
    snapshot.reader.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes, archive);
}

#[test]
fn export_round_trips_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let every_byte: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let large = noise(3 << 20, 9);
    let archive = noise(2048, 10);

    let guard = begin(&store, "ctx");
    store
        .record_step(&guard, &step(0, 0), &mut &b"done\n"[..])
        .unwrap();
    store
        .add_artifact(&guard, "bin/tool", 0o755, &mut every_byte.as_slice())
        .unwrap();
    add(&store, &guard, "data/deep/large.bin", &large);
    add(&store, &guard, "empty", b"");
    store
        .set_workspace_snapshot(&guard, &mut archive.as_slice())
        .unwrap();
    store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();

    let out = dir.path().join("export");
    let report = store.export_context("ctx", &out).unwrap();
    assert_eq!(report.artifacts, 3);
    assert_eq!(report.artifact_bytes, 4096 + (3 << 20));
    assert!(report.workspace_snapshot);

    assert_eq!(
        fs::read(out.join("artifacts/bin/tool")).unwrap(),
        every_byte
    );
    assert_eq!(
        fs::read(out.join("artifacts/data/deep/large.bin")).unwrap(),
        large
    );
    assert_eq!(fs::read(out.join("artifacts/empty")).unwrap(), b"");
    assert_eq!(fs::read(out.join("workspace.tar")).unwrap(), archive);
    let mode = fs::metadata(out.join("artifacts/bin/tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);

    let manifest: ContextManifest =
        serde_json::from_slice(&fs::read(out.join("turns.json")).unwrap()).unwrap();
    assert_eq!(manifest, store.manifest("ctx").unwrap());
    assert_eq!(manifest.context, "ctx");
    assert_eq!(manifest.turns.len(), 1);
    assert_eq!(manifest.turns[0].steps[0].output, "done\n");
    let paths: Vec<_> = manifest.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "artifacts/bin/tool",
            "artifacts/data/deep/large.bin",
            "artifacts/empty"
        ]
    );

    assert_eq!(read_artifact(&store, "ctx", "data/deep/large.bin"), large);
}

#[test]
fn export_rejects_non_empty_folder() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    store
        .finish_turn(begin(&store, "ctx"), TurnOutcome::Succeeded)
        .unwrap();
    let out = dir.path().join("export");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep.txt"), "mine").unwrap();

    let error = store.export_context("ctx", &out).err().unwrap();
    assert!(matches!(error, StoreError::ExportFolderNotEmpty(_)));
    assert_eq!(fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
}

#[test]
fn export_name_conflict_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    for name in ["a", "a/b"] {
        let guard = begin(&store, "ctx");
        add(&store, &guard, name, name.as_bytes());
        store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();
    }

    let out = dir.path().join("export");
    let error = store.export_context("ctx", &out).err().unwrap();
    assert!(matches!(error, StoreError::Io { .. }), "{error:?}");
    assert_eq!(fs::read(out.join("artifacts/a")).unwrap(), b"a");
}

#[test]
fn manifest_leaves_out_running_turn() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let done = begin(&store, "ctx");
    let done_id = done.id().clone();
    store.finish_turn(done, TurnOutcome::Succeeded).unwrap();
    let _running = begin(&store, "ctx");

    let manifest = store.manifest("ctx").unwrap();
    let ids: Vec<_> = manifest.turns.iter().map(|t| t.turn.id.clone()).collect();
    assert_eq!(ids, [done_id]);
    assert_eq!(store.context("ctx").unwrap().turns.len(), 2);

    let json = serde_json::to_value(&manifest).unwrap();
    assert_eq!(json["turns"][0]["state"], "succeeded");
    assert_eq!(json["format_version"], 1);
}

#[test]
fn list_contexts_counts_turns_and_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    for contents in [&b"1"[..], b"2"] {
        let guard = begin(&store, "busy");
        add(&store, &guard, "same.txt", contents);
        add(&store, &guard, &format!("{}.txt", contents[0]), contents);
        store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();
    }
    let last = begin(&store, "quiet");
    let last_id = last.id().clone();
    store.finish_turn(last, TurnOutcome::Succeeded).unwrap();

    let contexts = store.list_contexts().unwrap();
    assert_eq!(contexts.len(), 2);
    assert_eq!(contexts[0].name, "busy");
    assert_eq!(contexts[0].turn_count, 2);
    assert_eq!(contexts[0].artifact_count, 3);
    assert_eq!(contexts[1].name, "quiet");
    assert_eq!(contexts[1].artifact_count, 0);
    assert_eq!(contexts[1].last_turn, Some(last_id));
    assert!(contexts[1].last_used_at.is_some());
}

#[test]
fn remove_context_refused_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let guard = begin(&store, "ctx");
    add(&store, &guard, "a", b"a");

    let error = store.remove_context("ctx").err().unwrap();
    assert!(matches!(error, StoreError::ContextBusy { .. }));

    store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();
    let removed = store.remove_context("ctx").unwrap();
    assert_eq!(removed.turns, 1);
    assert_eq!(removed.artifacts, 1);
    assert!(matches!(
        store.context("ctx").err().unwrap(),
        StoreError::ContextNotFound(_)
    ));
    assert!(matches!(
        store.remove_context("ctx").err().unwrap(),
        StoreError::ContextNotFound(_)
    ));
}

#[test]
fn gc_frees_only_unreferenced_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_step_output_bytes: 4,
        ..Limits::default()
    };
    let store = LocalStore::open_with_limits(dir.path(), limits).unwrap();
    let shared = noise(1000, 11);
    let only_removed = noise(2000, 12);
    let kept_output = noise(300, 13);
    let kept_archive = noise(400, 14);

    let guard = begin(&store, "kept");
    add(&store, &guard, "shared.bin", &shared);
    let mut full = step(0, 0);
    full.keep_full_output = true;
    store
        .record_step(&guard, &full, &mut kept_output.as_slice())
        .unwrap();
    store
        .set_workspace_snapshot(&guard, &mut kept_archive.as_slice())
        .unwrap();
    store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();

    let guard = begin(&store, "removed");
    add(&store, &guard, "shared.bin", &shared);
    add(&store, &guard, "only.bin", &only_removed);
    store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();
    let orphan = store.blobs().put(&mut &b"orphan"[..], 100).unwrap();

    assert_eq!(store.gc().unwrap().blobs_removed, 1);
    assert!(!store.blobs().exists(&orphan.sha256).unwrap());

    store.remove_context("removed").unwrap();
    let report = store.gc().unwrap();
    assert_eq!(report.blobs_removed, 1);
    assert_eq!(report.blob_bytes_freed, 2000);
    assert!(!store.blobs().exists(&Digest::of(&only_removed)).unwrap());

    let remaining: Vec<_> = store.blobs().list().unwrap();
    assert_eq!(remaining.len(), 3);
    for contents in [&shared, &kept_output, &kept_archive] {
        assert!(store.blobs().exists(&Digest::of(contents)).unwrap());
    }
    assert_eq!(read_artifact(&store, "kept", "shared.bin"), shared);
    assert_eq!(store.gc().unwrap(), Default::default());
}

#[test]
fn gc_beside_writers_keeps_referenced_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let writer = LocalStore::open(dir.path()).unwrap();
    let collector = LocalStore::open(dir.path()).unwrap();
    let contents = noise(50_000, 17);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // The writer removes each context after use, so the blob is unreferenced between
    // iterations and the next add_artifact often finds it still on disk while gc runs.
    let gc_stop = Arc::clone(&stop);
    let gc_thread = thread::spawn(move || {
        let mut removed = 0;
        while !gc_stop.load(std::sync::atomic::Ordering::Relaxed) {
            removed += collector.gc().unwrap().blobs_removed;
        }
        removed
    });
    for _ in 0..40 {
        let guard = begin(&writer, "ctx");
        add(&writer, &guard, "data.bin", &contents);
        writer.finish_turn(guard, TurnOutcome::Succeeded).unwrap();
        assert_eq!(read_artifact(&writer, "ctx", "data.bin"), contents);
        writer.remove_context("ctx").unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let removed = gc_thread.join().unwrap();
    assert!(removed >= 1, "gc never ran between iterations");
}

#[test]
fn gc_sweeps_only_abandoned_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let temp_dir = store.blob_store().temp_dir();
    fs::write(temp_dir.join("abandoned.tmp"), noise(123, 15)).unwrap();

    // A temp file whose writer is alive is locked, as FsBlobStore's writers lock theirs.
    let live_path = temp_dir.join("live.tmp");
    fs::write(&live_path, b"partial").unwrap();
    let live = fs::File::open(&live_path).unwrap();
    crate::lock::lock_file(&live, crate::lock::LockMode::Exclusive).unwrap();

    let report = store.gc().unwrap();
    assert_eq!(report.temp_files_removed, 1);
    assert_eq!(report.temp_bytes_freed, 123);
    assert!(live_path.exists());

    drop(live);
    assert_eq!(store.gc().unwrap().temp_files_removed, 1);
    assert!(!live_path.exists());
}

#[test]
fn corrupt_blob_fails_reads_and_export() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let contents = noise(5000, 16);
    let guard = begin(&store, "ctx");
    add(&store, &guard, "data.bin", &contents);
    store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();

    let path = store.blobs().local_path(&Digest::of(&contents)).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&path, &contents[..4000]).unwrap();

    let mut content = store.get_artifact("ctx", "data.bin").unwrap();
    let error = content.reader.read_to_end(&mut Vec::new()).err().unwrap();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);

    let out = dir.path().join("export");
    let error = store.export_context("ctx", &out).err().unwrap();
    assert!(matches!(error, StoreError::CorruptBlob { .. }), "{error:?}");
    assert!(!out.join("artifacts/data.bin").exists());

    // Storing the same bytes again replaces the damaged file.
    let guard = begin(&store, "ctx");
    add(&store, &guard, "data.bin", &contents);
    store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();
    assert_eq!(read_artifact(&store, "ctx", "data.bin"), contents);
}

#[test]
fn failed_input_read_leaves_no_blob() {
    struct FailingReader(usize);
    impl Read for FailingReader {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("disk went away"));
            }
            let count = buf.len().min(self.0);
            buf[..count].fill(b'x');
            self.0 -= count;
            Ok(count)
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let guard = begin(&store, "ctx");
    let error = store
        .add_artifact(&guard, "a", 0o644, &mut FailingReader(200_000))
        .err()
        .unwrap();
    assert!(matches!(error, StoreError::ReadInput { .. }));
    assert!(error.to_string().contains("artifact 'a'"), "{error}");
    assert!(store.blobs().list().unwrap().is_empty());
    assert_eq!(temp_files(&store), 0);
}

#[test]
fn records_after_finish_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let guard = begin(&store, "ctx");

    // A second connection marks the turn finished while the guard still exists, as a manual
    // repair would. The guard's writes must then fail instead of changing a finished turn.
    let conn = Connection::open(store.database_path()).unwrap();
    conn.execute(
        "UPDATE turns SET state = 'failed' WHERE id = ?1",
        [guard.id().as_str()],
    )
    .unwrap();

    let error = store
        .add_artifact(&guard, "a", 0o644, &mut &b"a"[..])
        .err()
        .unwrap();
    assert!(matches!(
        error,
        StoreError::TurnNotRunning {
            state: TurnState::Failed,
            ..
        }
    ));
}

#[test]
fn open_creates_store_layout() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    drop(begin(&store, "ctx"));
    let root = dir.path().join("store");
    for path in ["upstream.db", "blobs/sha256", "blobs/tmp", "locks"] {
        assert!(root.join(path).exists(), "{path} missing");
    }
    let locks = fs::read_dir(root.join("locks")).unwrap().count();
    assert_eq!(locks, 1);
    assert!(Path::new(&root.join("upstream.db-wal")).exists());
}

#[test]
fn discarded_turn_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let guard = begin(&store, "ctx");
    add(&store, &guard, "kept.txt", b"first");
    store.finish_turn(guard, TurnOutcome::Succeeded).unwrap();

    let check = begin(&store, "ctx");
    add(&store, &check, "kept.txt", b"from the check");
    add(&store, &check, "new.txt", b"new");
    store
        .record_step(&check, &step(0, 0), &mut &b"output"[..])
        .unwrap();
    store.discard_turn(check).unwrap();

    let detail = store.context("ctx").unwrap();
    assert_eq!(detail.turns.len(), 1);
    let names: Vec<String> = store
        .visible_artifacts("ctx")
        .unwrap()
        .into_iter()
        .map(|artifact| artifact.name)
        .collect();
    assert_eq!(names, ["kept.txt"]);
    assert_eq!(read_artifact(&store, "ctx", "kept.txt"), b"first");
    // The check's two artifact blobs; its step output lived in its row.
    assert_eq!(store.gc().unwrap().blobs_removed, 2);
    // The lock is free again.
    let next = begin(&store, "ctx");
    store.finish_turn(next, TurnOutcome::Succeeded).unwrap();
}

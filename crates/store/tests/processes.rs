//! Tests with a second process: this test binary runs itself again as a helper that opens the
//! same store, and the tests kill that helper with SIGKILL in the middle of a turn.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use upstream_store::{
    BeginOptions, ContextStore, Digest, DocumentInfo, LocalStore, StoreError, TurnId, TurnOutcome,
    TurnState,
};

/// Set in the helper's environment to the role it plays; unset in normal test runs.
const ROLE_VAR: &str = "UPSTREAM_STORE_TEST_ROLE";
const DATA_DIR_VAR: &str = "UPSTREAM_STORE_TEST_DATA_DIR";
/// File the helper writes once it reaches the point where the parent acts.
const READY_VAR: &str = "UPSTREAM_STORE_TEST_READY";

const CONTEXT: &str = "shared";

fn document() -> DocumentInfo {
    DocumentInfo {
        path: "/work/doc.md".into(),
        sha256: Digest::of(b"doc"),
        image: None,
        image_digest: None,
    }
}

/// Entry point of the helper process. In a normal test run it does nothing.
#[test]
fn helper_process() {
    let Ok(role) = std::env::var(ROLE_VAR) else {
        return;
    };
    let data_dir = PathBuf::from(std::env::var(DATA_DIR_VAR).unwrap());
    let ready = PathBuf::from(std::env::var(READY_VAR).unwrap());
    let store = LocalStore::open(&data_dir).unwrap();
    let turn = store
        .begin_turn(CONTEXT, &document(), &BeginOptions::default())
        .unwrap();

    match role.as_str() {
        // Holds a turn with one stored artifact until killed.
        "hold" => {
            store
                .add_artifact(&turn, "partial.txt", 0o644, &mut &b"half done"[..])
                .unwrap();
            fs::write(&ready, turn.id().as_str()).unwrap();
            thread::sleep(Duration::from_secs(600));
        }
        // Holds a turn for a moment, then finishes it.
        "finish" => {
            fs::write(&ready, turn.id().as_str()).unwrap();
            thread::sleep(Duration::from_millis(500));
            store.finish_turn(turn, TurnOutcome::Succeeded).unwrap();
        }
        // Stalls in the middle of writing an artifact until killed.
        "stall_write" => {
            let mut reader = StallingReader {
                remaining: 1 << 20,
                ready,
            };
            let _ = store.add_artifact(&turn, "big.bin", 0o644, &mut reader);
            unreachable!("the stalling reader never ends");
        }
        other => panic!("unknown helper role {other}"),
    }
}

/// Yields `remaining` bytes, then signals readiness and blocks for good.
struct StallingReader {
    remaining: usize,
    ready: PathBuf,
}

impl Read for StallingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            fs::write(&self.ready, "stalled").unwrap();
            thread::sleep(Duration::from_secs(600));
        }
        let count = buf.len().min(self.remaining);
        buf[..count].fill(0xAB);
        self.remaining -= count;
        Ok(count)
    }
}

/// A helper process, killed with SIGKILL when dropped if it is still running.
struct Helper {
    child: Child,
}

impl Helper {
    fn spawn(role: &str, data_dir: &Path, ready: &Path) -> Helper {
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "helper_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE_VAR, role)
            .env(DATA_DIR_VAR, data_dir)
            .env(READY_VAR, ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Helper { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the helper has written `ready`, and returns its contents.
    fn wait_ready(&mut self, ready: &Path) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = fs::read_to_string(ready) {
                if !text.is_empty() {
                    return text;
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("helper exited with {status} before it was ready");
            }
            assert!(Instant::now() < deadline, "helper not ready after 60 s");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGKILL and reaps the process.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn killed_turn_is_interrupted_by_next_begin() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let mut helper = Helper::spawn("hold", dir.path(), &ready);
    let helper_turn: TurnId = helper.wait_ready(&ready).parse().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();

    // While the helper lives, its turn keeps the context.
    let error = store
        .begin_turn(CONTEXT, &document(), &BeginOptions::default())
        .err()
        .unwrap();
    match &error {
        StoreError::ContextBusy { context, holder } => {
            assert_eq!(context, CONTEXT);
            assert_eq!(holder.turn.as_ref(), Some(&helper_turn));
            assert_eq!(holder.pid, Some(helper.pid()));
        }
        other => panic!("expected ContextBusy, got {other:?}"),
    }
    assert!(error.to_string().contains(&format!("pid {}", helper.pid())));

    helper.kill();
    let turn = store
        .begin_turn(CONTEXT, &document(), &BeginOptions::default())
        .unwrap();
    assert_eq!(turn.interrupted_turns(), std::slice::from_ref(&helper_turn));
    store.finish_turn(turn, TurnOutcome::Succeeded).unwrap();

    let detail = store.context(CONTEXT).unwrap();
    assert_eq!(detail.turns.len(), 2);
    let killed = &detail.turns[0];
    assert_eq!(killed.turn.id, helper_turn);
    assert_eq!(killed.turn.state, TurnState::Interrupted);
    assert_eq!(killed.turn.ended_at, None);
    assert_eq!(killed.artifacts[0].name, "partial.txt");

    // An interrupted turn's artifacts are not handed to later turns.
    assert!(store.visible_artifacts(CONTEXT).unwrap().is_empty());
}

#[test]
fn killed_turn_is_interrupted_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let mut helper = Helper::spawn("hold", dir.path(), &ready);
    let helper_turn: TurnId = helper.wait_ready(&ready).parse().unwrap();

    // Opening while the helper lives must leave its turn running.
    let store = LocalStore::open(dir.path()).unwrap();
    assert_eq!(
        store.context(CONTEXT).unwrap().turns[0].turn.state,
        TurnState::Running
    );
    drop(store);

    helper.kill();
    let store = LocalStore::open(dir.path()).unwrap();
    let turn = &store.context(CONTEXT).unwrap().turns[0].turn;
    assert_eq!(turn.id, helper_turn);
    assert_eq!(turn.state, TurnState::Interrupted);
}

#[test]
fn begin_waits_for_other_process() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let mut helper = Helper::spawn("finish", dir.path(), &ready);
    let helper_turn: TurnId = helper.wait_ready(&ready).parse().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();

    let options = BeginOptions {
        wait: Some(Duration::from_secs(60)),
    };
    let turn = store.begin_turn(CONTEXT, &document(), &options).unwrap();
    assert!(turn.interrupted_turns().is_empty());
    store.finish_turn(turn, TurnOutcome::Succeeded).unwrap();

    let detail = store.context(CONTEXT).unwrap();
    assert_eq!(detail.turns[0].turn.id, helper_turn);
    assert_eq!(detail.turns[0].turn.state, TurnState::Succeeded);
    assert!(detail.turns[0].turn.ended_at.unwrap() <= detail.turns[1].turn.started_at);
}

#[test]
fn killed_blob_writer_leaves_no_visible_blob() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let mut helper = Helper::spawn("stall_write", dir.path(), &ready);
    helper.wait_ready(&ready);
    let store = LocalStore::open(dir.path()).unwrap();
    let temp_dir = store.blob_store().temp_dir();

    // The half-written blob exists only as the helper's locked temp file, which a gc run
    // beside the live writer must not delete.
    assert!(store.blobs().list().unwrap().is_empty());
    let temp_files: Vec<_> = fs::read_dir(&temp_dir).unwrap().collect();
    assert_eq!(temp_files.len(), 1);
    assert_eq!(store.gc().unwrap().temp_files_removed, 0);

    helper.kill();
    assert!(store.blobs().list().unwrap().is_empty());
    let report = store.gc().unwrap();
    assert_eq!(report.temp_files_removed, 1);
    assert!(report.temp_bytes_freed > 0);
    assert_eq!(fs::read_dir(&temp_dir).unwrap().count(), 0);

    // The next turn works and gets no artifact from the killed one.
    let turn = store
        .begin_turn(CONTEXT, &document(), &BeginOptions::default())
        .unwrap();
    assert_eq!(turn.interrupted_turns().len(), 1);
    store
        .add_artifact(&turn, "big.bin", 0o644, &mut &b"complete"[..])
        .unwrap();
    store.finish_turn(turn, TurnOutcome::Succeeded).unwrap();
    let visible = store.visible_artifacts(CONTEXT).unwrap();
    assert_eq!(visible.len(), 1);
    assert_eq!(visible[0].size, 8);
}

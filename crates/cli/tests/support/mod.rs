//! A private data directory per test, sharing the kernel, agent and images of the data
//! directory that `UPSTREAM_TEST_HOME` names, and helpers to drive the `upstream` binary.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A temp data directory with its own store and run folder, and a folder for documents.
pub struct Home {
    pub data: tempfile::TempDir,
    pub docs: tempfile::TempDir,
}

/// Returns the prepared data directory, or `None` after printing why VM tests are skipped.
/// Under `CI=true` a missing one fails the test instead.
pub fn test_home() -> Option<PathBuf> {
    let reason = match std::env::var_os("UPSTREAM_TEST_HOME").map(PathBuf::from) {
        Some(path) if path.join("setup.json").is_file() => return Some(path),
        Some(path) => format!(
            "{} has no setup.json; run `upstream setup` there",
            path.display()
        ),
        None => "UPSTREAM_TEST_HOME is not set".to_owned(),
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("tests that boot VMs cannot run: {reason}");
    }
    eprintln!("skipped: {reason}");
    None
}

impl Home {
    /// Creates a data directory whose `setup.json`, images, agents and disk templates are
    /// those of the prepared one; `None` when VM tests are skipped.
    pub fn new() -> Option<Home> {
        let shared = test_home()?;
        Some(Home::linked_to(&shared))
    }

    /// Creates a data directory for commands that boot no VM.
    pub fn without_vm() -> Home {
        Home {
            data: tempfile::tempdir().unwrap(),
            docs: tempfile::tempdir().unwrap(),
        }
    }

    fn linked_to(shared: &Path) -> Home {
        let home = Home::without_vm();
        let data = home.data.path();
        fs::copy(shared.join("setup.json"), data.join("setup.json")).unwrap();
        for folder in ["images", "agent", "disks"] {
            std::os::unix::fs::symlink(shared.join(folder), data.join(folder)).unwrap();
        }
        // The notice that TCG is in use is printed once per data directory.
        let _ = fs::copy(shared.join(".notice-tcg"), data.join(".notice-tcg"));
        home
    }

    /// Writes a document into the documents folder and returns its path.
    pub fn document(&self, name: &str, text: &str) -> PathBuf {
        let path = self.docs.path().join(name);
        fs::write(&path, text).unwrap();
        path
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_upstream"));
        command
            .args(args)
            .env("UPSTREAM_HOME", self.data.path())
            .env_remove("UPSTREAM_LOG")
            .env_remove("UPSTREAM_BACKEND")
            .env_remove("UPSTREAM_KERNEL")
            .env_remove("UPSTREAM_AGENT")
            .current_dir(self.docs.path())
            .stdin(Stdio::null());
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Starts `upstream` with `--json` events on stdout and waits until an event line
    /// contains `marker`.
    pub fn spawn_until(&self, args: &[&str], marker: &str) -> Child {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            assert!(Instant::now() < deadline, "no event with {marker} in time");
            let line = lines
                .next()
                .expect("upstream ended before the marker")
                .unwrap();
            if line.contains(marker) {
                break;
            }
        }
        // Keep draining stdout so that the process never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        child
    }

    /// Processes whose command line names this data directory: the VMMs of its sandboxes.
    pub fn vmm_processes(&self) -> Vec<u32> {
        let needle = self.data.path().to_str().unwrap().as_bytes().to_vec();
        let mut found = Vec::new();
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let is_upstream = cmdline.starts_with(env!("CARGO_BIN_EXE_upstream").as_bytes());
            if !is_upstream
                && cmdline
                    .windows(needle.len())
                    .any(|w| w == needle.as_slice())
            {
                found.push(pid);
            }
        }
        found
    }

    /// Sandbox folders left under the data directory's run folder.
    pub fn run_folders(&self) -> Vec<PathBuf> {
        match fs::read_dir(self.data.path().join("run")) {
            Ok(entries) => entries.flatten().map(|entry| entry.path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Files in the store's blob folder.
    pub fn blob_count(&self) -> usize {
        fn count(path: &Path) -> usize {
            fs::read_dir(path)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|entry| {
                            let path = entry.path();
                            if path.is_dir() {
                                count(&path)
                            } else {
                                1
                            }
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        count(&self.data.path().join("store/blobs/sha256"))
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits until `check` returns true, for at most `timeout`.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}

/// Sends `signal` to a child process.
pub fn send_signal(child: &Child, signal: i32) {
    // SAFETY: kill takes no pointers; the pid is a child this test started.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(rc, 0, "sending signal {signal} failed");
}

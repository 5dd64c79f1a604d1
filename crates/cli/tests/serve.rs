//! `upstream serve` as a process: the Python SDK against it, `upstream sandbox` and
//! `upstream usage`, and shutdown by SIGTERM and by SIGKILL plus restart.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{eventually, send_signal, text, Home};

/// A running `upstream serve` with its stderr collected.
struct ServeProcess {
    child: Child,
    url: String,
    stderr: Arc<Mutex<String>>,
}

impl ServeProcess {
    fn start(home: &Home) -> Self {
        let mut child = home
            .command(&["serve", "--listen", "127.0.0.1:0"])
            .env("UPSTREAM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let stderr = Arc::new(Mutex::new(String::new()));
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = loop {
            assert!(
                Instant::now() < deadline,
                "the server did not report its address"
            );
            let line = lines
                .next()
                .expect("the server ended before listening")
                .unwrap();
            stderr.lock().unwrap().push_str(&format!("{line}\n"));
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        let collected = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                collected.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        Self { child, url, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Runs `upstream sandbox ARGS` against this server.
    fn sandbox(&self, home: &Home, args: &[&str]) -> std::process::Output {
        let mut all = vec!["sandbox", "--url", &self.url];
        all.extend_from_slice(args);
        home.run(&all)
    }

    /// Waits for the server to exit and returns its exit code.
    fn wait(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "the server did not exit");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ServeProcess {
    /// Stops a server that a failed assertion left running, so no test leaks VMs.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            send_signal(&self.child, libc::SIGTERM);
            let stopped = eventually(Duration::from_secs(30), || {
                matches!(self.child.try_wait(), Ok(Some(_)))
            });
            if !stopped {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn python_sdk_against_server() {
    let Some(home) = Home::new() else { return };
    let mut server = ServeProcess::start(&home);
    let sdk = repository().join("sdk/python");

    let output = Command::new("python3")
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(sdk.join("tests"))
        .env("PYTHONPATH", sdk.join("src"))
        .env("UPSTREAM_URL", &server.url)
        .output()
        .expect("running python3");

    let log = text(&output.stderr);
    assert!(output.status.success(), "Python tests failed:\n{log}");
    assert!(log.contains("Ran 2 tests"), "{log}");
    assert!(!log.contains("skipped"), "{log}");
    send_signal(&server.child, libc::SIGTERM);
    assert_eq!(server.wait(), Some(0));
    assert!(home.vmm_processes().is_empty());
}

#[test]
fn sigterm_destroys_every_sandbox() {
    let Some(home) = Home::new() else { return };
    let mut server = ServeProcess::start(&home);

    let created = server.sandbox(&home, &["create", "--metadata", "team=a"]);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let id = text(&created.stdout).trim().to_string();
    let exec = server.sandbox(&home, &["exec", &id, "--", "sh", "-c", "echo hi; exit 3"]);
    let listed = server.sandbox(&home, &["ls"]);
    assert_eq!(text(&exec.stdout), "hi\n");
    assert_eq!(exec.status.code(), Some(3));
    assert!(text(&listed.stdout).contains(&id));
    assert!(!home.vmm_processes().is_empty());

    send_signal(&server.child, libc::SIGTERM);
    assert_eq!(server.wait(), Some(0));

    let log = server.stderr();
    assert!(log.contains("shutting down"), "{log}");
    assert!(home.vmm_processes().is_empty(), "a VM outlived the server");
    assert!(home.run_folders().is_empty());
    let usage = home.run(&["usage", "--by", "metadata", "team"]);
    let report = text(&usage.stdout);
    assert!(usage.status.success(), "{}", text(&usage.stderr));
    assert!(
        report.lines().any(|line| line.starts_with("a ")),
        "{report}"
    );
}

#[test]
fn kill_9_then_restart_leaves_no_vm() {
    let Some(home) = Home::new() else { return };
    let mut server = ServeProcess::start(&home);
    let created = server.sandbox(&home, &["create"]);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let id = text(&created.stdout).trim().to_string();

    send_signal(&server.child, libc::SIGKILL);
    server.wait();
    let mut restarted = ServeProcess::start(&home);

    assert!(
        eventually(Duration::from_secs(10), || home.vmm_processes().is_empty()),
        "a VM of the killed server still runs"
    );
    assert!(home.run_folders().is_empty());
    assert!(
        restarted
            .stderr()
            .contains(&format!("destroyed sandbox {id}")),
        "{}",
        restarted.stderr()
    );
    let listed = restarted.sandbox(&home, &["ls"]);
    assert!(!text(&listed.stdout).contains(&id));
    send_signal(&restarted.child, libc::SIGTERM);
    assert_eq!(restarted.wait(), Some(0));
    let usage = home.run(&["usage", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&usage.stdout).unwrap();
    assert_eq!(report[0]["sandboxes"], 1);
}

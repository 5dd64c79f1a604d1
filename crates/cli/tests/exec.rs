//! `upstream exec`, `setup` and `doctor` driven as a user would: exit
//! codes, streams, bad input, signals and cleanup.

mod support;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{eventually, send_signal, text, Home};

#[test]
fn exec_passes_exit_codes_through() {
    let Some(home) = Home::new() else { return };
    for (script, code) in [("true", 0), ("exit 7", 7), ("kill -9 $$", 137)] {
        let output = home.run(&["exec", "--", "sh", "-c", script]);
        assert_eq!(output.status.code(), Some(code), "script {script:?}");
    }
    assert!(home.run_folders().is_empty());
    assert!(home.vmm_processes().is_empty());
}

#[test]
fn exec_reports_missing_command() {
    let Some(home) = Home::new() else { return };
    let output = home.run(&["exec", "--", "no-such-tool", "--flag"]);
    assert_eq!(output.status.code(), Some(127));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("'no-such-tool' not found"), "{stderr}");
}

#[test]
fn exec_timeout_exits_124() {
    let Some(home) = Home::new() else { return };
    let started = Instant::now();
    let output = home.run(&["exec", "--timeout", "2s", "--", "sleep", "60"]);
    assert_eq!(output.status.code(), Some(124));
    assert!(text(&output.stderr).contains("timed out after 2s"));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn exec_streams_stdin_stdout_and_stderr() {
    let Some(home) = Home::new() else { return };
    let mut child = home
        .command(&["exec", "--", "sh", "-c", "tr a-z A-Z; echo done >&2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"piped input\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(output.stdout, b"PIPED INPUT\n");
    assert!(
        text(&output.stderr).ends_with("done\n"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn exec_keeps_binary_output_intact() {
    let Some(home) = Home::new() else { return };
    let script = "i=0; while [ $i -lt 256 ]; do printf \"\\\\$(printf %03o $i)\"; i=$((i+1)); done";
    let output = home.run(&["exec", "--", "bash", "-c", script]);
    assert_eq!(output.status.code(), Some(0));
    let expected: Vec<u8> = (0..=255u8).collect();
    assert_eq!(output.stdout, expected);
}

#[test]
fn exec_env_and_workdir_apply() {
    let Some(home) = Home::new() else { return };
    let output = home.run(&[
        "exec",
        "--env",
        "GREETING=hi there",
        "--workdir",
        "/srv/app",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\"; pwd",
    ]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(text(&output.stdout), "hi there\n/srv/app\n");
}

#[test]
fn bad_values_name_the_value_and_fix() {
    let home = Home::without_vm();
    let junk = home.document("junk.tar", "not a tar archive");
    let junk = junk.to_str().unwrap();
    let cases: [(&[&str], i32, &str); 12] = [
        (
            &["exec", "--memory", "16", "--", "true"],
            2,
            "memory (MiB) 16 is out of range",
        ),
        (
            &["exec", "--vcpus", "0", "--", "true"],
            2,
            "vcpus 0 is out of range",
        ),
        (
            &["exec", "--timeout", "soon", "--", "true"],
            2,
            "invalid duration `soon`",
        ),
        (&["exec", "--timeout", "0s", "--", "true"], 2, "is zero"),
        (
            &["exec", "--timeout", "10sec", "--", "true"],
            2,
            "invalid duration",
        ),
        (
            &["exec", "--workdir", "rel", "--", "true"],
            2,
            "--workdir rel is not an absolute path",
        ),
        (
            &["run", "--dry-run", "/nonexistent.md"],
            2,
            "/nonexistent.md",
        ),
        (
            &["run", "-o", "/nonexistent/dir/out.md", "doc.md"],
            2,
            "folder /nonexistent/dir does not exist",
        ),
        (
            &["image", "pull", "Not A Valid Ref!!"],
            2,
            "Not A Valid Ref!!",
        ),
        (&["image", "rm", "no-such-image"], 2, "no-such-image"),
        (&["image", "import", junk], 2, "junk.tar"),
        (
            &["exec", "--env", "NOEQUALS", "--", "true"],
            2,
            "use KEY=VALUE",
        ),
    ];
    for (args, code, message) in cases {
        let output = home.run(args);
        assert_eq!(output.status.code(), Some(code), "args {args:?}");
        let stderr = text(&output.stderr);
        assert!(stderr.contains(message), "args {args:?}: {stderr}");
    }
}

#[test]
fn missing_setup_says_to_run_setup() {
    let home = Home::without_vm();
    let output = home.run(&["exec", "--", "true"]);
    assert_eq!(output.status.code(), Some(3));
    assert!(
        text(&output.stderr).contains("upstream setup"),
        "{}",
        text(&output.stderr)
    );

    let output = home.run(&["doctor"]);
    assert_eq!(output.status.code(), Some(3));
    assert!(text(&output.stdout).contains("run `upstream setup`"));
}

#[test]
fn invalid_reference_fails_before_pulling() {
    let home = Home::without_vm();
    let output = home.run(&["image", "pull", "Not A Valid Ref!!"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Invalid image reference"), "{stderr}");
    assert!(!stderr.contains("Pulling"), "{stderr}");
}

#[test]
fn closed_stderr_is_not_a_crash() {
    let home = Home::without_vm();
    // A pipe whose reader is gone before upstream writes its error.
    let mut child = home
        .command(&["image", "rm", "no-such-image"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "{status:?}");
}

#[test]
fn unknown_backend_is_a_usage_error() {
    let Some(home) = Home::new() else { return };
    let output = home.run(&["exec", "--backend", "vmware", "--", "true"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("Unknown backend 'vmware'; use qemu or firecracker"));
}

#[test]
fn doctor_reports_a_ready_host() {
    let Some(home) = Home::new() else { return };
    let output = home.run(&["doctor"]);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("Acceleration: "), "{stdout}");
    assert!(stdout.contains("qemu: usable"), "{stdout}");
    assert!(stdout.contains("Ready."), "{stdout}");
}

#[test]
fn interrupt_destroys_the_sandbox() {
    let Some(home) = Home::new() else { return };
    let child = home.spawn_until(
        &["exec", "--", "sh", "-c", "echo started; sleep 60"],
        "started",
    );
    send_signal(&child, libc::SIGINT);
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130));
    assert!(home.vmm_processes().is_empty());
    assert!(home.run_folders().is_empty());
}

#[test]
fn kill_9_leaves_nothing_after_next_start() {
    let Some(home) = Home::new() else { return };
    let mut child = home.spawn_until(
        &["exec", "--", "sh", "-c", "echo started; sleep 60"],
        "started",
    );
    send_signal(&child, libc::SIGKILL);
    child.wait().unwrap();
    // The VMM gets SIGKILL from the kernel when its parent dies.
    assert!(eventually(Duration::from_secs(10), || home
        .vmm_processes()
        .is_empty()));

    // The dead process could not remove its folder; the next start does.
    let output = home.run(&["exec", "--", "true"]);
    assert_eq!(output.status.code(), Some(0));
    assert!(home.run_folders().is_empty(), "{:?}", home.run_folders());
}

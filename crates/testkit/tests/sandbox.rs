//! Sandboxes in real microVMs: isolation, exit codes, output, timeouts,
//! zombies, limits and cleanup.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use upstream_protocol::{ErrorKind, ExecRequest};
use upstream_testkit::{processes_mentioning, require_vm, sh, sh_with};
use upstream_vmm::{Error, ExecEvent, Limits};

#[tokio::test]
async fn guest_runs_its_own_kernel() {
    let vm = require_vm!();
    let sandbox = vm.sandbox().await;
    let (stdout, _, status) = sh(&sandbox, "uname -r").await;
    let guest_release = String::from_utf8(stdout).unwrap().trim().to_string();
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();

    assert_eq!(status.code, Some(0));
    assert_eq!(guest_release, sandbox.agent().hello().kernel_release);
    assert_ne!(guest_release, host_release.trim());
    sandbox.destroy().await;
}

#[tokio::test]
async fn host_files_are_invisible() {
    let vm = require_vm!();
    let marker = std::env::temp_dir().join(format!("upstream-marker-{}", std::process::id()));
    std::fs::write(&marker, "host secret").unwrap();
    let sandbox = vm.sandbox().await;

    let script = format!(
        "test -e {} || test -e /work/main/Cargo.toml",
        marker.display()
    );
    let (_, _, status) = sh(&sandbox, &script).await;
    sandbox.destroy().await;
    std::fs::remove_file(&marker).unwrap();
    assert_eq!(status.code, Some(1), "a host file is visible in the guest");
}

#[tokio::test]
async fn exit_codes_and_signals_come_back() {
    let vm = require_vm!();
    let sandbox = vm.sandbox().await;
    for (script, expected) in [
        ("true", 0),
        ("exit 1", 1),
        ("exit 7", 7),
        ("kill -9 $$", 137),
    ] {
        let (_, _, status) = sh(&sandbox, script).await;
        assert_eq!(status.shell_code(), expected, "script {script:?}");
    }
    let (_, _, status) = sh(&sandbox, "kill -9 $$").await;
    assert_eq!(status.signal, Some(9));
    assert_eq!(status.code, None);
    sandbox.destroy().await;
}

#[tokio::test]
async fn ten_megabytes_of_binary_stdout_arrive_intact() {
    let vm = require_vm!();
    let sandbox = vm.sandbox().await;
    let script =
        "head -c 10485760 /dev/urandom > /tmp/blob && sha256sum /tmp/blob >&2 && cat /tmp/blob";
    let (stdout, stderr, status) = sh(&sandbox, script).await;
    sandbox.destroy().await;

    assert_eq!(status.code, Some(0));
    assert_eq!(stdout.len(), 10 << 20);
    let guest_digest = String::from_utf8(stderr).unwrap();
    let host_digest = hex::encode(Sha256::digest(&stdout));
    assert_eq!(
        guest_digest.split_whitespace().next(),
        Some(host_digest.as_str())
    );
}

#[tokio::test]
async fn stderr_stays_apart_from_stdout() {
    let vm = require_vm!();
    let sandbox = vm.sandbox().await;
    let (stdout, stderr, _) = sh(&sandbox, "echo out; echo err >&2; echo out2").await;
    sandbox.destroy().await;
    assert_eq!(stdout, b"out\nout2\n");
    assert_eq!(stderr, b"err\n");
}

#[tokio::test]
async fn timeout_stops_sleep_within_about_two_seconds() {
    let vm = require_vm!();
    let sandbox = vm.sandbox().await;
    let started = Instant::now();
    let (_, _, status) = sh_with(&sandbox, "sleep 60", Some(2000)).await;
    let elapsed = started.elapsed();
    assert!(status.timed_out);
    assert_eq!(status.signal, Some(libc::SIGKILL));
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");

    let (_, _, status) = sh(&sandbox, "! grep -l '^Name:.*sleep' /proc/[0-9]*/status").await;
    assert_eq!(status.code, Some(0), "the timed-out sleep is still running");
    sandbox.destroy().await;
}

#[tokio::test]
async fn orphaned_children_leave_no_zombie() {
    let vm = require_vm!();
    let sandbox = vm.sandbox().await;
    let script = "for i in $(seq 100); do (sleep 0.2 &) ; done; sleep 2; \
                  grep -l '^State:.*Z' /proc/[0-9]*/status | wc -l";
    let (stdout, _, status) = sh(&sandbox, script).await;
    sandbox.destroy().await;
    assert_eq!(status.code, Some(0));
    assert_eq!(String::from_utf8(stdout).unwrap().trim(), "0");
}

#[tokio::test]
async fn missing_command_is_not_found() {
    let vm = require_vm!();
    let sandbox = vm.sandbox().await;
    let request = ExecRequest {
        argv: vec!["no-such-command".into()],
        ..ExecRequest::default()
    };
    let result = sandbox.exec(request).await.unwrap().collect().await;
    sandbox.destroy().await;
    match result {
        Err(Error::Guest {
            kind: ErrorKind::NotFound,
            message,
        }) => {
            assert!(message.contains("no-such-command"), "{message}")
        }
        other => panic!("expected not found, got {other:?}"),
    }
}

#[tokio::test]
async fn stdin_reaches_the_command() {
    let vm = require_vm!();
    let sandbox = vm.sandbox().await;
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "tr a-z A-Z".into()],
        stdin: true,
        ..ExecRequest::default()
    };
    let mut handle = sandbox.exec(request).await.unwrap();
    handle.write_stdin(b"hello ").await.unwrap();
    handle.write_stdin(b"sandbox\n").await.unwrap();
    handle.close_stdin().await.unwrap();
    let (stdout, _, status) = handle.collect().await.unwrap();
    sandbox.destroy().await;
    assert_eq!(status.code, Some(0));
    assert_eq!(stdout, b"HELLO SANDBOX\n");
}

#[tokio::test]
async fn files_round_trip_byte_for_byte() {
    let vm = require_vm!();
    let sandbox = vm.sandbox().await;
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let written = sandbox
        .agent()
        .write_file("/data/in.bin", 0o600, &data[..])
        .await
        .unwrap();
    assert_eq!(written, data.len() as u64);

    let (stdout, _, _) = sh(
        &sandbox,
        "stat -c %a /data/in.bin && sha256sum < /data/in.bin",
    )
    .await;
    let text = String::from_utf8(stdout).unwrap();
    assert!(text.starts_with("600\n"), "{text}");
    assert!(text.contains(&hex::encode(Sha256::digest(&data))), "{text}");

    let mut back = Vec::new();
    sandbox
        .agent()
        .read_file("/data/in.bin", &mut back)
        .await
        .unwrap();
    assert_eq!(back, data);

    let missing = sandbox
        .agent()
        .read_file("/data/missing", &mut Vec::new())
        .await;
    assert!(matches!(
        missing,
        Err(Error::Guest {
            kind: ErrorKind::NotFound,
            ..
        })
    ));
    sandbox.destroy().await;
}

#[tokio::test]
async fn removing_root_folder_is_rejected() {
    let vm = require_vm!();
    let sandbox = vm.sandbox().await;
    let (_, _, status) = sh(&sandbox, "mkdir -p /data/dir && ln -s / /data/dir/up").await;
    assert_eq!(status.code, Some(0));

    for path in ["/", "//", "/tmp/..", "/data/dir/up/."] {
        let rejected = sandbox.agent().remove(path).await;
        assert!(
            matches!(
                &rejected,
                Err(Error::Guest {
                    kind: ErrorKind::InvalidRequest,
                    ..
                })
            ),
            "{path}: {rejected:?}"
        );
    }
    // A link to the root is removed as a link, and the system is intact.
    sandbox.agent().remove("/data/dir/up").await.unwrap();
    let (stdout, _, status) = sh(&sandbox, "ls /etc/passwd /data/dir && echo intact").await;
    assert_eq!(status.code, Some(0));
    assert!(String::from_utf8(stdout).unwrap().ends_with("intact\n"));
    sandbox.destroy().await;
}

#[tokio::test]
async fn limits_are_applied() {
    let vm = require_vm!();
    let limits = Limits {
        vcpus: 2,
        memory_mib: 384,
        disk_mib: 256,
    };
    let sandbox = vm.sandbox_with(limits).await;
    let script = "nproc; awk '/MemTotal/ {print $2}' /proc/meminfo; \
                  head -c 400M /dev/zero > /big 2>/dev/null; echo $?";
    let (stdout, _, _) = sh(&sandbox, script).await;
    sandbox.destroy().await;

    let text = String::from_utf8(stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "2");
    let mem_kib: u64 = lines[1].parse().unwrap();
    assert!(
        mem_kib <= 384 * 1024 && mem_kib > 256 * 1024,
        "MemTotal {mem_kib} KiB"
    );
    assert_ne!(lines[2], "0", "writing 400 MiB to a 256 MiB disk succeeded");
}

#[tokio::test]
async fn out_of_range_limits_are_rejected() {
    let vm = require_vm!();
    let limits = Limits {
        memory_mib: 16,
        ..Limits::default()
    };
    let result = upstream_vmm::Sandbox::create(&vm.runtime, vm.spec(limits)).await;
    match result {
        Err(err @ Error::OutOfRange { .. }) => assert!(err.to_string().contains("16")),
        Err(other) => panic!("expected out of range, got {other}"),
        Ok(_) => panic!("a 16 MiB sandbox was created"),
    }
}

#[tokio::test]
async fn destroy_leaves_no_process_or_folder() {
    let vm = require_vm!();
    let sandbox = vm.sandbox().await;
    let run_dir = vm.run_dir(&sandbox);
    assert_eq!(processes_mentioning(&run_dir).len(), 1);
    sandbox.destroy().await;
    assert!(processes_mentioning(&run_dir).is_empty());
    assert!(!run_dir.exists());
}

#[tokio::test]
async fn dropping_a_sandbox_kills_its_vm() {
    let vm = require_vm!();
    let sandbox = vm.sandbox().await;
    let run_dir = vm.run_dir(&sandbox);
    drop(sandbox);
    // Drop sends SIGKILL without waiting; the VMM is gone moments later.
    for _ in 0..100 {
        if processes_mentioning(&run_dir).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(processes_mentioning(&run_dir).is_empty());
    assert!(!run_dir.exists());
}

#[tokio::test]
async fn guest_crash_fails_commands_instead_of_hanging() {
    let vm = require_vm!();
    let sandbox = vm.sandbox().await;
    let run_dir = vm.run_dir(&sandbox);
    let request = ExecRequest {
        argv: vec!["sleep".into(), "30".into()],
        ..ExecRequest::default()
    };
    let mut handle = sandbox.exec(request).await.unwrap();
    for pid in processes_mentioning(&run_dir) {
        // SAFETY: kill takes no pointers; the pid is this sandbox's VMM.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let event = tokio::time::timeout(Duration::from_secs(10), handle.next_event()).await;
    match event {
        Ok(Err(_)) => {}
        Ok(Ok(ExecEvent::Exit(status))) => panic!("command exited {status:?} after a VM crash"),
        Ok(Ok(other)) => panic!("unexpected event {other:?}"),
        Err(_) => panic!("the command hung after the VM crashed"),
    }
    sandbox.destroy().await;
}

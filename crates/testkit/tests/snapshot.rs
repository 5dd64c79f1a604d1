//! Snapshot start: restored sandboxes are unique, see the snapshot's disk,
//! and a broken or outdated snapshot never fails a start.
//!
//! Each test uses its own VM shape, so each has its own snapshot and the
//! tests can run in parallel without restoring each other's snapshots.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use upstream_protocol::ExecRequest;
use upstream_testkit::{processes_mentioning, require_vm, sh, TestVm};
use upstream_vmm::{AgentClient, Limits, Sandbox, SnapshotInputs, StartMode, VmSpec};

fn shape(memory_mib: u32, disk_mib: u32) -> Limits {
    Limits {
        vcpus: 1,
        memory_mib,
        disk_mib,
    }
}

fn snapshot_dir(vm: &TestVm, limits: Limits) -> PathBuf {
    let inputs = SnapshotInputs::of(&vm.runtime, &vm.spec(limits)).unwrap();
    vm.data.snapshots().join(inputs.key())
}

async fn stdout_of(sandbox: &Sandbox, script: &str) -> String {
    let (stdout, stderr, status) = sh(sandbox, script).await;
    assert_eq!(
        status.code,
        Some(0),
        "{script}: {}",
        String::from_utf8_lossy(&stderr)
    );
    String::from_utf8(stdout).unwrap().trim().to_string()
}

/// Destroys `sandbox` and checks that its VM and folder are gone.
async fn destroy_checked(vm: &TestVm, sandbox: Sandbox) {
    let run_dir = vm.run_dir(&sandbox);
    sandbox.destroy().await;
    assert!(processes_mentioning(&run_dir).is_empty(), "VM still runs");
    assert!(!run_dir.exists(), "{} is left behind", run_dir.display());
}

/// Temporary folders left next to the snapshot of `limits`. Other tests
/// save their own snapshots in parallel, so only this key's count.
fn leftover_temp_dirs(vm: &TestVm, limits: Limits) -> Vec<String> {
    let snapshot = snapshot_dir(vm, limits);
    let key = snapshot.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir(vm.data.snapshots())
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.contains(&key) && name != &key && !name.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn restored_clones_are_unique() {
    let vm = require_vm!();
    let limits = shape(256, 256);
    let first = vm.sandbox_with(limits).await;
    let second = vm.sandbox_with(limits).await;

    assert_eq!(first.start_mode(), StartMode::Snapshot);
    assert_eq!(second.start_mode(), StartMode::Snapshot);

    let script = "head -c 32 /dev/urandom | od -An -x | tr -d ' \\n'";
    let random = (
        stdout_of(&first, script).await,
        stdout_of(&second, script).await,
    );
    assert_eq!(random.0.len(), 64, "{random:?}");
    assert_ne!(random.0, random.1, "both clones read the same random bytes");

    let python = "command -v python3 >/dev/null || exit 0; \
                  python3 -c 'import os; print(os.urandom(16).hex())'";
    let python_random = (
        stdout_of(&first, python).await,
        stdout_of(&second, python).await,
    );
    if !python_random.0.is_empty() {
        assert_ne!(python_random.0, python_random.1, "os.urandom repeats");
    }

    let hostnames = (
        stdout_of(&first, "hostname").await,
        stdout_of(&second, "hostname").await,
    );
    assert_eq!(hostnames.0, first.id());
    assert_eq!(hostnames.1, second.id());

    // The guest reads its clock somewhere between the two host readings;
    // under TCG with parallel tests the command can take over a second.
    let host_now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    for sandbox in [&first, &second] {
        let before = host_now();
        let guest: f64 = stdout_of(sandbox, "date +%s.%N").await.parse().unwrap();
        let after = host_now();
        assert!(
            guest > before - 1.0 && guest < after + 1.0,
            "guest clock {guest}, host {before} to {after}"
        );
    }

    destroy_checked(&vm, first).await;
    destroy_checked(&vm, second).await;
    assert_eq!(leftover_temp_dirs(&vm, limits), Vec::<String>::new());
}

#[tokio::test]
async fn corrupt_state_falls_back_to_boot() {
    let vm = require_vm!();
    let limits = shape(256, 320);
    let first = vm.sandbox_with(limits).await;
    destroy_checked(&vm, first).await;
    let dir = snapshot_dir(&vm, limits);
    assert!(dir.join("snapshot.json").is_file());
    std::fs::write(dir.join("state"), b"not a migration stream").unwrap();

    let fallback = vm.sandbox_with(limits).await;

    assert_eq!(fallback.start_mode(), StartMode::ColdBoot);
    assert_eq!(stdout_of(&fallback, "echo ok").await, "ok");
    assert!(!dir.exists(), "the corrupt snapshot was kept");
    destroy_checked(&vm, fallback).await;

    let rebuilt = vm.sandbox_with(limits).await;
    assert_eq!(rebuilt.start_mode(), StartMode::Snapshot);
    destroy_checked(&vm, rebuilt).await;
}

#[tokio::test]
async fn unreadable_metadata_falls_back_to_boot() {
    let vm = require_vm!();
    let limits = shape(256, 352);
    let first = vm.sandbox_with(limits).await;
    destroy_checked(&vm, first).await;
    let dir = snapshot_dir(&vm, limits);
    std::fs::write(dir.join("snapshot.json"), b"{").unwrap();

    let fallback = vm.sandbox_with(limits).await;

    assert_eq!(fallback.start_mode(), StartMode::ColdBoot);
    assert!(!dir.exists(), "the unreadable snapshot was kept");
    destroy_checked(&vm, fallback).await;
}

#[tokio::test]
async fn shape_change_uses_its_own_snapshot() {
    let vm = require_vm!();
    let small = shape(256, 384);
    let large = shape(320, 384);
    let first = vm.sandbox_with(small).await;
    destroy_checked(&vm, first).await;

    let resized = vm.sandbox_with(large).await;

    assert_eq!(resized.start_mode(), StartMode::Snapshot);
    let total_kib: u64 = stdout_of(&resized, "awk '/MemTotal/ {print $2}' /proc/meminfo")
        .await
        .parse()
        .unwrap();
    assert!(
        total_kib > 280 * 1024,
        "guest has {total_kib} KiB, restored from the 256 MiB snapshot"
    );
    assert_ne!(snapshot_dir(&vm, small), snapshot_dir(&vm, large));
    assert!(snapshot_dir(&vm, small).is_dir());
    assert!(snapshot_dir(&vm, large).is_dir());
    destroy_checked(&vm, resized).await;
}

#[tokio::test]
async fn concurrent_first_starts_both_succeed() {
    let vm = require_vm!();
    let limits = shape(256, 416);

    let (one, two) = tokio::join!(vm.sandbox_with(limits), vm.sandbox_with(limits));

    let modes = [one.start_mode(), two.start_mode()];
    assert!(modes.contains(&StartMode::Snapshot), "{modes:?}");
    assert!(snapshot_dir(&vm, limits).join("snapshot.json").is_file());
    destroy_checked(&vm, one).await;
    destroy_checked(&vm, two).await;
    assert_eq!(leftover_temp_dirs(&vm, limits), Vec::<String>::new());
}

/// Starts a VM of the base image through the backend alone, so the test
/// controls what is on the scratch disk when the snapshot is saved.
fn vm_spec(vm: &TestVm, root: &Path, name: &str) -> VmSpec {
    let run_dir = root.join(name);
    std::fs::create_dir_all(&run_dir).unwrap();
    VmSpec {
        id: format!("sb-{name}"),
        run_dir: run_dir.clone(),
        kernel: vm.runtime.kernel.clone(),
        initramfs: vm.runtime.initramfs.clone(),
        root_disk: vm.base.rootfs.clone(),
        scratch_disk: run_dir.join("scratch.ext4"),
        vcpus: 1,
        memory_mib: 256,
        memory_file: Some(run_dir.join("memory")),
        kernel_args: Vec::new(),
        network: None,
        background: false,
    }
}

async fn run(agent: &AgentClient, script: &str) -> String {
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..ExecRequest::default()
    };
    let (stdout, stderr, status) = agent.exec(request).await.unwrap().collect().await.unwrap();
    assert_eq!(status.code, Some(0), "{}", String::from_utf8_lossy(&stderr));
    String::from_utf8(stdout).unwrap()
}

#[tokio::test]
async fn clones_see_snapshot_disk_but_not_each_other() {
    let vm = require_vm!();
    let backend = &vm.runtime.backend;
    let root = std::env::temp_dir().join(format!("upstream-disk-test-{}", std::process::id()));
    let snapshot = root.join("snapshot");

    let template = vm_spec(&vm, &root, "template");
    let blank = vm.data.disk_templates().join("scratch-256.ext4");
    if !blank.exists() {
        // Creating any 256 MiB sandbox formats the template disk.
        vm.sandbox_with(shape(256, 256)).await.destroy().await;
    }
    std::fs::copy(&blank, &template.scratch_disk).unwrap();
    let started = backend.start(&template).await.unwrap();
    let mut process = started.process;
    let agent = AgentClient::handshake(started.channel.connect().await.unwrap())
        .await
        .unwrap();
    run(
        &agent,
        "mkdir -p /data && echo from-snapshot > /data/file && sync",
    )
    .await;
    let hello = agent.hello().clone();
    backend
        .save_snapshot(process.as_mut(), &snapshot)
        .await
        .unwrap();
    drop(agent);
    process.destroy().await;

    let mut clones = Vec::new();
    for name in ["clone-a", "clone-b"] {
        let mut spec = vm_spec(&vm, &root, name);
        spec.memory_file = None;
        let restored = backend.restore(&spec, &snapshot).await.unwrap();
        let stream = restored.channel.connect().await.unwrap();
        let agent = AgentClient::resume(stream, hello.clone()).await.unwrap();
        clones.push((restored.process, agent));
    }

    for (_, agent) in &clones {
        assert_eq!(run(agent, "cat /data/file").await, "from-snapshot\n");
    }
    run(
        &clones[0].1,
        "echo changed > /data/file && echo new > /data/other && sync",
    )
    .await;
    assert_eq!(run(&clones[1].1, "cat /data/file").await, "from-snapshot\n");
    assert_eq!(run(&clones[1].1, "ls /data").await, "file\n");
    assert!(snapshot.join("memory").is_file(), "the memory file is gone");

    for (mut process, agent) in clones {
        drop(agent);
        process.destroy().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(processes_mentioning(&root).is_empty(), "a VM still runs");
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn snapshots_off_boots() {
    let vm = require_vm!();
    let runtime = upstream_vmm::Runtime::open(
        vm.data.clone(),
        upstream_vmm::RuntimeOptions {
            snapshots: Some(false),
            ..Default::default()
        },
    )
    .unwrap();

    let sandbox = Sandbox::create(&runtime, vm.spec(shape(256, 256)))
        .await
        .unwrap();

    assert_eq!(sandbox.start_mode(), StartMode::ColdBoot);
    destroy_checked(&vm, sandbox).await;
}

//! Tests that drive a real `firecracker` binary, given by
//! `UPSTREAM_FIRECRACKER`; without it they print why and pass.
//!
//! The guest is a tiny ELF "kernel" built here that halts forever. It needs
//! no guest kernel, so the API conversation, device configuration, snapshot
//! save and load, and teardown are tested on any host with `/dev/kvm`, PVM
//! included, where a Linux guest cannot boot under Firecracker. Booting a
//! real guest and running a command needs hardware KVM plus a kernel, agent
//! and image root; that test is `boots_and_runs_command`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use upstream_vmm::firecracker::{ApiClient, FirecrackerBackend, Jailer};
use upstream_vmm::net::{self, PortForward};
use upstream_vmm::{Backend, HostInfo, NetworkPolicy, RunningVm, VmSpec};

/// Returns the Firecracker binary under test, or `None` after printing why
/// the test is skipped.
fn firecracker(test: &str) -> Option<PathBuf> {
    let Some(path) = std::env::var_os("UPSTREAM_FIRECRACKER").filter(|v| !v.is_empty()) else {
        eprintln!("skipped {test}: set UPSTREAM_FIRECRACKER to a firecracker binary");
        return None;
    };
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped {test}: /dev/kvm is missing");
        return None;
    }
    Some(PathBuf::from(path))
}

/// Builds a 64-bit ELF executable whose only segment, loaded at 16 MiB, is
/// `hlt; jmp .-1`. Firecracker loads it like a `vmlinux`, and the vCPU
/// halts forever.
fn halting_kernel() -> Vec<u8> {
    const LOAD_ADDRESS: u64 = 0x100_0000;
    const HEADER_SIZE: u64 = 64;
    const PROGRAM_HEADER_SIZE: u64 = 56;
    let code: &[u8] = &[0xf4, 0xeb, 0xfd];
    let code_offset = HEADER_SIZE + PROGRAM_HEADER_SIZE;

    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF");
    // 64-bit, little-endian, ELF version 1, System V ABI, padding.
    elf.extend_from_slice(&[2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: executable
    elf.extend_from_slice(&62u16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&LOAD_ADDRESS.to_le_bytes()); // e_entry
    elf.extend_from_slice(&HEADER_SIZE.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(HEADER_SIZE as u16).to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&(PROGRAM_HEADER_SIZE as u16).to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    assert_eq!(elf.len() as u64, HEADER_SIZE);

    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: read, execute
    elf.extend_from_slice(&code_offset.to_le_bytes()); // p_offset
    elf.extend_from_slice(&LOAD_ADDRESS.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&LOAD_ADDRESS.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    assert_eq!(elf.len() as u64, code_offset);

    elf.extend_from_slice(code);
    elf
}

/// Files shared by the VMs of one test: kernel, initrd and image root.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), halting_kernel()).unwrap();
        std::fs::write(dir.path().join("initrd"), vec![0u8; 4096]).unwrap();
        std::fs::write(dir.path().join("root.ext4"), vec![0u8; 1 << 20]).unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        Self { dir }
    }

    /// Creates a sandbox's run folder and scratch disk and returns its spec.
    fn spec(&self, id: &str) -> VmSpec {
        let run_dir = self.dir.path().join("run").join(id);
        std::fs::create_dir(&run_dir).unwrap();
        let scratch = run_dir.join("scratch.ext4");
        std::fs::write(&scratch, vec![0u8; 1 << 20]).unwrap();
        VmSpec {
            id: id.to_string(),
            run_dir,
            kernel: self.dir.path().join("vmlinux"),
            initramfs: self.dir.path().join("initrd"),
            root_disk: self.dir.path().join("root.ext4"),
            scratch_disk: scratch,
            vcpus: 1,
            memory_mib: 128,
            memory_file: None,
            kernel_args: Vec::new(),
            network: None,
            background: false,
        }
    }
}

/// Lists the names in `dir`, sorted.
fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Finds a drive by id in the response to `GET /vm/config`: Firecracker
/// lists drives in no fixed order.
fn drive<'a>(config: &'a Value, id: &str) -> &'a Value {
    config["drives"]
        .as_array()
        .unwrap()
        .iter()
        .find(|drive| drive["drive_id"] == id)
        .unwrap_or_else(|| panic!("no drive {id} in {config}"))
}

fn process_gone(pid: u32, run_dir: &Path) -> bool {
    // A reused pid belongs to a process whose command line does not name
    // the run folder.
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Err(_) => true,
        Ok(cmdline) => {
            let needle = run_dir.as_os_str().as_encoded_bytes();
            !cmdline.windows(needle.len()).any(|window| window == needle)
        }
    }
}

async fn destroy_and_check(mut vm: RunningVm, spec: &VmSpec) {
    let pid = vm.process.pid().expect("a running VMM has a pid");
    vm.process.destroy().await;

    assert!(
        process_gone(pid, &spec.run_dir),
        "firecracker {pid} still runs"
    );
    assert_eq!(list(&spec.run_dir), ["scratch.ext4"], "files left behind");
}

#[tokio::test]
async fn configures_starts_and_tears_down() {
    let Some(binary) = firecracker("configures_starts_and_tears_down") else {
        return;
    };
    let fixture = Fixture::new();
    let spec = fixture.spec("sb-fctest000001");
    let backend = FirecrackerBackend::new(binary).without_jailer();

    let vm = backend.start(&spec).await.unwrap();

    let api = ApiClient::new(spec.run_dir.join("fc.sock"));
    let info: Value = api.get("/").await.unwrap();
    assert_eq!(info["id"], "sb-fctest000001");
    assert_eq!(info["state"], "Running");
    let config: Value = api.get("/vm/config").await.unwrap();
    assert_eq!(config["drives"].as_array().unwrap().len(), 2);
    let rootfs = drive(&config, "rootfs");
    assert_eq!(rootfs["is_read_only"], true);
    assert_eq!(rootfs["is_root_device"], false);
    assert_eq!(drive(&config, "scratch")["is_read_only"], false);
    assert_eq!(config["vsock"]["guest_cid"], 3);
    assert_eq!(config["vsock"]["uds_path"], "v.sock");
    assert_eq!(config["machine-config"]["vcpu_count"], 1);
    assert_eq!(config["machine-config"]["mem_size_mib"], 128);
    let boot_args = config["boot-source"]["boot_args"].as_str().unwrap();
    assert!(boot_args.contains("upstream.channel=vsock"), "{boot_args}");
    assert!(config["entropy"].is_object(), "{config}");
    // The host listens for the agent before the guest starts, and
    // Firecracker listens for host-initiated connections.
    assert!(spec.run_dir.join("v.sock_1024").exists());
    assert!(spec.run_dir.join("v.sock").exists());

    destroy_and_check(vm, &spec).await;
}

#[tokio::test]
async fn bad_kernel_fails_with_firecracker_message() {
    let Some(binary) = firecracker("bad_kernel_fails_with_firecracker_message") else {
        return;
    };
    let fixture = Fixture::new();
    let mut spec = fixture.spec("sb-fctest000002");
    spec.kernel = fixture.dir.path().join("initrd");
    let backend = FirecrackerBackend::new(binary).without_jailer();

    let err = backend
        .start(&spec)
        .await
        .err()
        .expect("a non-ELF kernel fails");

    let message = err.to_string();
    assert!(
        message.contains("Sandbox sb-fctest000002 failed to boot"),
        "{message}"
    );
    assert!(
        message.contains("Firecracker rejected PUT /actions"),
        "{message}"
    );
    assert_eq!(list(&spec.run_dir), ["scratch.ext4"], "files left behind");
}

#[tokio::test]
async fn snapshot_saves_and_restores() {
    let Some(binary) = firecracker("snapshot_saves_and_restores") else {
        return;
    };
    let fixture = Fixture::new();
    let spec = fixture.spec("sb-fctest000003");
    let backend = FirecrackerBackend::new(binary).without_jailer();
    let snapshot = fixture.dir.path().join("snapshot");
    let mut vm = backend.start(&spec).await.unwrap();
    std::fs::write(&spec.scratch_disk, b"written by the guest").unwrap();

    backend
        .save_snapshot(vm.process.as_mut(), &snapshot)
        .await
        .unwrap();

    assert_eq!(
        list(&snapshot),
        ["memory", "scratch.ext4", "snapshot.json", "vmstate"]
    );
    let memory = std::fs::metadata(snapshot.join("memory")).unwrap();
    assert_eq!(memory.len(), 128 << 20);
    let api = ApiClient::new(spec.run_dir.join("fc.sock"));
    let info: Value = api.get("/").await.unwrap();
    assert_eq!(info["state"], "Paused");
    destroy_and_check(vm, &spec).await;

    let restored_spec = fixture.spec("sb-fctest000004");
    let restored = backend.restore(&restored_spec, &snapshot).await.unwrap();

    let api = ApiClient::new(restored_spec.run_dir.join("fc.sock"));
    let info: Value = api.get("/").await.unwrap();
    assert_eq!(info["state"], "Running");
    let config: Value = api.get("/vm/config").await.unwrap();
    let scratch = drive(&config, "scratch");
    assert_eq!(scratch["path_on_host"], "scratch-disk");
    assert_eq!(
        std::fs::read(&restored_spec.scratch_disk).unwrap(),
        b"written by the guest"
    );
    assert!(restored_spec.run_dir.join("v.sock_1024").exists());
    destroy_and_check(restored, &restored_spec).await;
}

#[tokio::test]
async fn restore_rejects_other_image_root() {
    let Some(binary) = firecracker("restore_rejects_other_image_root") else {
        return;
    };
    let fixture = Fixture::new();
    let spec = fixture.spec("sb-fctest000005");
    let backend = FirecrackerBackend::new(binary).without_jailer();
    let snapshot = fixture.dir.path().join("snapshot");
    let mut vm = backend.start(&spec).await.unwrap();
    backend
        .save_snapshot(vm.process.as_mut(), &snapshot)
        .await
        .unwrap();
    destroy_and_check(vm, &spec).await;

    let mut other = fixture.spec("sb-fctest000006");
    other.root_disk = fixture.dir.path().join("initrd");
    let err = backend.restore(&other, &snapshot).await.err().unwrap();

    assert!(
        err.to_string().contains("was taken with image root"),
        "{err}"
    );
    assert_eq!(list(&other.run_dir), ["scratch.ext4"], "files left behind");
}

/// Returns the Firecracker binary for a test that needs networking, or
/// `None` after printing why the test is skipped.
fn firecracker_with_network(test: &str) -> Option<PathBuf> {
    let binary = firecracker(test)?;
    if let Some(reason) = net::tap::unavailable_reason() {
        eprintln!("skipped {test}: {reason}");
        return None;
    }
    Some(binary)
}

/// Drops the host side of a sandbox's network and checks that its
/// namespace is gone.
fn drop_and_check_network(prepared: net::Prepared, spec: &VmSpec) {
    let netns = net::netns::path_of(&spec.id);
    drop(prepared);
    assert!(!netns.exists(), "{} is left behind", netns.display());
}

/// Prepares the host side of a network with egress and one published
/// port for sandbox `spec.id`, as `Sandbox` does, and adds it to `spec`.
fn prepare_network(backend: &FirecrackerBackend, spec: &mut VmSpec) -> net::Prepared {
    let publish = [PortForward {
        guest: 8000,
        host: None,
    }];
    let mut policy = NetworkPolicy::internet();
    policy.limits.bandwidth = Some(1 << 20);
    let relay = Path::new("/nonexistent/upstream-agent");
    let prepared =
        net::prepare(&spec.id, &spec.run_dir, &policy, &publish, backend, relay).unwrap();
    spec.network = prepared.vm.clone();
    spec.kernel_args = prepared.kernel_args.clone();
    prepared
}

/// Returns a backend that runs `binary` under its jailer and the jailer's
/// settings, or `None` after printing why the test is skipped.
fn jailed_backend(test: &str, binary: &Path) -> Option<(FirecrackerBackend, Jailer)> {
    let backend = FirecrackerBackend::new(binary.to_path_buf());
    let Ok(Some(jailer)) = backend.jailer().map(|jailer| jailer.cloned()) else {
        eprintln!("skipped {test}: the jailer needs root and a jailer binary beside firecracker");
        return None;
    };
    if has_interpreter(binary) {
        // The chroot contains the binary alone, without a dynamic loader.
        eprintln!("skipped {test}: the jailer runs only statically linked Firecracker builds");
        return None;
    }
    Some((backend, jailer))
}

/// Makes the shared files readable by the jailed user, who reads them
/// through hard links in its chroot that keep these owners and modes.
fn readable_by_jail(spec: &VmSpec) {
    use std::os::unix::fs::PermissionsExt;
    for file in [&spec.kernel, &spec.initramfs, &spec.root_disk] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// Checks that VMM `pid` runs as the jailer's user and group, inside
/// `chroot`, in a mount namespace of its own.
fn check_jailed(pid: u32, chroot: &Path, jailer: &Jailer) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = |field: &str| -> Vec<u32> {
        let line = status.lines().find(|line| line.starts_with(field)).unwrap();
        line[field.len()..]
            .split_whitespace()
            .map(|id| id.parse().unwrap())
            .collect()
    };
    assert_eq!(ids("Uid:"), [jailer.uid; 4], "{status}");
    assert_eq!(ids("Gid:"), [jailer.gid; 4], "{status}");
    // The jailer pivots into the chroot, so the VMM's root directory is the
    // chroot's inode, while the link text reads "/" in its namespace.
    use std::os::unix::fs::MetadataExt;
    let inode = |path: &Path| {
        let meta = std::fs::metadata(path).unwrap();
        (meta.dev(), meta.ino())
    };
    assert_eq!(
        inode(Path::new(&format!("/proc/{pid}/root"))),
        inode(chroot)
    );
    let mount_ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_ne!(mount_ns(&pid.to_string()), mount_ns("self"));
}

/// Returns whether the ELF executable at `path` names a dynamic loader
/// (has a `PT_INTERP` program header).
fn has_interpreter(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let elf = std::fs::read(path).unwrap();
    let read_u16 = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap());
    let read_u64 = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap());
    let table = read_u64(0x20) as usize;
    let entry_size = usize::from(read_u16(0x36));
    let entries = usize::from(read_u16(0x38));
    (0..entries).any(|i| {
        let at = table + i * entry_size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == PT_INTERP
    })
}

/// Returns the network namespace of process `pid`, as `net:[inode]`.
fn netns_of_process(pid: u32) -> String {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    link.to_string_lossy().into_owned()
}

/// Returns the namespace named `path`, as `net:[inode]`.
fn netns_of_path(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    format!("net:[{}]", std::fs::metadata(path).unwrap().ino())
}

/// Checks what a VM with network was given: the interface on the tap, the
/// rate limiter, and the VMM in the sandbox's namespace.
async fn check_network(api: &ApiClient, pid: u32, spec: &VmSpec) {
    let config: Value = api.get("/vm/config").await.unwrap();
    let interfaces = config["network-interfaces"].as_array().unwrap();
    assert_eq!(interfaces.len(), 1, "{config}");
    assert_eq!(interfaces[0]["iface_id"], "eth0");
    assert_eq!(interfaces[0]["host_dev_name"], "tap0");
    assert_eq!(interfaces[0]["guest_mac"], "06:00:0a:00:02:0f");
    // 1 MiB/s plus 1/16 for frame headers.
    let rx_size = &interfaces[0]["rx_rate_limiter"]["bandwidth"]["size"];
    assert_eq!(rx_size, 1_114_112, "{config}");
    let boot_args = config["boot-source"]["boot_args"].as_str().unwrap();
    assert!(
        boot_args.contains("upstream.net=10.0.2.15/24"),
        "{boot_args}"
    );
    let netns = net::netns::path_of(&spec.id);
    assert_eq!(netns_of_process(pid), netns_of_path(&netns));
}

#[tokio::test]
async fn network_interface_uses_sandbox_tap() {
    let test = "network_interface_uses_sandbox_tap";
    let Some(binary) = firecracker_with_network(test) else {
        return;
    };
    let fixture = Fixture::new();
    let mut spec = fixture.spec("sb-fctest000008");
    let backend = FirecrackerBackend::new(binary).without_jailer();
    let prepared = prepare_network(&backend, &mut spec);

    let vm = backend.start(&spec).await.unwrap();

    let api = ApiClient::new(spec.run_dir.join("fc.sock"));
    let info: Value = api.get("/").await.unwrap();
    assert_eq!(info["state"], "Running");
    check_network(&api, vm.process.pid().unwrap(), &spec).await;
    destroy_and_check(vm, &spec).await;
    drop_and_check_network(prepared, &spec);
}

#[tokio::test]
async fn failed_start_removes_namespace() {
    let test = "failed_start_removes_namespace";
    let Some(binary) = firecracker_with_network(test) else {
        return;
    };
    let fixture = Fixture::new();
    let mut spec = fixture.spec("sb-fctest000010");
    spec.kernel = fixture.dir.path().join("initrd");
    let backend = FirecrackerBackend::new(binary).without_jailer();
    let prepared = prepare_network(&backend, &mut spec);
    assert!(net::netns::path_of(&spec.id).exists());

    let err = backend
        .start(&spec)
        .await
        .err()
        .expect("a non-ELF kernel fails");

    assert!(err.to_string().contains("PUT /actions"), "{err}");
    assert_eq!(list(&spec.run_dir), ["scratch.ext4"], "files left behind");
    drop_and_check_network(prepared, &spec);
}

/// Lists the namespaces in `/run/netns` that sandboxes with generated ids
/// (`sb-` and 12 hex digits) own, leaving out the fixed ids of these tests.
fn sandbox_namespaces() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(net::netns::NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| {
            name.strip_prefix("upstream-sb-")
                .is_some_and(|id| id.len() == 12 && id.bytes().all(|byte| byte.is_ascii_hexdigit()))
        })
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn sandbox_boot_timeout_removes_network() {
    let test = "sandbox_boot_timeout_removes_network";
    let Some(binary) = firecracker_with_network(test) else {
        return;
    };
    let fixture = Fixture::new();
    let data = fixture.dir.path().join("data");
    let runtime = upstream_vmm::Runtime {
        data: upstream_vmm::DataDir::new(&data),
        host: HostInfo::detect(),
        backend: std::sync::Arc::new(FirecrackerBackend::new(binary).without_jailer()),
        kernel: fixture.dir.path().join("vmlinux"),
        initramfs: fixture.dir.path().join("initrd"),
        snapshots: false,
    };
    let spec = upstream_vmm::SandboxSpec {
        root_disk: fixture.dir.path().join("root.ext4"),
        boot_timeout: Some(Duration::from_secs(1)),
        network: NetworkPolicy::internet(),
        publish: vec![PortForward {
            guest: 8000,
            host: None,
        }],
        ..Default::default()
    };
    let before = sandbox_namespaces();

    // The halting guest never starts an agent.
    let err = upstream_vmm::Sandbox::boot(&runtime, spec)
        .await
        .err()
        .expect("the boot times out");

    assert!(err.to_string().contains("did not start within"), "{err}");
    assert_eq!(sandbox_namespaces(), before, "a namespace is left behind");
    assert_eq!(list(&data.join("run")), Vec::<String>::new());
}

#[tokio::test]
async fn jailed_vmm_joins_sandbox_namespace() {
    let test = "jailed_vmm_joins_sandbox_namespace";
    let Some(binary) = firecracker_with_network(test) else {
        return;
    };
    let Some((backend, jailer)) = jailed_backend(test, &binary) else {
        return;
    };
    let owner = (jailer.uid, jailer.gid);
    let fixture = Fixture::new();
    let mut spec = fixture.spec("sb-fctest000009");
    readable_by_jail(&spec);
    assert_eq!(
        backend.network_attachment().unwrap(),
        net::Attachment::Tap { owner: Some(owner) }
    );
    let prepared = prepare_network(&backend, &mut spec);

    let vm = backend.start(&spec).await.unwrap();

    let pid = vm.process.pid().unwrap();
    let chroot = Jailer::chroot(&binary, &spec.run_dir, &spec.id);
    check_jailed(pid, &chroot, &jailer);
    let api = ApiClient::new(chroot.join("fc.sock"));
    check_network(&api, pid, &spec).await;
    let mut process = vm.process;
    process.destroy().await;
    assert_eq!(list(&spec.run_dir), ["scratch.ext4"], "files left behind");
    drop_and_check_network(prepared, &spec);
}

#[tokio::test]
async fn jailed_snapshot_saves_and_restores() {
    let test = "jailed_snapshot_saves_and_restores";
    let Some(binary) = firecracker(test) else {
        return;
    };
    let Some((backend, jailer)) = jailed_backend(test, &binary) else {
        return;
    };
    let fixture = Fixture::new();
    let spec = fixture.spec("sb-fctest000010");
    readable_by_jail(&spec);
    let snapshot = fixture.dir.path().join("snapshot");
    let mut vm = backend.start(&spec).await.unwrap();
    std::fs::write(&spec.scratch_disk, b"written in the jail").unwrap();

    backend
        .save_snapshot(vm.process.as_mut(), &snapshot)
        .await
        .unwrap();
    vm.process.destroy().await;
    assert_eq!(list(&spec.run_dir), ["scratch.ext4"], "files left behind");

    let restored_spec = fixture.spec("sb-fctest000011");
    let mut restored = backend.restore(&restored_spec, &snapshot).await.unwrap();

    let pid = restored.process.pid().unwrap();
    let chroot = Jailer::chroot(&binary, &restored_spec.run_dir, &restored_spec.id);
    check_jailed(pid, &chroot, &jailer);
    let api = ApiClient::new(chroot.join("fc.sock"));
    let info: Value = api.get("/").await.unwrap();
    assert_eq!(info["state"], "Running");
    // The restored VM writes to its own copy of the snapshot's scratch disk.
    assert_eq!(
        std::fs::read(chroot.join("scratch-disk")).unwrap(),
        b"written in the jail"
    );
    assert!(chroot.join("v.sock_1024").exists());
    restored.process.destroy().await;
    assert_eq!(
        list(&restored_spec.run_dir),
        ["scratch.ext4"],
        "files left behind"
    );
}

/// Boots the real guest kernel and agent and runs a command. Needs
/// hardware KVM and `UPSTREAM_KERNEL`, `UPSTREAM_AGENT` and
/// `UPSTREAM_TEST_ROOTFS` (an image root file system, ext4).
#[tokio::test]
async fn boots_and_runs_command() {
    let Some(binary) = firecracker("boots_and_runs_command") else {
        return;
    };
    if !HostInfo::detect().is_kvm() {
        eprintln!("skipped boots_and_runs_command: the guest kernel needs hardware KVM");
        return;
    }
    let paths: Vec<Option<PathBuf>> = ["UPSTREAM_KERNEL", "UPSTREAM_AGENT", "UPSTREAM_TEST_ROOTFS"]
        .iter()
        .map(|name| std::env::var_os(name).map(PathBuf::from))
        .collect();
    let [Some(kernel), Some(agent), Some(rootfs)] = &paths[..] else {
        eprintln!(
            "skipped boots_and_runs_command: set UPSTREAM_KERNEL, UPSTREAM_AGENT and \
             UPSTREAM_TEST_ROOTFS"
        );
        return;
    };
    let fixture = Fixture::new();
    let mut spec = fixture.spec("sb-fctest000007");
    spec.kernel = kernel.clone();
    spec.initramfs = upstream_vmm::initramfs::ensure(fixture.dir.path(), agent).unwrap();
    spec.root_disk = rootfs.clone();
    std::fs::remove_file(&spec.scratch_disk).unwrap();
    let status = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&spec.scratch_disk)
        .arg("64M")
        .status()
        .unwrap();
    assert!(status.success());
    let backend = FirecrackerBackend::new(binary).without_jailer();

    let vm = backend.start(&spec).await.unwrap();
    let channel = tokio::time::timeout(Duration::from_secs(30), vm.channel.connect())
        .await
        .expect("the agent connects within 30 s")
        .unwrap();
    let agent = upstream_vmm::AgentClient::handshake(channel).await.unwrap();
    let exec = agent
        .exec(upstream_vmm::ExecRequest {
            argv: vec!["echo".into(), "hi".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (stdout, _stderr, status) = exec.collect().await.unwrap();

    assert_eq!(stdout, b"hi\n");
    assert_eq!(status.code, Some(0));
    let mut process = vm.process;
    process.destroy().await;
}

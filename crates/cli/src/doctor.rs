//! `upstream doctor`: what this host offers and what to do about gaps.

use std::path::Path;
use std::process::Command;

use upstream_vmm::firecracker::FirecrackerBackend;
use upstream_vmm::qemu::QemuBackend;
use upstream_vmm::{Accel, DataDir, HostInfo, SetupState};

use crate::exit::Exit;
use crate::images;

pub async fn run(data: &DataDir) -> anyhow::Result<u8> {
    let host = HostInfo::detect();
    let mut ready = true;

    println!("Host");
    println!("  CPUs: {}", host.cpus);
    let kvm = match (host.kvm_present, host.pvm) {
        (false, _) => "missing".to_string(),
        (true, true) => "present, provided by PVM software virtualisation (kvm_pvm)".to_string(),
        (true, false) => "present".to_string(),
    };
    println!("  /dev/kvm: {kvm}");
    match &host.accel {
        Accel::Kvm => println!("  Acceleration: KVM"),
        Accel::Tcg { reason } => {
            println!("  Acceleration: TCG software emulation, slower than KVM ({reason})")
        }
    }

    println!("Backends");
    match QemuBackend::find_binary() {
        Some(path) => println!("  qemu: usable, {} ({})", path.display(), version(&path)),
        None => {
            ready = false;
            println!("  qemu: not found; install it with `apt-get install qemu-system-x86`");
        }
    }
    match FirecrackerBackend::find_binary() {
        Some(path) if host.is_kvm() => {
            println!(
                "  firecracker: usable, {} ({})",
                path.display(),
                version(&path)
            )
        }
        Some(path) => println!(
            "  firecracker: found {} ({}), not usable: it needs hardware KVM",
            path.display(),
            version(&path)
        ),
        None => println!(
            "  firecracker: not found; put it on PATH or set UPSTREAM_FIRECRACKER (optional)"
        ),
    }

    let state = SetupState::load(data);
    println!("Guest");
    ready &= report_file("kernel", state.kernel.as_deref(), "run `upstream setup`");
    ready &= report_file("agent", state.agent.as_deref(), "run `upstream setup`");
    if let Some(agent) = &state.agent {
        println!("  agent version: {}", version(agent));
    }
    match images::open_store(data)
        .ok()
        .and_then(|store| store.get(images::DEFAULT_IMAGE).ok()?)
    {
        Some(image) => println!("  base image: {} ({})", image.reference, image.digest),
        None => {
            ready = false;
            println!("  base image: missing; run `upstream setup`");
        }
    }
    println!("Data directory: {}", data.root().display());
    if ready {
        println!("Ready.");
        Ok(0)
    } else {
        println!("Not ready: fix the items above.");
        Ok(Exit::NotReady.code())
    }
}

fn report_file(name: &str, path: Option<&Path>, fix: &str) -> bool {
    match path {
        Some(path) if path.is_file() => {
            println!("  {name}: {}", path.display());
            true
        }
        Some(path) => {
            println!("  {name}: missing at {}; {fix}", path.display());
            false
        }
        None => {
            println!("  {name}: not set up; {fix}");
            false
        }
    }
}

/// The first line of `BINARY --version`.
fn version(binary: &Path) -> String {
    Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "version unknown".into())
}

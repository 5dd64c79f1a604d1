//! `upstream-bench`: start times, round trips and density of sandboxes,
//! each beside a reference measured in the same run.
//!
//! Usage: `UPSTREAM_HOME=DIR cargo run --release -p upstream-bench -- [RUNS]`
//! with a data directory prepared by `upstream setup`. RUNS (default 10)
//! is the number of samples per figure. `upstream exec` is timed when the
//! `upstream` binary sits next to this one (build it with
//! `cargo build --release -p upstream-cli`). The backend is the one
//! `upstream` would pick, or `UPSTREAM_BACKEND`; run it once per backend
//! for a column each.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use upstream_image::ImageStore;
use upstream_protocol::ExecRequest;
use upstream_vmm::qemu::QemuBackend;
use upstream_vmm::{
    BackendKind, DataDir, Limits, Pool, PoolConfig, RunningVm, Runtime, RuntimeOptions, Sandbox,
    SandboxSpec, StartMode, VmSpec,
};

/// The VM shape of every measured sandbox.
const LIMITS: Limits = Limits {
    vcpus: 1,
    memory_mib: 256,
    disk_mib: 256,
};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let runs: usize = match std::env::args().nth(1) {
        Some(text) => text.parse().context("RUNS must be a whole number")?,
        None => 10,
    };
    if runs < 2 {
        bail!("RUNS must be at least 2 for a median and p99");
    }
    let data = DataDir::from_env();
    let runtime = Arc::new(Runtime::open(data.clone(), RuntimeOptions::default())?);
    let spec = base_spec(&data)?;
    let kind = runtime.backend.kind();
    println!("Backend: {}\n", kind.name());
    println!("| figure | median ms | p99 ms | runs |");
    println!("|---|---|---|---|");

    let (label, raw) = match kind {
        BackendKind::Qemu => (
            "raw QEMU to agent hello (reference)",
            measure(runs, || raw_qemu_boot(&runtime, &spec)).await?,
        ),
        BackendKind::Firecracker => (
            "raw Firecracker to agent hello (reference)",
            measure(runs, || raw_backend_boot(&runtime, &spec)).await?,
        ),
    };
    report(label, &raw);
    let cold = measure(runs, || start_and_run(&runtime, &spec, false)).await?;
    report("cold boot to first command done", &cold);
    // Saves the snapshot if there is none, outside the measured runs.
    Sandbox::create(&runtime, spec.clone())
        .await?
        .destroy()
        .await;
    let restore_ready = measure(runs, || restore_only(&runtime, &spec)).await?;
    report(
        "snapshot restore to agent ready (refreshed)",
        &restore_ready,
    );
    let restore = measure(runs, || start_and_run(&runtime, &spec, true)).await?;
    report("snapshot restore to first command done", &restore);

    let pool = Pool::new(
        Arc::clone(&runtime),
        PoolConfig {
            size: 1,
            idle_timeout: Duration::from_secs(600),
            max_pools: 1,
        },
    );
    let pooled = measure(runs, || pool_start(&pool, &spec)).await?;
    report("warm pool: acquire to first command done", &pooled);
    pool.shutdown().await;

    let sandbox = Sandbox::create(&runtime, spec.clone()).await?;
    for _ in 0..3 {
        run_true(&sandbox).await?;
    }
    let in_guest = measure(runs, || async { run_true(&sandbox).await }).await?;
    report("`true` in a running sandbox", &in_guest);
    let on_host = measure(runs, || async { host_true() }).await?;
    report("`sh -c true` on the host (reference)", &on_host);
    let ping = measure(runs.max(100), || async {
        Ok(sandbox.agent().ping().await?)
    })
    .await?;
    report("agent ping round trip", &ping);
    sandbox.destroy().await;

    if let Some(upstream) = sibling_binary("upstream") {
        let exec = measure(runs, || async { cli_exec(&upstream, &data) }).await?;
        report("`upstream exec -- true` wall time", &exec);
    } else {
        println!(
            "| `upstream exec -- true` | not measured: no upstream binary beside this one | | |"
        );
    }

    density(&runtime, &spec).await?;
    Ok(())
}

fn base_spec(data: &DataDir) -> anyhow::Result<SandboxSpec> {
    let images = ImageStore::open(&data.images())?;
    let base = images
        .get("base")?
        .context("no base image; run `upstream setup` first")?;
    Ok(SandboxSpec {
        root_disk: base.rootfs,
        env: vec![("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into())],
        limits: LIMITS,
        ..SandboxSpec::default()
    })
}

/// Runs `sample` `runs` times and returns the durations, sorted.
async fn measure<F, Fut>(runs: usize, mut sample: F) -> anyhow::Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Duration>>,
{
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        times.push(sample().await?);
    }
    times.sort();
    Ok(times)
}

fn report(figure: &str, sorted: &[Duration]) {
    let median = sorted[sorted.len() / 2];
    // Nearest-rank p99: with fewer than 100 runs it is the maximum.
    let rank = ((sorted.len() as f64) * 0.99).ceil() as usize;
    let p99 = sorted[rank.clamp(1, sorted.len()) - 1];
    println!(
        "| {figure} | {:.2} | {:.2} | {} |",
        ms(median),
        ms(p99),
        sorted.len()
    );
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The reference: QEMU started by hand with the same kernel, initramfs,
/// root and scratch disk, timed until the agent's hello arrives (the
/// guest's init is running). It bypasses upstream's own start code.
async fn raw_qemu_boot(runtime: &Runtime, spec: &SandboxSpec) -> anyhow::Result<Duration> {
    let (run_dir, scratch) = raw_run_dir(runtime)?;
    let socket = run_dir.join("agent.sock");
    let listener = UnixListener::bind(&socket)?;
    let qemu = QemuBackend::find_binary().context("qemu-system-x86_64 not found")?;
    let mut append = "console=ttyS0 reboot=t panic=-1 quiet loglevel=1 no_timer_check \
                      noapictimer random.trust_cpu=on rdinit=/upstream-agent \
                      upstream.root=root upstream.scratch=scratch upstream.hostname=raw"
        .to_string();
    if let Some(khz) = runtime.host.tsc_khz {
        append.push_str(&format!(" tsc_early_khz={khz}"));
    }

    let (accel, cpu) = if runtime.host.is_kvm() {
        ("kvm", "host")
    } else {
        ("tcg", "max")
    };

    let started = Instant::now();
    let mut child = tokio::process::Command::new(qemu)
        .args([
            "-M",
            "microvm,acpi=off,rtc=on",
            "-accel",
            accel,
            "-cpu",
            cpu,
        ])
        .args(["-m", "256", "-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-nographic", "-no-reboot", "-serial", "null"])
        .arg("-kernel")
        .arg(&runtime.kernel)
        .arg("-initrd")
        .arg(&runtime.initramfs)
        .args(["-append", &append])
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none,readonly=on",
            spec.root_disk.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root,serial=root"])
        .arg("-drive")
        .arg(format!(
            "id=scratch,file={},format=raw,if=none",
            scratch.display()
        ))
        .args(["-device", "virtio-blk-device,drive=scratch,serial=scratch"])
        .args(["-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!("socket,id=agent,path={}", socket.display()))
        .args([
            "-device",
            "virtserialport,chardev=agent,name=upstream.agent",
        ])
        .args(["-object", "rng-random,id=rng,filename=/dev/urandom"])
        .args(["-device", "virtio-rng-device,rng=rng"])
        .kill_on_drop(true)
        .spawn()?;
    let (mut stream, _) = listener.accept().await?;
    let mut first_byte = [0u8; 1];
    stream.read_exact(&mut first_byte).await?;
    let elapsed = started.elapsed();

    child.kill().await?;
    std::fs::remove_dir_all(&run_dir)?;
    Ok(elapsed)
}

/// Creates the run folder of a reference VM, with a blank 256 MiB scratch
/// disk, and returns both paths.
fn raw_run_dir(runtime: &Runtime) -> anyhow::Result<(PathBuf, PathBuf)> {
    let run_dir = runtime
        .data
        .run()
        .join(format!("bench-raw-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    let scratch = run_dir.join("scratch.ext4");
    let blank = runtime.data.disk_templates().join("scratch-256.ext4");
    std::fs::copy(&blank, &scratch).context("copying the 256 MiB scratch template")?;
    Ok((run_dir, scratch))
}

/// Boots the guest through the backend alone, without upstream's sandbox
/// layer (no network set-up, no handshake), and times it until the first
/// byte of the agent's hello. For Firecracker this is the raw VMM: the
/// backend only sends the API requests that configure and start it.
async fn raw_backend_boot(runtime: &Runtime, spec: &SandboxSpec) -> anyhow::Result<Duration> {
    let (run_dir, scratch) = raw_run_dir(runtime)?;
    let vm_spec = VmSpec {
        id: run_dir.file_name().unwrap().to_string_lossy().into_owned(),
        run_dir: run_dir.clone(),
        kernel: runtime.kernel.clone(),
        initramfs: runtime.initramfs.clone(),
        root_disk: spec.root_disk.clone(),
        scratch_disk: scratch,
        vcpus: LIMITS.vcpus,
        memory_mib: LIMITS.memory_mib,
        memory_file: None,
        kernel_args: Vec::new(),
        network: None,
        background: false,
    };

    let started = Instant::now();
    let RunningVm {
        mut process,
        channel,
    } = runtime.backend.start(&vm_spec).await?;
    let hello = async {
        let mut stream = channel.connect().await?;
        let mut first_byte = [0u8; 1];
        stream.read_exact(&mut first_byte).await?;
        anyhow::Ok(())
    };
    let waited = tokio::time::timeout(Duration::from_secs(120), hello).await;
    let elapsed = started.elapsed();

    process.destroy().await;
    std::fs::remove_dir_all(&run_dir)?;
    waited.context("the guest agent did not connect within 120 s")??;
    Ok(elapsed)
}

async fn start_and_run(
    runtime: &Runtime,
    spec: &SandboxSpec,
    snapshot: bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let sandbox = if snapshot {
        Sandbox::create(runtime, spec.clone()).await?
    } else {
        Sandbox::boot(runtime, spec.clone()).await?
    };
    run_true(&sandbox).await?;
    let elapsed = started.elapsed();
    let expected = if snapshot {
        StartMode::Snapshot
    } else {
        StartMode::ColdBoot
    };
    let mode = sandbox.start_mode();
    sandbox.destroy().await;
    if mode != expected {
        bail!("expected a {expected:?} start, got {mode:?}");
    }
    Ok(elapsed)
}

async fn restore_only(runtime: &Runtime, spec: &SandboxSpec) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let sandbox = Sandbox::create(runtime, spec.clone()).await?;
    let elapsed = started.elapsed();
    let mode = sandbox.start_mode();
    sandbox.destroy().await;
    if mode != StartMode::Snapshot {
        bail!("expected a snapshot start, got {mode:?}");
    }
    Ok(elapsed)
}

/// Acquires from a pool that is full, so every sample takes a ready one.
async fn pool_start(pool: &Pool, spec: &SandboxSpec) -> anyhow::Result<Duration> {
    if pool.ready() == 0 {
        // The first acquire starts the pool.
        pool.acquire(spec.clone()).await?.destroy().await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while pool.ready() == 0 {
        if Instant::now() > deadline {
            bail!("the pool did not refill within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let sandbox = pool.acquire(spec.clone()).await?;
    run_true(&sandbox).await?;
    let elapsed = started.elapsed();
    sandbox.destroy().await;
    Ok(elapsed)
}

async fn run_true(sandbox: &Sandbox) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let request = ExecRequest {
        argv: vec!["true".into()],
        ..ExecRequest::default()
    };
    let (_, _, status) = sandbox.exec(request).await?.collect().await?;
    if status.code != Some(0) {
        bail!("`true` failed in the guest: {status:?}");
    }
    Ok(started.elapsed())
}

fn host_true() -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = Command::new("sh").args(["-c", "true"]).status()?;
    if !status.success() {
        bail!("`sh -c true` failed on the host");
    }
    Ok(started.elapsed())
}

fn sibling_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::current_exe().ok()?.with_file_name(name);
    path.is_file().then_some(path)
}

fn cli_exec(upstream: &PathBuf, data: &DataDir) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = Command::new(upstream)
        .args(["exec", "--memory", "256", "--disk", "256", "--", "true"])
        .env("UPSTREAM_HOME", data.root())
        .status()?;
    if !status.success() {
        bail!("`upstream exec -- true` failed: {status}");
    }
    Ok(started.elapsed())
}

/// Sandboxes restored per second with two at a time, and the memory an
/// idle restored sandbox costs (proportional set size of its VMM).
async fn density(runtime: &Arc<Runtime>, spec: &SandboxSpec) -> anyhow::Result<()> {
    const COUNT: usize = 8;
    let started = Instant::now();
    let mut sandboxes = Vec::new();
    for _ in 0..COUNT / 2 {
        let (one, two) = tokio::join!(
            Sandbox::create(runtime, spec.clone()),
            Sandbox::create(runtime, spec.clone())
        );
        sandboxes.push(one?);
        sandboxes.push(two?);
    }
    let rate = COUNT as f64 / started.elapsed().as_secs_f64();
    println!("| sandboxes created per second, 2 at a time ({COUNT} restores) | {rate:.2} /s | | |");

    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut pss_kib = Vec::new();
    for sandbox in &sandboxes {
        let run_dir = runtime.data.run().join(sandbox.id());
        let pid: u32 = std::fs::read_to_string(run_dir.join("vmm.pid"))?
            .trim()
            .parse()?;
        pss_kib.push(rollup_field(pid, "Pss:")?);
    }
    let mean = pss_kib.iter().sum::<u64>() as f64 / pss_kib.len() as f64;
    println!(
        "| idle restored sandbox, PSS of its VMM | {:.1} MiB | | {} |",
        mean / 1024.0,
        pss_kib.len()
    );
    println!(
        "| idle sandboxes per GiB of host memory | {:.1} | | |",
        1024.0 * 1024.0 / mean
    );
    for sandbox in sandboxes {
        sandbox.destroy().await;
    }
    Ok(())
}

fn rollup_field(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let line = text
        .lines()
        .find(|line| line.starts_with(field))
        .with_context(|| format!("{field} missing in /proc/{pid}/smaps_rollup"))?;
    let kib = line.split_whitespace().nth(1).context("malformed line")?;
    Ok(kib.parse()?)
}

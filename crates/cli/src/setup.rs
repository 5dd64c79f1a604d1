//! `upstream setup`: the guest kernel, the guest agent and the base image,
//! each prepared once and cached under the data directory.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context};
use clap::Args;
use sha2::{Digest, Sha256};
use upstream_image::ImageConfig;
use upstream_protocol::ExecRequest;
use upstream_vmm::{DataDir, Runtime, RuntimeOptions, Sandbox, SandboxSpec, SetupState};

use crate::exit::{Exit, Failure};
use crate::images::{self, DEFAULT_IMAGE};
use crate::terminal::{format_duration, StatusLine};
use crate::vm_failure;

const KERNEL_CONFIG: &str = include_str!("../../../guest/kernel.config");
const KERNEL_SCRIPT: &str = include_str!("../../../scripts/build-guest-kernel.sh");
const BASE_IMAGE_SCRIPT: &str = include_str!("../../../scripts/build-base-image.sh");
const KERNEL_SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";

#[derive(Args)]
pub struct SetupArgs {
    /// Use this guest kernel (uncompressed vmlinux) instead of building one.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Use this guest agent binary instead of the one installed beside
    /// `upstream`.
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Do not build the default base image.
    #[arg(long)]
    skip_base_image: bool,
    /// Do not boot a sandbox to check the result.
    #[arg(long)]
    skip_check: bool,
}

pub async fn run(data: &DataDir, args: SetupArgs) -> anyhow::Result<u8> {
    fs::create_dir_all(data.root())
        .with_context(|| format!("creating the data directory {}", data.root().display()))?;
    let mut state = SetupState::load(data);
    state.kernel = Some(kernel(data, args.kernel.as_deref())?);
    state.agent = Some(agent(data, args.agent.as_deref())?);
    state.save(data).context("saving setup.json")?;
    if !args.skip_base_image {
        let key = hex::encode(Sha256::digest(BASE_IMAGE_SCRIPT));
        base_image(data, state.base_image_key.as_deref() == Some(key.as_str()))?;
        state.base_image = Some(DEFAULT_IMAGE.to_string());
        state.base_image_key = Some(key);
        state.save(data).context("saving setup.json")?;
    }
    if !args.skip_check && !args.skip_base_image {
        check(data).await?;
    }
    eprintln!("Ready: data directory {}", data.root().display());
    Ok(0)
}

/// The guest kernel: a given file, or a build cached by the hash of its
/// inputs (options, build script and kernel source).
fn kernel(data: &DataDir, given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        let line = StatusLine::new("Guest kernel");
        check_elf(path)?;
        line.finish(&format!("using {}", path.display()));
        return Ok(fs::canonicalize(path)?);
    }
    let source = Path::new(KERNEL_SOURCE);
    let source_meta = fs::metadata(source).map_err(|_| {
        Failure::new(
            Exit::NotReady,
            format!(
                "Kernel source {KERNEL_SOURCE} not found; install it with \
                 `apt-get install linux-source-6.1 bc bison flex libelf-dev libssl-dev`, \
                 or pass --kernel PATH"
            ),
        )
    })?;
    let mut hasher = Sha256::new();
    hasher.update(KERNEL_CONFIG);
    hasher.update(KERNEL_SCRIPT);
    hasher.update(format!("{KERNEL_SOURCE} {}", source_meta.len()));
    let key = hex::encode(hasher.finalize());
    let folder = data.kernels().join(&key[..16]);
    let vmlinux = folder.join("vmlinux");
    let line = StatusLine::new("Guest kernel");
    if vmlinux.is_file() {
        line.finish(&format!("cached ({})", &key[..12]));
        return Ok(vmlinux);
    }

    eprintln!(
        "Building the guest kernel from {KERNEL_SOURCE}; this takes about 10 minutes on 2 cores"
    );
    let work = tempfile::tempdir_in(data.root()).context("creating a build folder")?;
    let config = work.path().join("kernel.config");
    let script = work.path().join("build-guest-kernel.sh");
    fs::write(&config, KERNEL_CONFIG)?;
    fs::write(&script, KERNEL_SCRIPT)?;
    fs::create_dir_all(&folder)?;
    let log = folder.join("build.log");
    run_script(&line, &script, &[config.as_path(), folder.as_path()], &log)?;
    line.finish(&format!(
        "built in {} ({})",
        format_duration(line.elapsed()),
        &key[..12]
    ));
    Ok(vmlinux)
}

/// Runs a build script with its output in `log`, updating `line` with the
/// elapsed time; on failure the error shows the end of the log.
fn run_script(line: &StatusLine, script: &Path, args: &[&Path], log: &Path) -> anyhow::Result<()> {
    let log_file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = std::process::Command::new("bash")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("starting bash")?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        line.update(&format!("running for {}", format_duration(line.elapsed())));
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    if !status.success() {
        line.finish("failed");
        let text = fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{} failed ({status}); end of {}:\n{}",
            script.display(),
            log.display(),
            tail.join("\n")
        );
    }
    Ok(())
}

/// Checks the ELF magic, because QEMU and Firecracker load `vmlinux` (an
/// ELF file), not a bzImage.
fn check_elf(path: &Path) -> anyhow::Result<()> {
    let mut magic = [0u8; 4];
    let opened = fs::File::open(path).and_then(|mut file| file.read_exact(&mut magic));
    if opened.is_err() {
        return Err(Failure::new(
            Exit::NotReady,
            format!("Kernel {} not found or unreadable", path.display()),
        )
        .into());
    }
    if &magic != b"\x7fELF" {
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "Kernel {} is not an ELF vmlinux; pass the uncompressed vmlinux, not a bzImage",
                path.display()
            ),
        )
        .into());
    }
    Ok(())
}

/// The guest agent: copied into the data directory under its hash, so an
/// upgrade of the installed binary never changes a running setup.
fn agent(data: &DataDir, given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let line = StatusLine::new("Guest agent");
    let source = match given {
        Some(path) => path.to_path_buf(),
        None => find_agent()?,
    };
    let binary = fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
    if binary.get(..4) != Some(b"\x7fELF") {
        bail!("{} is not an executable ELF file", source.display());
    }
    if has_interpreter(&binary) {
        return Err(Failure::new(
            Exit::NotReady,
            format!(
                "{} is dynamically linked; build it statically: RUSTFLAGS='-C \
                 target-feature=+crt-static' cargo build --release -p upstream-agent \
                 --target x86_64-unknown-linux-gnu",
                source.display()
            ),
        )
        .into());
    }
    let hash = hex::encode(Sha256::digest(&binary));
    let folder = data.agents().join(&hash[..16]);
    let target = folder.join("upstream-agent");
    if !target.is_file() {
        fs::create_dir_all(&folder)?;
        let temp = folder.join(".upstream-agent.tmp");
        fs::write(&temp, &binary)?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&temp, fs::Permissions::from_mode(0o755))?;
        fs::rename(&temp, &target)?;
    }
    line.finish(&format!("{} ({})", source.display(), &hash[..12]));
    Ok(target)
}

fn find_agent() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("UPSTREAM_AGENT") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("finding the upstream binary")?;
    let sibling = exe.with_file_name("upstream-agent");
    if sibling.is_file() {
        return Ok(sibling);
    }
    Err(Failure::new(
        Exit::NotReady,
        format!(
            "Guest agent not found at {}; install it with ./install.sh or pass --agent PATH",
            sibling.display()
        ),
    )
    .into())
}

/// Whether an ELF64 file has a PT_INTERP program header (dynamic linking).
fn has_interpreter(elf: &[u8]) -> bool {
    let read_u64 = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    let read_u16 = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes(b.try_into().unwrap()))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (read_u64(0x20), read_u16(0x36), read_u16(0x38))
    else {
        return false;
    };
    (0..phnum as usize).any(|i| {
        let at = phoff as usize + i * phentsize as usize;
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            == Some(3)
    })
}

/// The default base image, built with debootstrap from Debian's packages.
/// A cached one is kept unless `script_unchanged` is false, because the
/// build script changed since it was built.
fn base_image(data: &DataDir, script_unchanged: bool) -> anyhow::Result<()> {
    let store = images::open_store(data)?;
    let line = StatusLine::new(format!("Base image '{DEFAULT_IMAGE}'"));
    if let Some(image) = store.get(DEFAULT_IMAGE)?.filter(|_| script_unchanged) {
        line.finish(&format!("cached ({})", short_digest(&image.digest)));
        return Ok(());
    }
    // SAFETY: geteuid takes no arguments.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Failure::new(
            Exit::NotReady,
            "Building the base image needs root (debootstrap); rerun `upstream setup` as root, \
             or import an image with `upstream image import` and use --image",
        )
        .into());
    }
    let work = tempfile::tempdir_in(data.root()).context("creating a build folder")?;
    let script = work.path().join("build-base-image.sh");
    fs::write(&script, BASE_IMAGE_SCRIPT)?;
    let out = work.path().join("out");
    let log = work.path().join("build.log");
    run_script(&line, &script, &[out.as_path()], &log)
        .context("building the base image; is debootstrap installed?")?;
    line.update("building the root file system");
    let config = ImageConfig {
        env: vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            "LANG=C.UTF-8".into(),
        ],
        ..ImageConfig::default()
    };
    let image = store.import_rootfs_dir(DEFAULT_IMAGE, &out.join("rootfs"), config)?;
    line.finish(&format!(
        "built in {} ({})",
        format_duration(line.elapsed()),
        short_digest(&image.digest)
    ));
    Ok(())
}

fn short_digest(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

/// Boots one sandbox and runs `uname -r` in it.
async fn check(data: &DataDir) -> anyhow::Result<()> {
    let line = StatusLine::new("Booting a test sandbox");
    let runtime = Runtime::open(data.clone(), RuntimeOptions::default()).map_err(vm_failure)?;
    let image = images::resolve(data, DEFAULT_IMAGE).await?;
    let spec = SandboxSpec {
        root_disk: image.rootfs,
        ..SandboxSpec::default()
    };
    let sandbox = Sandbox::create(&runtime, spec).await.map_err(vm_failure)?;
    let request = ExecRequest {
        argv: vec!["uname".into(), "-r".into()],
        ..ExecRequest::default()
    };
    let result = async { sandbox.exec(request).await?.collect().await }.await;
    sandbox.destroy().await;
    let (stdout, _, status) = result.map_err(vm_failure)?;
    if status.shell_code() != 0 {
        bail!(
            "`uname -r` in the test sandbox exited with {}",
            status.shell_code()
        );
    }
    let release = String::from_utf8_lossy(&stdout).trim().to_string();
    line.finish(&format!(
        "done ({}, {}, guest kernel {release})",
        format_duration(line.elapsed()),
        runtime.backend.kind().name()
    ));
    Ok(())
}

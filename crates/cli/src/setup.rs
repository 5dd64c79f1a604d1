//! `upstream setup`: the guest kernel, the guest agent and the base image,
//! each prepared once and cached under the data directory.

use std::fs;
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
    state.kernel = Some(kernel(
        data,
        args.kernel.as_deref(),
        state.kernel.as_deref(),
    )?);
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
    note!("Ready: data directory {}", data.root().display());
    Ok(0)
}

/// Returns the guest kernel. A given file is copied into the data directory,
/// so it stays usable when the original moves. Without one, the copy given to
/// an earlier setup serves. Else the kernel is built, cached by the hash of
/// its inputs (options, build script and kernel source).
fn kernel(
    data: &DataDir,
    given: Option<&Path>,
    previous: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        let line = StatusLine::new("Guest kernel");
        check_elf(path)?;
        let copy = copy_given_kernel(data, path)?;
        line.finish(&format!(
            "using {} (copied to {})",
            path.display(),
            copy.display()
        ));
        return Ok(copy);
    }
    let earlier = previous.filter(|path| is_given_copy(data, path) && path.is_file());
    if let Some(path) = earlier {
        StatusLine::new("Guest kernel").finish(&format!(
            "using {}, given to an earlier setup; pass --kernel to change it",
            path.display()
        ));
        return Ok(path.to_path_buf());
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

    note!("Building the guest kernel from {KERNEL_SOURCE}; this takes about 10 minutes on 2 cores");
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
/// Prefix of the folders under `<data>/kernels` that hold kernels given with
/// `--kernel`, rather than built.
const GIVEN_KERNEL_PREFIX: &str = "given-";

/// Copies a given kernel to `<data>/kernels/given-<hash>/vmlinux`, once per content.
fn copy_given_kernel(data: &DataDir, path: &Path) -> anyhow::Result<PathBuf> {
    let mut file =
        fs::File::open(path).with_context(|| format!("opening the kernel {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)
        .with_context(|| format!("reading the kernel {}", path.display()))?;
    let hash = hex::encode(hasher.finalize());
    let folder = data
        .kernels()
        .join(format!("{GIVEN_KERNEL_PREFIX}{}", &hash[..16]));
    let vmlinux = folder.join("vmlinux");
    if vmlinux.is_file() {
        return Ok(vmlinux);
    }
    fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
    let partial = folder.join("vmlinux.partial");
    fs::copy(path, &partial)
        .and_then(|_| fs::rename(&partial, &vmlinux))
        .with_context(|| {
            format!(
                "copying the kernel {} to {}",
                path.display(),
                vmlinux.display()
            )
        })?;
    Ok(vmlinux)
}

/// Returns whether `path` is a kernel that [`copy_given_kernel`] placed.
fn is_given_copy(data: &DataDir, path: &Path) -> bool {
    path.parent().is_some_and(|folder| {
        folder.parent() == Some(data.kernels().as_path())
            && folder
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with(GIVEN_KERNEL_PREFIX))
    })
}

fn check_elf(path: &Path) -> anyhow::Result<()> {
    upstream_vmm::check_kernel(path).map_err(|err| {
        // A file given on the command line that is not a vmlinux is a bad value.
        let exit = match err {
            upstream_vmm::Error::KernelInvalid(_) => Exit::Usage,
            _ => Exit::NotReady,
        };
        Failure::new(exit, err.to_string()).into()
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_kernel_is_copied_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path().join("data"));
        let original = dir.path().join("vmlinux");
        fs::write(&original, b"\x7fELF and the rest of a kernel").unwrap();

        let copy = kernel(&data, Some(&original), None).unwrap();
        assert!(copy.starts_with(data.kernels()), "{}", copy.display());
        assert_eq!(fs::read(&copy).unwrap(), fs::read(&original).unwrap());

        // A later setup without --kernel keeps the copy, even with the original gone.
        fs::remove_file(&original).unwrap();
        assert_eq!(kernel(&data, None, Some(&copy)).unwrap(), copy);
    }

    #[test]
    fn given_kernel_must_be_elf() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path().join("data"));
        let bzimage = dir.path().join("bzImage");
        fs::write(&bzimage, b"MZ compressed").unwrap();

        let err = kernel(&data, Some(&bzimage), None).unwrap_err();
        let failure = err.downcast_ref::<Failure>().unwrap();
        assert_eq!(failure.exit, Exit::Usage);
        assert!(
            failure.message.contains("not an ELF vmlinux"),
            "{}",
            failure.message
        );
    }
}

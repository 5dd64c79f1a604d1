//! Support for tests that boot real sandboxes.
//!
//! Such tests need a data directory prepared by `upstream setup` (guest
//! kernel, agent and base image), named by `UPSTREAM_TEST_HOME`;
//! `scripts/test.sh` prepares one. Without it the tests skip with a printed
//! reason, except under `CI=true`, where a missing setup is a failure.

use std::path::{Path, PathBuf};

use upstream_image::{ImageStore, LocalImage};
use upstream_protocol::{ExecRequest, ExitStatus};
use upstream_vmm::{DataDir, Limits, Runtime, RuntimeOptions, Sandbox, SandboxSpec};

/// The prepared data directory, or `None` (after printing why) when tests
/// that boot VMs must be skipped.
pub fn test_home() -> Option<PathBuf> {
    let home = std::env::var_os("UPSTREAM_TEST_HOME").map(PathBuf::from);
    let reason = match &home {
        None => "UPSTREAM_TEST_HOME is not set; run scripts/test.sh".to_string(),
        Some(path) if !path.join("setup.json").is_file() => {
            format!(
                "{} has no setup.json; run `upstream setup` there",
                path.display()
            )
        }
        Some(_) => return home,
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("tests that boot VMs cannot run: {reason}");
    }
    eprintln!("skipped: {reason}");
    None
}

/// Returns early from a test when no prepared data directory exists.
#[macro_export]
macro_rules! require_vm {
    () => {
        match $crate::TestVm::open() {
            Some(vm) => vm,
            None => return,
        }
    };
}

/// A runtime over the prepared data directory and its base image.
pub struct TestVm {
    pub data: DataDir,
    pub runtime: Runtime,
    pub base: LocalImage,
}

impl TestVm {
    pub fn open() -> Option<Self> {
        let home = test_home()?;
        let data = DataDir::new(home);
        let runtime = Runtime::open(data.clone(), RuntimeOptions::default())
            .expect("opening the runtime of the prepared data directory");
        let images = ImageStore::open(&data.images()).expect("opening the image store");
        let base = images
            .get("base")
            .expect("reading the image index")
            .expect("base image");
        Some(Self {
            data,
            runtime,
            base,
        })
    }

    pub fn spec(&self, limits: Limits) -> SandboxSpec {
        SandboxSpec {
            root_disk: self.base.rootfs.clone(),
            env: vec![(
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            )],
            limits,
            ..SandboxSpec::default()
        }
    }

    pub async fn sandbox(&self) -> Sandbox {
        self.sandbox_with(Limits::default()).await
    }

    pub async fn sandbox_with(&self, limits: Limits) -> Sandbox {
        Sandbox::create(&self.runtime, self.spec(limits))
            .await
            .expect("creating a sandbox")
    }

    /// The folder where a sandbox keeps its sockets and disk.
    pub fn run_dir(&self, sandbox: &Sandbox) -> PathBuf {
        self.data.run().join(sandbox.id())
    }
}

/// Runs `sh -c SCRIPT` and collects its output.
pub async fn sh(sandbox: &Sandbox, script: &str) -> (Vec<u8>, Vec<u8>, ExitStatus) {
    sh_with(sandbox, script, None).await
}

/// Runs `sh -c SCRIPT` with a timeout in milliseconds.
pub async fn sh_with(
    sandbox: &Sandbox,
    script: &str,
    timeout_ms: Option<u64>,
) -> (Vec<u8>, Vec<u8>, ExitStatus) {
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        timeout_ms,
        ..ExecRequest::default()
    };
    let handle = sandbox.exec(request).await.expect("starting a command");
    handle
        .collect()
        .await
        .expect("collecting a command's output")
}

/// Returns the nice value of every thread of process `pid`, from field 19 of
/// `/proc/PID/task/TID/stat`.
pub fn thread_nice_values(pid: u32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            // The command name in parentheses may contain spaces, so count
            // fields from the last parenthesis: field 3 comes right after it.
            let after_name = &stat[stat.rfind(')')? + 1..];
            after_name.split_whitespace().nth(19 - 3)?.parse().ok()
        })
        .collect()
}

/// Pids of processes whose command line mentions `dir`: the VMMs of the
/// sandboxes whose run folder it is.
pub fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.windows(needle.len()).any(|window| window == needle)
        })
        .collect()
}

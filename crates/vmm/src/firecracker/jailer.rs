//! Running Firecracker under its jailer.
//!
//! The jailer (shipped with each Firecracker release) builds a chroot for
//! one VMM, moves it into a fresh mount namespace and optionally a network
//! namespace and a cgroup, drops to an unprivileged user and group, and
//! then executes Firecracker in place, so the VMM keeps the jailer's pid.
//! It needs root, so upstream uses it only when it runs as root.
//!
//! Host setup, as root:
//!
//! - Install `jailer` next to `firecracker`, or set `UPSTREAM_JAILER` to its
//!   path. Use the jailer and Firecracker of the same release.
//! - Pick an unprivileged user and group id for the VMMs and set
//!   `UPSTREAM_JAILER_UID` and `UPSTREAM_JAILER_GID` (default 65534, the
//!   usual `nobody`/`nogroup`). The kernel, the initramfs and the image root
//!   file systems must be readable by it, because they are hard-linked into
//!   each chroot with their own owner and mode.
//! - Keep the data directory on one file system: files are hard-linked into
//!   the chroot, which lives in the sandbox's run folder, and copied where a
//!   hard link is impossible.
//! - Optional: `UPSTREAM_JAILER_NETNS=/var/run/netns/NAME` joins every VMM
//!   of a sandbox without network to that network namespace. A sandbox
//!   with network runs in a namespace of its own.
//! - Optional: `UPSTREAM_JAILER_CGROUP=NAME` gives each VMM its own cgroup v2
//!   `NAME/<sandbox id>`, with `cpu.max` set to its vCPU count plus one core.
//!   `NAME` must exist with the `cpu` controller enabled in its
//!   `cgroup.subtree_control`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Once;

use tokio::process::Command;

use super::config::names;

/// Default user and group of jailed VMMs: `nobody` and `nogroup` on most
/// distributions.
const DEFAULT_ID: u32 = 65534;

/// The cgroup period for `cpu.max`, in microseconds (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// The settings for starting jailed VMMs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jailer {
    pub binary: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub netns: Option<PathBuf>,
    /// Parent of the per-sandbox cgroups, relative to the cgroup v2 root.
    pub parent_cgroup: Option<String>,
}

impl Jailer {
    /// Reads the jailer settings from the environment when upstream runs as
    /// root. Returns `Ok(None)` when the VMM runs unjailed, and an error
    /// message when a setting is invalid.
    pub fn from_env(firecracker: &Path) -> Result<Option<Self>, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            say_once("running Firecracker without its jailer, which needs root");
            return Ok(None);
        }
        let binary = match std::env::var_os("UPSTREAM_JAILER").filter(|v| !v.is_empty()) {
            Some(path) => PathBuf::from(path),
            None => firecracker.with_file_name("jailer"),
        };
        if !binary.is_file() {
            say_once(&format!(
                "running Firecracker without its jailer: {} not found; install it there or set \
                 UPSTREAM_JAILER",
                binary.display()
            ));
            return Ok(None);
        }
        Ok(Some(Self {
            binary,
            uid: id_from_env("UPSTREAM_JAILER_UID")?,
            gid: id_from_env("UPSTREAM_JAILER_GID")?,
            netns: std::env::var_os("UPSTREAM_JAILER_NETNS")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            parent_cgroup: std::env::var("UPSTREAM_JAILER_CGROUP")
                .ok()
                .filter(|v| !v.is_empty()),
        }))
    }

    /// Returns the folder the jailer builds its chroots in. It is inside the
    /// run folder, so removing the sandbox removes the jail.
    pub fn chroot_base(run_dir: &Path) -> PathBuf {
        run_dir.join("jail")
    }

    /// Returns the chroot of sandbox `id`, where the jailer creates it.
    pub fn chroot(firecracker: &Path, run_dir: &Path, id: &str) -> PathBuf {
        let exec_name = firecracker
            .file_name()
            .map_or_else(|| OsString::from("firecracker"), OsString::from);
        Self::chroot_base(run_dir)
            .join(exec_name)
            .join(id)
            .join("root")
    }

    /// Builds the jailer command that starts Firecracker for sandbox `id`,
    /// in the network namespace `netns` if given, else in the configured
    /// one.
    pub fn command(
        &self,
        firecracker: &Path,
        run_dir: &Path,
        id: &str,
        vcpus: u32,
        netns: Option<&Path>,
    ) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg("--id")
            .arg(id)
            .arg("--exec-file")
            .arg(firecracker)
            .arg("--uid")
            .arg(self.uid.to_string())
            .arg("--gid")
            .arg(self.gid.to_string())
            .arg("--chroot-base-dir")
            .arg(Self::chroot_base(run_dir));
        if let Some(netns) = netns.or(self.netns.as_deref()) {
            command.arg("--netns").arg(netns);
        }
        if let Some(parent) = &self.parent_cgroup {
            // NOTE: the extra core for Firecracker's API, device and I/O
            // threads is an estimate, not a measurement.
            let quota = (u64::from(vcpus) + 1) * CPU_PERIOD_US;
            command
                .args(["--cgroup-version", "2", "--parent-cgroup", parent])
                .arg("--cgroup")
                .arg(format!("cpu.max={quota} {CPU_PERIOD_US}"));
        }
        // Paths after `--` go to Firecracker, inside the chroot.
        command
            .arg("--")
            .arg("--api-sock")
            .arg(Path::new("/").join(names::API_SOCKET));
        command
    }

    /// Removes the cgroup the jailer created for sandbox `id`. The kernel
    /// refuses while a process is still in it, so call it after the VMM
    /// has been reaped.
    pub fn remove_cgroup(&self, id: &str) {
        let Some(parent) = &self.parent_cgroup else {
            return;
        };
        let Some(root) = cgroup2_root() else {
            return;
        };
        let dir = root.join(parent).join(id);
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(cgroup = %dir.display(), error = %err, "removing a cgroup failed")
            }
        }
    }
}

fn id_from_env(name: &str) -> Result<u32, String> {
    parse_id(name, std::env::var(name).ok().as_deref())
}

fn parse_id(name: &str, value: Option<&str>) -> Result<u32, String> {
    match value {
        Some(value) if !value.is_empty() => match value.parse::<u32>() {
            Ok(0) | Err(_) => Err(format!(
                "{name}={value} is invalid; set it to a numeric id other than 0 (root)"
            )),
            Ok(id) => Ok(id),
        },
        _ => Ok(DEFAULT_ID),
    }
}

/// Finds where the cgroup v2 hierarchy is mounted, from `/proc/mounts`.
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let _device = fields.next()?;
        let mount_point = fields.next()?;
        (fields.next()? == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// Logs why the jailer is not used, once per process.
fn say_once(message: &str) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| tracing::info!("{message}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jailer() -> Jailer {
        Jailer {
            binary: "/usr/bin/jailer".into(),
            uid: 1234,
            gid: 5678,
            netns: Some("/var/run/netns/upstream".into()),
            parent_cgroup: Some("upstream".into()),
        }
    }

    /// Returns the arguments of the jailer command for sandbox `sb-1` with
    /// two vCPUs.
    fn command_args(netns: Option<&Path>) -> Vec<String> {
        let command = jailer().command(
            Path::new("/usr/bin/firecracker"),
            Path::new("/data/run/sb-1"),
            "sb-1",
            2,
            netns,
        );
        command
            .as_std()
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn chroot_is_under_run_dir() {
        let chroot = Jailer::chroot(
            Path::new("/usr/bin/firecracker"),
            Path::new("/data/run/sb-1"),
            "sb-1",
        );

        assert_eq!(
            chroot,
            Path::new("/data/run/sb-1/jail/firecracker/sb-1/root")
        );
    }

    #[test]
    fn command_passes_ids_and_options() {
        let args = command_args(None);

        assert_eq!(
            args,
            [
                "--id",
                "sb-1",
                "--exec-file",
                "/usr/bin/firecracker",
                "--uid",
                "1234",
                "--gid",
                "5678",
                "--chroot-base-dir",
                "/data/run/sb-1/jail",
                "--netns",
                "/var/run/netns/upstream",
                "--cgroup-version",
                "2",
                "--parent-cgroup",
                "upstream",
                "--cgroup",
                "cpu.max=300000 100000",
                "--",
                "--api-sock",
                "/fc.sock",
            ]
        );
    }

    #[test]
    fn ids_are_parsed() {
        assert_eq!(parse_id("UPSTREAM_JAILER_UID", None), Ok(DEFAULT_ID));
        assert_eq!(parse_id("UPSTREAM_JAILER_UID", Some("")), Ok(DEFAULT_ID));
        assert_eq!(parse_id("UPSTREAM_JAILER_UID", Some("1234")), Ok(1234));
    }

    #[test]
    fn root_and_names_are_rejected() {
        for value in ["0", "nobody", "-1"] {
            let err = parse_id("UPSTREAM_JAILER_UID", Some(value)).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "UPSTREAM_JAILER_UID={value} is invalid; set it to a numeric id other \
                     than 0 (root)"
                )
            );
        }
    }

    #[test]
    fn sandbox_namespace_replaces_configured_one() {
        let args = command_args(Some(Path::new("/run/netns/upstream-sb-1")));
        let netns: Vec<&String> = args
            .iter()
            .skip_while(|arg| *arg != "--netns")
            .take(2)
            .collect();

        assert_eq!(netns, ["--netns", "/run/netns/upstream-sb-1"]);
        assert_eq!(args.iter().filter(|arg| *arg == "--netns").count(), 1);
    }
}

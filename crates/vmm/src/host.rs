//! What this host offers for running microVMs.

use std::fs::OpenOptions;
use std::path::Path;

/// How guest code runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation, with the reason KVM is not used.
    Tcg { reason: String },
}

/// Facts about the host, read once up front so a missing or unusable KVM is
/// reported instead of found by a hanging boot.
#[derive(Clone, Debug)]
pub struct HostInfo {
    pub accel: Accel,
    /// Whether `/dev/kvm` is provided by the PVM software module.
    pub pvm: bool,
    pub kvm_present: bool,
    /// TSC frequency in kHz, passed to the guest so it skips calibration
    /// (which under TCG sometimes fails and hangs the boot).
    pub tsc_khz: Option<u64>,
    pub cpus: usize,
}

impl HostInfo {
    pub fn detect() -> Self {
        let kvm_present = Path::new("/dev/kvm").exists();
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        let accel = if std::env::var("UPSTREAM_ACCEL").as_deref() == Ok("tcg") {
            Accel::Tcg {
                reason: "UPSTREAM_ACCEL=tcg is set".into(),
            }
        } else if !kvm_present {
            Accel::Tcg {
                reason: "/dev/kvm is missing".into(),
            }
        } else if pvm {
            Accel::Tcg {
                reason: "/dev/kvm is PVM software virtualisation, which cannot boot the \
                         guest kernel"
                    .into(),
            }
        } else if let Err(err) = OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            Accel::Tcg {
                reason: format!("/dev/kvm cannot be opened ({err})"),
            }
        } else {
            Accel::Kvm
        };
        Self {
            accel,
            pvm,
            kvm_present,
            tsc_khz: read_tsc_khz(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    pub fn is_kvm(&self) -> bool {
        self.accel == Accel::Kvm
    }
}

fn read_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|line| line.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

/// Whether a process with this pid exists.
pub fn process_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

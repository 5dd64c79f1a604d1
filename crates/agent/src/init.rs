//! Early boot as PID 1: kernel file systems, the sandbox's root and the
//! settings the host passed on the kernel command line.

use std::ffi::CString;
use std::fs;
use std::io;

/// Where the host channel is.
pub enum ChannelSpec {
    /// The virtio-serial port named [`upstream_protocol::SERIAL_PORT_NAME`].
    VirtioPort,
    /// An AF_VSOCK connection to the host (CID 2) on this port.
    Vsock(u32),
    /// A Unix socket path to connect to; only outside a VM (tests).
    UnixSocket(String),
}

impl ChannelSpec {
    /// Returns whether the agent opens the connection, and so can open it
    /// again after it breaks. A virtio-serial port is opened once and stays.
    pub fn dials(&self) -> bool {
        matches!(self, Self::Vsock(_) | Self::UnixSocket(_))
    }
}

/// Settings read from `upstream.*` parameters of the kernel command line.
pub struct BootConfig {
    pub channel: ChannelSpec,
}

impl BootConfig {
    /// Reads the settings of an agent started by hand: `upstream-agent
    /// --socket PATH`.
    pub fn from_args() -> Self {
        let args: Vec<String> = std::env::args().collect();
        if args.iter().any(|arg| arg == "--version") {
            println!("upstream-agent {}", env!("CARGO_PKG_VERSION"));
            std::process::exit(0);
        }
        let path = match args.iter().position(|arg| arg == "--socket") {
            Some(i) if i + 1 < args.len() => args[i + 1].clone(),
            _ => {
                eprintln!("usage: upstream-agent --socket PATH (as PID 1 it needs no arguments)");
                std::process::exit(2);
            }
        };
        Self {
            channel: ChannelSpec::UnixSocket(path),
        }
    }
}

/// Prepares the guest and returns the settings from the kernel command line.
pub fn boot() -> io::Result<BootConfig> {
    mount_kernel_filesystems("")?;
    let cmdline = fs::read_to_string("/proc/cmdline")?;
    let param = |key: &str| {
        cmdline
            .split_whitespace()
            .find_map(|word| word.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
    };

    let root = resolve_disk(&param("upstream.root").unwrap_or_else(|| "/dev/vda".into()))?;
    let scratch = match param("upstream.scratch") {
        Some(name) => Some(resolve_disk(&name)?),
        None => None,
    };
    enter_sandbox_root(&root, scratch.as_deref())?;
    mount_kernel_filesystems("")?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        0,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");

    if let Some(hostname) = param("upstream.hostname") {
        set_hostname(&hostname)?;
    }
    bring_up_loopback();
    if let Some(net) = param("upstream.net") {
        let config = crate::net::NetConfig::parse(&net, param("upstream.dns").as_deref())?;
        crate::net::configure(&config)?;
    }

    let channel = match param("upstream.channel").as_deref() {
        Some("vsock") => ChannelSpec::Vsock(upstream_protocol::VSOCK_PORT),
        _ => ChannelSpec::VirtioPort,
    };
    Ok(BootConfig { channel })
}

/// Turns a disk name from the command line into a device path: a path is
/// used as it is, any other name is the serial number of a virtio-blk disk
/// (QEMU sets serials; probe order, and so `vdX` naming, is not fixed).
fn resolve_disk(name: &str) -> io::Result<String> {
    if name.starts_with('/') {
        return Ok(name.to_string());
    }
    for entry in fs::read_dir("/sys/block")?.flatten() {
        let serial = fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if serial.trim() == name {
            return Ok(format!("/dev/{}", entry.file_name().to_string_lossy()));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no disk with serial '{name}'"),
    ))
}

/// Mounts `/proc`, `/sys` and `/dev` under `prefix`, creating the folders.
fn mount_kernel_filesystems(prefix: &str) -> io::Result<()> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", &format!("{prefix}/proc"), "proc", nosuid, "")?;
    mount("sysfs", &format!("{prefix}/sys"), "sysfs", nosuid, "")?;
    mount(
        "devtmpfs",
        &format!("{prefix}/dev"),
        "devtmpfs",
        libc::MS_NOSUID,
        "mode=0755",
    )?;
    Ok(())
}

/// Mounts the image read-only, puts the writable layer on top with overlayfs
/// and makes the result the root of this process.
///
/// The writable layer lives on the scratch disk when the host gave one,
/// else on a tmpfs (whose size then counts against guest memory).
fn enter_sandbox_root(root_device: &str, scratch_device: Option<&str>) -> io::Result<()> {
    mount(root_device, "/lower", "ext4", libc::MS_RDONLY, "")
        .or_else(|_| mount(root_device, "/lower", "squashfs", libc::MS_RDONLY, ""))?;
    match scratch_device {
        // The disk is fresh and short-lived: zeroing its inode tables in the
        // background would only burn guest CPU.
        Some(device) => mount(device, "/layer", "ext4", libc::MS_NOATIME, "noinit_itable")?,
        None => mount("tmpfs", "/layer", "tmpfs", 0, "mode=0755")?,
    }
    fs::create_dir_all("/layer/upper")?;
    fs::create_dir_all("/layer/work")?;
    mount(
        "overlay",
        "/root",
        "overlay",
        0,
        "lowerdir=/lower,upperdir=/layer/upper,workdir=/layer/work",
    )?;

    // Replace the initramfs root by the overlay, as switch_root does: the
    // initramfs cannot be unmounted, so move the new root over it.
    for dir in ["proc", "sys", "dev", "tmp"] {
        let _ = fs::create_dir_all(format!("/root/{dir}"));
    }
    std::env::set_current_dir("/root")?;
    mount(".", "/", "", libc::MS_MOVE, "")?;
    let dot = CString::new(".").unwrap();
    // SAFETY: chroot takes a valid NUL-terminated path.
    check(unsafe { libc::chroot(dot.as_ptr()) })?;
    std::env::set_current_dir("/")
}

/// Mounts `source` on `target`, creating `target`; an already mounted target
/// is left as it is.
fn mount(source: &str, target: &str, fstype: &str, flags: u64, data: &str) -> io::Result<()> {
    fs::create_dir_all(target)?;
    let source_c = CString::new(source)?;
    let target_c = CString::new(target)?;
    let fstype_c = CString::new(fstype)?;
    let data_c = CString::new(data)?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives
    // the call.
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            flags as libc::c_ulong,
            data_c.as_ptr().cast(),
        )
    };
    match check(rc) {
        Err(err) if err.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        Err(err) => Err(io::Error::new(
            err.kind(),
            format!("mount {source} on {target}: {err}"),
        )),
        Ok(()) => Ok(()),
    }
}

pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    let _ = fs::write("/etc/hostname", format!("{name}\n"));
    Ok(())
}

/// Brings `lo` up, which many programs expect even without networking.
fn bring_up_loopback() {
    // SAFETY: a zeroed ifreq with a NUL-terminated name is a valid argument
    // for SIOCGIFFLAGS and SIOCSIFFLAGS, and the socket is closed after use.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return;
        }
        let mut request: libc::ifreq = std::mem::zeroed();
        for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut request) == 0 {
            request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &request);
        }
        libc::close(sock);
    }
}

/// Flushes file systems and ends the VM. The host starts QEMU with
/// `-no-reboot` and the kernel with `reboot=t`, so a reboot ends the VMM;
/// under Firecracker the host ends the VMM itself.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        std::thread::park();
    }
}

pub fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

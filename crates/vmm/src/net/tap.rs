//! A sandbox's network namespace with one tap device, for VMMs that attach
//! the guest's network device to a tap (Firecracker).
//!
//! The namespace contains only the tap and its own loopback device. The
//! tap's host end has [`SERVICE_ADDR`]/24, so the guest
//! (10.0.2.15/24) reaches it directly, and the sandbox's proxy listens on
//! that address inside the namespace. IP forwarding is off and there is no
//! route beyond 10.0.2.0/24, so nothing the guest sends is routed anywhere:
//! a packet reaches a socket in the namespace or is dropped.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use super::netns::{self, NetworkNamespace};
use super::{GUEST_PREFIX, SERVICE_ADDR};

/// Name of the tap device. Every sandbox has its own namespace, so all can
/// use the same name.
pub const TAP_NAME: &str = "tap0";

/// MAC address of the guest's interface: locally administered (`06`),
/// followed by the guest address 10.0.2.15.
pub const GUEST_MAC: &str = "06:00:0a:00:02:0f";

/// Flags of the tap device: those Firecracker v1.16.1 opens its tap with
/// (`src/vmm/src/devices/virtio/net/tap.rs`).
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Returns why this host cannot create tap devices in network namespaces,
/// with the fix, or `None` when it can.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        return Some(format!(
            "upstream runs as uid {uid}, and creating a network namespace with a tap device \
             needs root; run upstream as root"
        ));
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing; load the tun module (modprobe tun)".into());
    }
    None
}

/// The location of the guest's tap device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapDevice {
    /// The network namespace that contains the tap; the VMM must run in it.
    pub netns: PathBuf,
    /// The tap's name inside that namespace.
    pub name: String,
}

/// A sandbox's network namespace with its tap device. Dropping it deletes
/// the tap and the namespace's name.
#[derive(Debug)]
pub struct TapNetwork {
    namespace: NetworkNamespace,
}

impl TapNetwork {
    /// Creates the namespace of sandbox `id` with a configured tap device.
    /// `owner` (user and group id) may open the tap besides root.
    pub fn create(id: &str, owner: Option<(u32, u32)>) -> io::Result<Self> {
        let namespace = NetworkNamespace::create(&netns::path_of(id))?;
        // From here on, Drop removes the namespace on every error path.
        let network = Self { namespace };
        network.namespace.enter(|| configure(owner))?;
        Ok(network)
    }

    pub fn namespace(&self) -> &NetworkNamespace {
        &self.namespace
    }

    pub fn device(&self) -> TapDevice {
        TapDevice {
            netns: self.namespace.path().to_path_buf(),
            name: TAP_NAME.to_string(),
        }
    }

    /// Opens TCP listeners on [`SERVICE_ADDR`] inside the namespace, one per
    /// port, in non-blocking mode.
    pub fn listen(&self, ports: &[u16]) -> io::Result<Vec<TcpListener>> {
        self.namespace.enter(|| {
            ports
                .iter()
                .map(|port| {
                    let listener = TcpListener::bind((SERVICE_ADDR, *port))?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                })
                .collect()
        })
    }
}

impl Drop for TapNetwork {
    fn drop(&mut self) {
        // The namespace would delete the tap when it ends, but a socket or
        // process left in it would keep both. A VMM that still has the
        // tap open keeps it until it exits.
        if let Err(err) = self.namespace.enter(|| delete_tap(TAP_NAME)) {
            tracing::debug!(error = %err, "deleting the tap device failed");
        }
        if let Err(err) = self.namespace.remove() {
            tracing::warn!(
                netns = %self.namespace.path().display(),
                error = %err,
                "removing a sandbox's network namespace failed"
            );
        }
    }
}

/// Sets up the calling thread's namespace: forwarding and IPv6 off, then
/// the tap with its address, up.
fn configure(owner: Option<(u32, u32)>) -> io::Result<()> {
    // Each namespace has its own copy of these settings, and a new one may
    // start from the host's (sysctl net.core.devconf_inherit_init_net),
    // where forwarding may be on. IPv6 goes off before the tap exists, so
    // the tap gets no link-local address. The IPv6 files are missing when
    // the kernel has no IPv6.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "0")?;
    for setting in ["all", "default"] {
        let path = format!("/proc/sys/net/ipv6/conf/{setting}/disable_ipv6");
        if Path::new(&path).exists() {
            std::fs::write(path, "1")?;
        }
    }
    create_tap(TAP_NAME, owner)?;
    let socket = inet_socket()?;
    let mask = u32::MAX << (32 - u32::from(GUEST_PREFIX));
    set_address(&socket, TAP_NAME, libc::SIOCSIFADDR, SERVICE_ADDR)?;
    set_address(
        &socket,
        TAP_NAME,
        libc::SIOCSIFNETMASK,
        Ipv4Addr::from(mask),
    )?;
    set_up(&socket, TAP_NAME)?;
    // A connection from inside the namespace to the tap's own address goes
    // over loopback. The guest gains nothing: the kernel drops packets to
    // 127.0.0.0/8 that arrive on the tap.
    set_up(&socket, "lo")
}

/// Creates a persistent tap device named `name` in the calling thread's
/// namespace. `owner` may open it without CAP_NET_ADMIN.
fn create_tap(name: &str, owner: Option<(u32, u32)>) -> io::Result<()> {
    let tun = open_tap(name)?;
    if let Some((uid, gid)) = owner {
        tun_ioctl(&tun, libc::TUNSETOWNER, uid as libc::c_ulong)?;
        tun_ioctl(&tun, libc::TUNSETGROUP, gid as libc::c_ulong)?;
    }
    // Persistent: the device outlives this descriptor, so the VMM can open
    // it by name later.
    tun_ioctl(&tun, libc::TUNSETPERSIST, 1)
}

/// Deletes the tap device `name` once no process has it open. Fails
/// with EBUSY while a VMM is attached.
fn delete_tap(name: &str) -> io::Result<()> {
    let tun = open_tap(name)?;
    tun_ioctl(&tun, libc::TUNSETPERSIST, 0)
}

/// Opens `/dev/net/tun` and attaches it to the tap `name`, creating the
/// device if it does not exist.
fn open_tap(name: &str) -> io::Result<File> {
    let tun = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    attach(&tun, name)?;
    Ok(tun)
}

/// Attaches `tun`, an open `/dev/net/tun`, to the tap device `name` of the
/// calling thread's namespace with the flags Firecracker uses. An existing
/// tap that has an owner admits only that user and group, or root.
pub fn attach(tun: &File, name: &str) -> io::Result<()> {
    let mut request = interface_request(name)?;
    request.ifr_ifru.ifru_flags = TAP_FLAGS as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `request` is.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn tun_ioctl(tun: &File, request: libc::Ioctl, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: these tun requests take an integer argument, not a pointer.
    if unsafe { libc::ioctl(tun.as_raw_fd(), request, value) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a socket for the interface ioctls of the calling thread's
/// namespace.
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes only integers and returns a new descriptor.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sets an IPv4 address of interface `name`: `SIOCSIFADDR` for its
/// address, `SIOCSIFNETMASK` for its netmask.
fn set_address(
    socket: &OwnedFd,
    name: &str,
    request: libc::Ioctl,
    address: Ipv4Addr,
) -> io::Result<()> {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut ifreq = interface_request(name)?;
    // SAFETY: sockaddr_in and sockaddr have the same size, 16 bytes, and
    // the kernel reads the address as sockaddr_in for AF_INET.
    ifreq.ifr_ifru.ifru_addr =
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) };
    // SAFETY: the request reads an ifreq, which `ifreq` is.
    if unsafe { libc::ioctl(socket.as_raw_fd(), request, &ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_up(socket: &OwnedFd, name: &str) -> io::Result<()> {
    let mut ifreq = interface_request(name)?;
    // SAFETY: SIOCGIFFLAGS fills the flags of an ifreq, SIOCSIFFLAGS reads
    // them, and the flags member of the union is initialised by the first.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifreq) < 0 {
            return Err(io::Error::last_os_error());
        }
        ifreq.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &ifreq) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Builds an `ifreq` for interface `name`, all other fields zero.
fn interface_request(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain data, for which all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (target, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *target = byte as libc::c_char;
    }
    Ok(request)
}

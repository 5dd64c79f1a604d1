//! The guest's network: `eth0` with a static address from the kernel
//! command line, and a DNS stub on 127.0.0.1 that forwards queries over
//! TCP to the host proxy.
//!
//! The host gives the guest no default route, so connections to addresses
//! outside the virtual network fail at once with "Network is unreachable",
//! and slirp refuses connections to unforwarded ports inside it.
//! The host drops UDP, which is why DNS goes over TCP: the stub accepts the
//! UDP queries that every C library sends and forwards each one over TCP.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

/// How long one forwarded DNS query may take.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// Network settings from `upstream.net=ADDR/PREFIX` and `upstream.dns=ADDR`.
pub struct NetConfig {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub dns: Option<Ipv4Addr>,
}

impl NetConfig {
    pub fn parse(net: &str, dns: Option<&str>) -> io::Result<Self> {
        let invalid = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid upstream.net={net}"),
            )
        };
        let (address, prefix) = net.split_once('/').ok_or_else(invalid)?;
        let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
        if prefix > 32 {
            return Err(invalid());
        }
        let dns = match dns {
            Some(dns) => Some(dns.parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("invalid upstream.dns={dns}"),
                )
            })?),
            None => None,
        };
        Ok(Self {
            address: address.parse().map_err(|_| invalid())?,
            prefix,
            dns,
        })
    }
}

/// Configures `eth0` and, with a DNS address, the resolver and its stub.
pub fn configure(config: &NetConfig) -> io::Result<()> {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(config.prefix))
        .unwrap_or(0);
    set_interface("eth0", config.address, Ipv4Addr::from(mask))?;
    if let Some(dns) = config.dns {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 53))?;
        std::thread::Builder::new()
            .name("dns-stub".into())
            .spawn(move || serve_dns(socket, dns))?;
        let _ = fs::remove_file("/etc/resolv.conf");
        fs::write("/etc/resolv.conf", "nameserver 127.0.0.1\n")?;
    }
    Ok(())
}

fn set_interface(name: &str, address: Ipv4Addr, netmask: Ipv4Addr) -> io::Result<()> {
    // SAFETY: each ioctl gets a zeroed ifreq with a NUL-terminated name and
    // a sockaddr_in in its union, as SIOCSIFADDR, SIOCSIFNETMASK and the
    // flag requests expect; the socket is closed on every path.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        let request = |code: libc::c_ulong, addr: Option<Ipv4Addr>| -> io::Result<libc::ifreq> {
            let mut ifreq: libc::ifreq = std::mem::zeroed();
            for (dst, src) in ifreq.ifr_name.iter_mut().zip(name.bytes()) {
                *dst = src as libc::c_char;
            }
            if let Some(addr) = addr {
                let sin = &mut ifreq.ifr_ifru.ifru_addr as *mut libc::sockaddr;
                let sin = sin.cast::<libc::sockaddr_in>();
                (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
                (*sin).sin_addr.s_addr = u32::from(addr).to_be();
            }
            if libc::ioctl(sock, code, &mut ifreq) < 0 {
                let err = io::Error::last_os_error();
                return Err(io::Error::new(
                    err.kind(),
                    format!("configuring {name}: {err}"),
                ));
            }
            Ok(ifreq)
        };
        let result = (|| {
            request(libc::SIOCSIFADDR, Some(address))?;
            request(libc::SIOCSIFNETMASK, Some(netmask))?;
            let mut flags = request(libc::SIOCGIFFLAGS, None)?;
            flags.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(sock, libc::SIOCSIFFLAGS, &flags) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })();
        libc::close(sock);
        result
    }
}

/// Forwards each UDP query to `server` over TCP, one thread per query, so a
/// slow reply delays no other query.
fn serve_dns(socket: UdpSocket, server: Ipv4Addr) {
    let mut buffer = [0u8; 4096];
    loop {
        let Ok((len, client)) = socket.recv_from(&mut buffer) else {
            continue;
        };
        let query = buffer[..len].to_vec();
        let Ok(reply_socket) = socket.try_clone() else {
            continue;
        };
        let _ = std::thread::Builder::new()
            .name("dns-query".into())
            .spawn(move || {
                if let Ok(reply) = forward_query(&query, server) {
                    let _ = reply_socket.send_to(&reply, client);
                }
            });
    }
}

fn forward_query(query: &[u8], server: Ipv4Addr) -> io::Result<Vec<u8>> {
    let address = SocketAddr::from((server, 53));
    let mut stream = TcpStream::connect_timeout(&address, DNS_TIMEOUT)?;
    stream.set_read_timeout(Some(DNS_TIMEOUT))?;
    stream.set_write_timeout(Some(DNS_TIMEOUT))?;
    let mut message = (query.len() as u16).to_be_bytes().to_vec();
    message.extend_from_slice(query);
    stream.write_all(&message)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut reply)?;
    Ok(reply)
}

/// The `net-relay` mode, run on the host by QEMU (slirp `guestfwd`) for
/// each guest connection: `upstream-agent net-relay SOCKET PORT`.
///
/// The guest connection is this process's standard input. The relay sends
/// it to the sandbox's proxy on the Unix socket SOCKET as `SCM_RIGHTS`,
/// with PORT as two big-endian bytes, and exits. From then on the proxy
/// owns the connection. Nothing is printed, because standard error is the guest
/// connection too.
pub fn relay_main(args: &[String]) -> i32 {
    let (Some(socket), Some(port)) = (args.first(), args.get(1)) else {
        return 2;
    };
    let Ok(port) = port.parse::<u16>() else {
        return 2;
    };
    match send_connection(socket, port) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

fn send_connection(socket: &str, port: u16) -> io::Result<()> {
    let stream = std::os::unix::net::UnixStream::connect(socket)?;
    let port = port.to_be_bytes();
    let mut iov = libc::iovec {
        iov_base: port.as_ptr() as *mut libc::c_void,
        iov_len: port.len(),
    };
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: msghdr and the control buffer are set up with the CMSG
    // macros for one descriptor, and every pointer outlives sendmsg.
    let sent = unsafe {
        let mut message: libc::msghdr = std::mem::zeroed();
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as _;
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<libc::c_int>(), 0);
        use std::os::fd::AsRawFd;
        libc::sendmsg(stream.as_raw_fd(), &message, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_config_parses() {
        let config = NetConfig::parse("10.0.2.15/24", Some("10.0.2.100")).unwrap();
        assert_eq!(config.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(config.prefix, 24);
        assert_eq!(config.dns, Some(Ipv4Addr::new(10, 0, 2, 100)));
        assert!(NetConfig::parse("10.0.2.15", None).is_err());
        assert!(NetConfig::parse("10.0.2.15/40", None).is_err());
        assert!(NetConfig::parse("10.0.2.15/24", Some("x")).is_err());
    }
}

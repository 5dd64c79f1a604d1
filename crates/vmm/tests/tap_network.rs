//! The host side of a Firecracker sandbox's network, with real network
//! namespaces, tap devices and sockets and no VM: what the guest would
//! reach from inside its namespace, and what it would not.
//!
//! Creating namespaces and tap devices needs root and `/dev/net/tun`;
//! without them the tests print why and pass. Every namespace a test
//! creates is named `/run/netns/upstream-sb-nettest…` and removed by the
//! test.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use upstream_vmm::firecracker::FirecrackerBackend;
use upstream_vmm::net::{self, netns, GuestLink, NetworkNamespace, PortForward, TapNetwork};
use upstream_vmm::{Backend, NetworkPolicy};

/// Returns whether the test can run, after printing why not.
fn can_run(test: &str) -> bool {
    match net::tap::unavailable_reason() {
        None => true,
        Some(reason) => {
            eprintln!("skipped {test}: {reason}");
            false
        }
    }
}

/// Returns a Firecracker backend that is only asked how it attaches
/// networks.
fn backend() -> FirecrackerBackend {
    FirecrackerBackend::new(PathBuf::from("/nonexistent/firecracker")).without_jailer()
}

/// Prepares the host side of sandbox `id`'s network, as `Sandbox` does
/// for a Firecracker sandbox. The folder must outlive the network.
fn prepare(
    id: &str,
    dir: &tempfile::TempDir,
    policy: &NetworkPolicy,
    publish: &[PortForward],
) -> net::Prepared {
    let relay = Path::new("/nonexistent/upstream-agent");
    net::prepare(id, dir.path(), policy, publish, &backend(), relay).unwrap()
}

/// Returns the interface index of `name` in the calling thread's
/// namespace, or 0 when there is no such interface.
fn interface_index(name: &str) -> u32 {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: the pointer is a NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}

/// Connects from inside `namespace` to `address`.
fn connect_inside(namespace: &NetworkNamespace, address: SocketAddr) -> std::io::Result<TcpStream> {
    namespace.enter(|| TcpStream::connect_timeout(&address, Duration::from_secs(5)))
}

/// Starts an echo server on the host's 127.0.0.1 and returns its address.
fn host_echo_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buffer = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    address
}

/// Sends `CONNECT target` to the proxy port from inside `namespace` and
/// returns the connection and the proxy's status line.
fn proxy_connect(namespace: &NetworkNamespace, target: SocketAddr) -> (TcpStream, String) {
    let proxy = SocketAddr::from((net::SERVICE_ADDR, net::PROXY_PORT));
    let mut stream = connect_inside(namespace, proxy).expect("the proxy port is open");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head.lines().next().unwrap_or_default().to_string();
    (stream, status)
}

#[test]
fn tap_lives_in_namespace_until_dropped() {
    if !can_run("tap_lives_in_namespace_until_dropped") {
        return;
    }
    let id = "sb-nettest00001";
    let path = netns::path_of(id);

    let network = TapNetwork::create(id, None).unwrap();

    assert!(path.exists(), "{} is missing", path.display());
    let namespace = NetworkNamespace::open(&path).unwrap();
    let inside = namespace.enter(|| Ok(interface_index("tap0"))).unwrap();
    assert_ne!(inside, 0, "tap0 is missing in the namespace");
    assert_eq!(interface_index("tap0"), 0, "tap0 is on the host");
    let forwarding = namespace
        .enter(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward"))
        .unwrap();
    assert_eq!(forwarding.trim(), "0");
    let device = network.device();
    assert_eq!(device.netns, path);
    assert_eq!(device.name, "tap0");

    drop(network);

    assert!(!path.exists(), "{} is left behind", path.display());
    // The open descriptor keeps the namespace, but not the tap.
    let after = namespace.enter(|| Ok(interface_index("tap0"))).unwrap();
    assert_eq!(after, 0, "tap0 outlived its network");
}

/// Switches the calling thread, and only it, to user `uid` and group
/// `gid`, which drops root's capabilities. The raw system calls change one
/// thread, unlike the C library's wrappers, which change every thread.
fn become_user(uid: u32, gid: u32) -> std::io::Result<()> {
    // SAFETY: the calls take integers only.
    let failed = unsafe {
        libc::syscall(libc::SYS_setresgid, gid, gid, gid) < 0
            || libc::syscall(libc::SYS_setresuid, uid, uid, uid) < 0
    };
    if failed {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens `/dev/net/tun` as root and attaches it to `tap0` in `namespace`
/// as user `uid` and group `gid`, the way a jailed Firecracker does.
fn attach_as(namespace: &NetworkNamespace, uid: u32, gid: u32) -> std::io::Result<()> {
    namespace.enter(|| {
        let tun = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        become_user(uid, gid)?;
        net::tap::attach(&tun, "tap0")
    })
}

#[test]
fn tap_admits_its_owner_only() {
    if !can_run("tap_admits_its_owner_only") {
        return;
    }
    let id = "sb-nettest00006";

    let network = TapNetwork::create(id, Some((65534, 65534))).unwrap();

    let namespace = network.namespace();
    attach_as(namespace, 65534, 65534).expect("the owner opens the tap");
    let err = attach_as(namespace, 65533, 65534).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    let err = attach_as(namespace, 65534, 65533).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    drop(network);
    assert!(!netns::path_of(id).exists());
}

#[test]
fn non_root_gets_reason_and_fix() {
    if !can_run("non_root_gets_reason_and_fix") {
        return;
    }
    let message = std::thread::spawn(|| {
        become_user(65534, 65534).unwrap();
        backend().network_attachment().unwrap_err().to_string()
    })
    .join()
    .unwrap();

    assert!(message.contains("upstream runs as uid 65534"), "{message}");
    assert!(message.contains("run upstream as root"), "{message}");
    assert!(message.contains("use --backend qemu"), "{message}");
}

#[test]
fn taken_name_fails_and_is_kept() {
    if !can_run("taken_name_fails_and_is_kept") {
        return;
    }
    let id = "sb-nettest00002";
    let first = TapNetwork::create(id, None).unwrap();

    let err = TapNetwork::create(id, None).unwrap_err();

    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
    let namespace = first.namespace().clone();
    let index = namespace.enter(|| Ok(interface_index("tap0"))).unwrap();
    assert_ne!(index, 0, "the failed create removed the first network");
    drop(first);
    assert!(!netns::path_of(id).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_serves_namespace_and_applies_policy() {
    if !can_run("proxy_serves_namespace_and_applies_policy") {
        return;
    }
    let server = host_echo_server();
    let dir = tempfile::tempdir().unwrap();
    let policy = NetworkPolicy::internet();

    let prepared = prepare("sb-nettest00003", &dir, &policy, &[]);

    let network = prepared.network.as_ref().unwrap();
    let namespace = network.tap().unwrap().namespace().clone();
    let vm = prepared.vm.as_ref().unwrap();
    assert!(matches!(vm.link, GuestLink::Tap(_)), "{:?}", vm.link);
    let checks = tokio::task::spawn_blocking(move || {
        // 127.0.0.1 in the namespace is the namespace's own loopback.
        let err = connect_inside(&namespace, server).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        // Loopback is internal, so the proxy rejects it without dialing.
        let (_stream, status) = proxy_connect(&namespace, server);
        assert!(status.contains("403"), "{status}");
        // Only the proxy's ports are open on the service address.
        let closed = SocketAddr::from((net::SERVICE_ADDR, 9));
        let err = connect_inside(&namespace, closed).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    });
    checks.await.unwrap();

    assert_eq!(network.stats().blocked, 1);
    let path = netns::path_of("sb-nettest00003");
    drop(prepared);
    assert!(!path.exists(), "{} is left behind", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_tunnels_allowed_destination() {
    if !can_run("proxy_tunnels_allowed_destination") {
        return;
    }
    let server = host_echo_server();
    let dir = tempfile::tempdir().unwrap();
    // An exact address opens an internal destination.
    let policy = NetworkPolicy::rules(&["127.0.0.1"], &[]).unwrap();

    let prepared = prepare("sb-nettest00004", &dir, &policy, &[]);

    let network = prepared.network.as_ref().unwrap();
    let namespace = network.tap().unwrap().namespace().clone();
    let echoed = tokio::task::spawn_blocking(move || {
        let (mut stream, status) = proxy_connect(&namespace, server);
        assert!(status.contains("200"), "{status}");
        stream.write_all(b"ping").unwrap();
        let mut reply = [0u8; 4];
        stream.read_exact(&mut reply).unwrap();
        reply
    });

    assert_eq!(&echoed.await.unwrap(), b"ping");
    assert_eq!(network.stats().dials, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_port_reaches_guest_address() {
    if !can_run("published_port_reaches_guest_address") {
        return;
    }
    let id = "sb-nettest00005";
    let dir = tempfile::tempdir().unwrap();
    let publish = [
        PortForward {
            guest: 8000,
            host: None,
        },
        PortForward {
            guest: 8001,
            host: None,
        },
    ];
    let prepared = prepare(id, &dir, &NetworkPolicy::off(), &publish);
    let network = prepared.network.as_ref().unwrap();
    let namespace = network.tap().unwrap().namespace().clone();
    // No guest runs, so the guest's address goes on the namespace's
    // loopback, where a server plays the guest.
    let ip = |args: &[&str]| {
        let status = Command::new("ip")
            .arg("-n")
            .arg(namespace.path().file_name().unwrap())
            .args(args)
            .status()
            .expect("iproute2 is installed");
        assert!(status.success(), "ip {args:?} failed");
    };
    ip(&["address", "add", "10.0.2.15/32", "dev", "lo"]);
    let guest = namespace
        .enter(|| {
            let listener = std::net::TcpListener::bind((net::GUEST_ADDR, 8000))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .unwrap();
    let guest = tokio::net::TcpListener::from_std(guest).unwrap();
    tokio::spawn(async move {
        let (mut stream, peer) = guest.accept().await.unwrap();
        let greeting = format!("hello {}", peer.ip());
        stream.write_all(greeting.as_bytes()).await.unwrap();
    });

    let published = network.published();
    let mut client = tokio::net::TcpStream::connect(published[0].host)
        .await
        .unwrap();
    let mut reply = String::new();
    client.read_to_string(&mut reply).await.unwrap();

    assert_eq!(published[0].guest, 8000);
    assert!(published[0].host.ip().is_loopback());
    // The connection comes from inside the namespace.
    assert_eq!(reply, "hello 10.0.2.15");
    // Nothing listens on guest port 8001: the host connection closes.
    let mut refused = tokio::net::TcpStream::connect(published[1].host)
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), refused.read_to_end(&mut rest))
        .await
        .expect("a refused guest port closes the host connection");
    assert!(read.is_err() || rest.is_empty(), "{read:?}");

    ip(&["address", "del", "10.0.2.15/32", "dev", "lo"]);
    drop(prepared);
    assert!(!netns::path_of(id).exists());
}

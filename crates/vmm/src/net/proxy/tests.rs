//! The proxy over real sockets: connections are handed over the way the
//! relay does it, and servers listen on 127.0.0.1.

use std::os::fd::AsRawFd;

use tokio::net::TcpListener;

use super::*;
use crate::net::policy::NetworkLimits;
use crate::net::sniff::tests::client_hello;

struct Harness {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    proxy: Proxy,
}

impl Harness {
    fn new(policy: NetworkPolicy) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("net.sock");
        let proxy = Proxy::start("sb-test", Intake::Relay(socket.clone()), &policy).unwrap();
        Self {
            _dir: dir,
            socket,
            proxy,
        }
    }

    /// Opens a guest connection to `port` as the relay would.
    fn connect(&self, port: u16) -> UnixStream {
        let (guest, handed) = std::os::unix::net::UnixStream::pair().unwrap();
        let relay = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        send_fd(&relay, handed.as_raw_fd(), port);
        guest.set_nonblocking(true).unwrap();
        UnixStream::from_std(guest).unwrap()
    }
}

fn send_fd(relay: &std::os::unix::net::UnixStream, fd: RawFd, port: u16) {
    let port = port.to_be_bytes();
    let mut iov = libc::iovec {
        iov_base: port.as_ptr() as *mut _,
        iov_len: 2,
    };
    let mut control = [0u64; 4];
    // SAFETY: test-only sendmsg with buffers that outlive the call.
    unsafe {
        let mut message: libc::msghdr = std::mem::zeroed();
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = libc::CMSG_SPACE(4) as _;
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(4) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<RawFd>(), fd);
        assert_eq!(libc::sendmsg(relay.as_raw_fd(), &message, 0), 2);
    }
}

fn allow(rules: &[&str]) -> NetworkPolicy {
    NetworkPolicy::rules(rules, &[]).unwrap()
}

/// An HTTP server on 127.0.0.1 that answers every request with `hello`
/// and returns the request heads it saw.
async fn http_server() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let sender = sender.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap() == 1 {
                    head.push(byte[0]);
                }
                let _ = sender.send(String::from_utf8_lossy(&head).into_owned());
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                    .await;
            });
        }
    });
    (port, receiver)
}

async fn read_all(mut stream: UnixStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn dns_query(harness: &Harness, name: &str) -> Vec<u8> {
    let mut message = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        message.push(label.len() as u8);
        message.extend_from_slice(label.as_bytes());
    }
    message.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut guest = harness.connect(DNS_PORT);
    guest.write_u16(message.len() as u16).await.unwrap();
    guest.write_all(&message).await.unwrap();
    let len = guest.read_u16().await.unwrap();
    let mut reply = vec![0u8; usize::from(len)];
    guest.read_exact(&mut reply).await.unwrap();
    reply
}

#[tokio::test]
async fn connect_tunnel_reaches_allowed_address() {
    let (port, mut heads) = http_server().await;
    let harness = Harness::new(allow(&["127.0.0.1"]));
    let mut guest = harness.connect(PROXY_PORT);
    let request = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n");
    guest.write_all(request.as_bytes()).await.unwrap();
    guest
        .write_all(b"GET /inner HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    guest.shutdown().await.unwrap();
    let response = read_all(guest).await;
    assert!(
        response.starts_with("HTTP/1.1 200 Connection established"),
        "{response}"
    );
    assert!(response.ends_with("hello"), "{response}");
    assert!(heads.recv().await.unwrap().starts_with("GET /inner"));
    assert_eq!(harness.proxy.stats().dials, 1);
}

#[tokio::test]
async fn host_loopback_is_refused_by_default() {
    let (port, _heads) = http_server().await;
    let harness = Harness::new(NetworkPolicy::internet());
    let mut guest = harness.connect(PROXY_PORT);
    let request = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n");
    guest.write_all(request.as_bytes()).await.unwrap();
    let response = read_all(guest).await;
    assert!(response.starts_with("HTTP/1.1 403 Forbidden"), "{response}");
    assert!(response.contains("loopback"), "{response}");
    let stats = harness.proxy.stats();
    assert_eq!(stats.dials, 0);
    assert_eq!(stats.blocked, 1);
}

/// The metadata address is refused before any connection is attempted:
/// `dials` counts every outbound connect, and it stays at zero.
#[tokio::test]
async fn metadata_address_is_refused_without_dialing() {
    let harness = Harness::new(allow(&["0.0.0.0/0"]));
    for request in [
        "CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n",
        "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
        "GET http://metadata.google.internal/ HTTP/1.1\r\nHost: metadata.google.internal\r\n\r\n",
    ] {
        let mut guest = harness.connect(PROXY_PORT);
        guest.write_all(request.as_bytes()).await.unwrap();
        let response = read_all(guest).await;
        assert!(
            response.starts_with("HTTP/1.1 403"),
            "{request}: {response}"
        );
    }
    assert_eq!(harness.proxy.stats().dials, 0);
    assert_eq!(harness.proxy.stats().blocked, 3);
}

#[tokio::test]
async fn absolute_url_is_rewritten_for_the_server() {
    let (port, mut heads) = http_server().await;
    let harness = Harness::new(allow(&["127.0.0.1"]));
    let mut guest = harness.connect(PROXY_PORT);
    let request = format!(
        "GET http://127.0.0.1:{port}/simple/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Proxy-Connection: keep-alive\r\n\r\n"
    );
    guest.write_all(request.as_bytes()).await.unwrap();
    let response = read_all(guest).await;
    assert!(response.ends_with("hello"), "{response}");
    let head = heads.recv().await.unwrap();
    assert!(head.starts_with("GET /simple/ HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("Connection: close"), "{head}");
    assert!(!head.contains("Proxy-Connection"), "{head}");
}

#[tokio::test]
async fn denied_name_is_refused_on_every_path() {
    let policy = NetworkPolicy::rules(&[] as &[&str], &["blocked.example"]).unwrap();
    let harness = Harness::new(policy);

    let mut guest = harness.connect(PROXY_PORT);
    guest
        .write_all(b"CONNECT blocked.example:443 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let response = read_all(guest).await;
    assert!(
        response.contains("denied by rule `blocked.example`"),
        "{response}"
    );

    let mut guest = harness.connect(443);
    guest
        .write_all(&client_hello("blocked.example"))
        .await
        .unwrap();
    assert_eq!(read_all(guest).await, "");

    let mut guest = harness.connect(80);
    guest
        .write_all(b"GET / HTTP/1.1\r\nHost: blocked.example\r\n\r\n")
        .await
        .unwrap();
    assert!(read_all(guest).await.starts_with("HTTP/1.1 403"));

    let reply = dns_query(&harness, "blocked.example").await;
    assert_eq!(reply[3] & 0x0f, 3, "NXDOMAIN");
    assert_eq!(harness.proxy.stats().dials, 0);
}

#[tokio::test]
async fn server_name_inside_tunnel_is_checked() {
    let (port, _heads) = http_server().await;
    let policy = NetworkPolicy::rules(&["127.0.0.1"], &["evil.example"]).unwrap();
    let harness = Harness::new(policy);
    let mut guest = harness.connect(PROXY_PORT);
    let request = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n");
    guest.write_all(request.as_bytes()).await.unwrap();
    guest
        .write_all(&client_hello("evil.example"))
        .await
        .unwrap();
    let response = read_all(guest).await;
    assert_eq!(response, "HTTP/1.1 200 Connection established\r\n\r\n");
    assert_eq!(harness.proxy.stats().blocked, 1);
}

#[tokio::test]
async fn dropped_proxy_closes_open_connections() {
    let harness = Harness::new(NetworkPolicy::internet());
    let mut guest = harness.connect(DNS_PORT);
    let query = [
        0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1,
    ];
    guest.write_u16(query.len() as u16).await.unwrap();
    guest.write_all(&query).await.unwrap();
    let len = guest.read_u16().await.unwrap();
    let mut reply = vec![0u8; usize::from(len)];
    guest.read_exact(&mut reply).await.unwrap();

    drop(harness);

    // An idle DNS connection would stay open for DNS_IDLE (10 s).
    let read = tokio::time::timeout(Duration::from_secs(2), guest.read_u16())
        .await
        .expect("the connection closes with the proxy");
    assert_eq!(read.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
}

#[tokio::test]
async fn dns_answers_with_the_service_address() {
    let harness = Harness::new(allow(&["127.0.0.1"]));
    let reply = dns_query(&harness, "localhost").await;
    assert_eq!(reply[3] & 0x0f, 0, "response code");
    assert_eq!(&reply[reply.len() - 4..], &SERVICE_ADDR.octets());

    let harness = Harness::new(NetworkPolicy::internet());
    let reply = dns_query(&harness, "localhost").await;
    assert_eq!(
        reply[3] & 0x0f,
        3,
        "a name of the host's loopback is NXDOMAIN"
    );
}

#[tokio::test]
async fn other_ports_are_reset_at_once() {
    let harness = Harness::new(NetworkPolicy::internet());
    let guest = harness.connect(22);
    let started = std::time::Instant::now();
    let _ = read_all(guest).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(harness.proxy.stats().blocked, 1);
}

#[tokio::test]
async fn connection_limit_resets_extra_connections() {
    let (port, _heads) = http_server().await;
    let mut policy = allow(&["127.0.0.1"]);
    policy.limits = NetworkLimits {
        max_connections: 1,
        bandwidth: None,
    };
    let harness = Harness::new(policy);
    let mut first = harness.connect(PROXY_PORT);
    let request = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n");
    first.write_all(request.as_bytes()).await.unwrap();
    let mut established = [0u8; 12];
    first.read_exact(&mut established).await.unwrap();

    let mut second = harness.connect(PROXY_PORT);
    second.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_all(second).await, "");
    assert_eq!(harness.proxy.stats().blocked, 1);
}

#[tokio::test]
async fn bandwidth_limit_slows_transfers() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(&vec![7u8; 300 * 1024]).await.unwrap();
    });
    let mut policy = allow(&["127.0.0.1"]);
    policy.limits.bandwidth = Some(200 * 1024);
    let harness = Harness::new(policy);
    let mut guest = harness.connect(PROXY_PORT);
    let request = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n");
    guest.write_all(request.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let received = read_all(guest).await;
    let elapsed = started.elapsed();
    assert!(received.len() > 300 * 1024, "{}", received.len());
    // 100 KiB beyond the one-second burst at 200 KiB/s takes 0.5 s.
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
}

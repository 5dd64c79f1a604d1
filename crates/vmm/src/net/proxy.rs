//! The host side of a sandbox's network: one proxy per sandbox that
//! receives every connection the guest opens and decides whether, and
//! where, it goes on.
//!
//! Connections arrive in one of two ways ([`Intake`]). Under QEMU, a relay
//! process passes each connected socket and the guest's destination port
//! over a Unix socket in the sandbox's run folder. With a tap device, the
//! proxy listens on [`SERVICE_ADDR`] inside the sandbox's network
//! namespace, one listener per port. Either way the port tells what the
//! connection carries: DNS queries over TCP, a request to the HTTP proxy
//! (`CONNECT` or an absolute URL), or traffic to a name that the proxy's
//! DNS resolved. The destination of the last kind is read from its TLS
//! server name or HTTP Host header.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::accept::serve_each;
use super::chain::HostProxy;
use super::dns::{self, Answer};
use super::limit::{Bandwidth, BlockLog, Counters, NetworkStats};
use super::policy::{host_addresses, Denial, Judge, NetworkPolicy};
use super::sniff::{self, HttpHead, Sniffed};
use super::{DNS_PORT, PROXY_PORT, SERVICE_ADDR, SNIFFED_PORTS};

/// How long a client may take to send its request head or first bytes.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long resolving a name and connecting to it may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a DNS connection may stay idle between queries.
const DNS_IDLE: Duration = Duration::from_secs(10);

/// The source of the guest's connections to the proxy.
pub(crate) enum Intake {
    /// Relays hand over each connection on the Unix socket at this path.
    Relay(PathBuf),
    /// Listeners on [`SERVICE_ADDR`], each serving the port it is bound to.
    Listeners(Vec<std::net::TcpListener>),
}

/// A running proxy; dropping it stops the proxy and every connection.
pub(crate) struct Proxy {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Serves the connections of sandbox `sandbox` from `intake` under
    /// `policy`.
    pub fn start(sandbox: &str, intake: Intake, policy: &NetworkPolicy) -> io::Result<Self> {
        let shared = Arc::new(Shared::new(sandbox, policy.clone(), HostProxy::from_env()));
        // Tasks started before an error are aborted when `proxy` drops.
        let mut proxy = Self {
            shared: Arc::clone(&shared),
            tasks: Vec::new(),
        };
        match intake {
            Intake::Relay(socket) => {
                let _ = std::fs::remove_file(&socket);
                let listener = UnixListener::bind(&socket)?;
                proxy
                    .tasks
                    .push(tokio::spawn(serve_relays(listener, shared)));
            }
            Intake::Listeners(listeners) => {
                for listener in listeners {
                    let port = listener.local_addr()?.port();
                    let listener = TcpListener::from_std(listener)?;
                    let task = serve_listener(listener, port, Arc::clone(&shared));
                    proxy.tasks.push(tokio::spawn(task));
                }
            }
        }
        Ok(proxy)
    }

    pub fn stats(&self) -> NetworkStats {
        self.shared.counters.snapshot()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// State shared by every connection of one sandbox.
struct Shared {
    judge: Judge,
    connections: Arc<Semaphore>,
    bandwidth: Option<Bandwidth>,
    host_proxy: Option<HostProxy>,
    counters: Counters,
    log: BlockLog,
}

impl Shared {
    fn new(sandbox: &str, policy: NetworkPolicy, host_proxy: Option<HostProxy>) -> Self {
        let limits = policy.limits;
        Self {
            connections: Arc::new(Semaphore::new(limits.max_connections.max(1) as usize)),
            bandwidth: limits.bandwidth.map(Bandwidth::new),
            judge: Judge::new(policy, host_addresses()),
            host_proxy,
            counters: Counters::default(),
            log: BlockLog::new(sandbox),
        }
    }

    fn blocked(&self, destination: &str, denial: &Denial) {
        Counters::add(&self.counters.blocked, 1);
        self.log.blocked(destination, denial);
    }
}

async fn serve_relays(listener: UnixListener, shared: Arc<Shared>) {
    serve_each(listener, "relay", move |stream| {
        let shared = Arc::clone(&shared);
        async move {
            match receive_connection(&stream).await {
                Ok((guest, port)) => serve(guest, port, shared).await,
                Err(err) => tracing::debug!(error = %err, "a relay handed over no connection"),
            }
        }
    })
    .await;
}

/// Serves the guest connections that `listener` accepts on `port`.
async fn serve_listener(listener: TcpListener, port: u16, shared: Arc<Shared>) {
    serve_each(listener, "guest", move |stream| {
        let shared = Arc::clone(&shared);
        async move {
            match guest_stream(stream) {
                Ok(guest) => serve(guest, port, shared).await,
                Err(err) => tracing::debug!(error = %err, "taking over a guest connection failed"),
            }
        }
    })
    .await;
}

/// Receives the guest connection and its destination port from a relay:
/// two bytes of port and the socket as `SCM_RIGHTS`.
async fn receive_connection(stream: &UnixStream) -> io::Result<(GuestStream, u16)> {
    let (fd, port) = tokio::time::timeout(HEAD_TIMEOUT, async {
        loop {
            stream.readable().await?;
            match stream.try_io(tokio::io::Interest::READABLE, || {
                receive_fd(stream.as_raw_fd())
            }) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "relay sent nothing"))??;
    let std_stream = std::os::unix::net::UnixStream::from(fd);
    std_stream.set_nonblocking(true)?;
    Ok((UnixStream::from_std(std_stream)?, port))
}

/// The guest's end of a connection: a connected stream socket from slirp,
/// whose address family depends on the libslirp build, or a TCP connection
/// accepted in the sandbox's namespace. `UnixStream` only reads and writes
/// it, which works for any stream socket.
type GuestStream = UnixStream;

/// Takes over an accepted TCP connection as a [`GuestStream`].
fn guest_stream(stream: TcpStream) -> io::Result<GuestStream> {
    let socket = OwnedFd::from(stream.into_std()?);
    let stream = std::os::unix::net::UnixStream::from(socket);
    stream.set_nonblocking(true)?;
    UnixStream::from_std(stream)
}

fn receive_fd(socket: RawFd) -> io::Result<(OwnedFd, u16)> {
    let mut port = [0u8; 2];
    let mut iov = libc::iovec {
        iov_base: port.as_mut_ptr().cast(),
        iov_len: port.len(),
    };
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; the pointers set below describe live
    // buffers of the given lengths.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `message` describes valid buffers; MSG_CMSG_CLOEXEC keeps the
    // received descriptor out of child processes.
    let n = unsafe { libc::recvmsg(socket, &mut message, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n != 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "relay message without a port",
        ));
    }
    // SAFETY: the control buffer was filled by recvmsg and is walked with
    // the CMSG macros; the descriptor is taken over exactly once.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&message);
        if header.is_null()
            || (*header).cmsg_level != libc::SOL_SOCKET
            || (*header).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "relay message without a socket",
            ));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<RawFd>());
        Ok((OwnedFd::from_raw_fd(fd), u16::from_be_bytes(port)))
    }
}

async fn serve(guest: GuestStream, port: u16, shared: Arc<Shared>) {
    Counters::add(&shared.counters.connections, 1);
    let Ok(_permit) = Arc::clone(&shared.connections).try_acquire_owned() else {
        shared.blocked(&format!("{SERVICE_ADDR}:{port}"), &Denial::ConnectionLimit);
        return;
    };
    let result = match port {
        DNS_PORT => serve_dns(guest, &shared).await,
        PROXY_PORT => serve_http_proxy(guest, &shared).await,
        port if SNIFFED_PORTS.contains(&port) => serve_transparent(guest, port, &shared).await,
        _ => {
            shared.blocked(&format!("{SERVICE_ADDR}:{port}"), &Denial::UnsupportedPort);
            reset(&guest);
            Ok(())
        }
    };
    if let Err(err) = result {
        tracing::debug!(port, error = %err, "guest connection ended with an error");
    }
}

/// Answers DNS queries over TCP (RFC 1035 section 4.2.2 framing) until the
/// guest closes the connection or it stays idle.
async fn serve_dns(mut guest: GuestStream, shared: &Shared) -> io::Result<()> {
    loop {
        let len = match tokio::time::timeout(DNS_IDLE, guest.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            Ok(Err(err)) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(err)) => return Err(err),
            Err(_) => return Ok(()),
        };
        let mut query = vec![0u8; len];
        guest.read_exact(&mut query).await?;
        let reply = answer_query(&query, shared).await;
        guest.write_u16(reply.len() as u16).await?;
        guest.write_all(&reply).await?;
    }
}

async fn answer_query(query: &[u8], shared: &Shared) -> Vec<u8> {
    let question = match dns::parse_query(query) {
        Ok(question) => question,
        Err(rcode) => return dns::response(query, None, Answer::Error(rcode)),
    };
    let answer = match name_is_usable(&question.name, shared).await {
        Err(denial) => {
            if denial != Denial::Unresolved {
                shared.blocked(&question.name, &denial);
            }
            Answer::NxDomain
        }
        Ok(()) if question.is_address_query() => Answer::Address(SERVICE_ADDR),
        Ok(()) => Answer::NoData,
    };
    dns::response(query, Some(&question), answer)
}

/// Checks a name the guest looks up: the name rules, and that it resolves
/// on the host to at least one address the policy allows. Behind a host
/// proxy the host may be unable to resolve names, so only the name rules
/// apply there.
async fn name_is_usable(name: &str, shared: &Shared) -> Result<(), Denial> {
    shared.judge.check_name(name)?;
    if name.parse::<IpAddr>().is_ok() {
        return Err(Denial::Unresolved);
    }
    match resolve(name, 0).await {
        Ok(addrs) if !addrs.is_empty() => {
            let ips: Vec<IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
            shared.judge.filter_addrs(Some(name), &ips).map(|_| ())
        }
        _ if shared.host_proxy.is_some() => Ok(()),
        _ => Err(Denial::Unresolved),
    }
}

async fn resolve(name: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let lookup = tokio::net::lookup_host((name, port));
    match tokio::time::timeout(DIAL_TIMEOUT, lookup).await {
        Ok(addrs) => Ok(addrs?.collect()),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("resolving {name} timed out"),
        )),
    }
}

/// Failure to open a connection for the guest.
enum DialError {
    Blocked(Denial),
    Failed(io::Error),
}

/// Opens a connection to `host:port` for the guest if the policy allows it.
/// `host` is a name or an IP address literal.
async fn dial(host: &str, port: u16, shared: &Shared) -> Result<TcpStream, DialError> {
    let host = host.trim_end_matches('.');
    let destination = format!("{host}:{port}");
    let blocked = |denial: Denial| {
        shared.blocked(&destination, &denial);
        DialError::Blocked(denial)
    };
    let literal = host.parse::<IpAddr>().ok();
    let name = if literal.is_some() { None } else { Some(host) };
    if let Some(name) = name {
        shared.judge.check_name(name).map_err(blocked)?;
    }

    let via_host_proxy = shared
        .host_proxy
        .as_ref()
        .filter(|proxy| !proxy.bypasses(&host.to_ascii_lowercase()));
    let resolved = match literal {
        Some(ip) => Ok(vec![SocketAddr::new(ip, port)]),
        None => resolve(host, port).await,
    };
    let addrs = match (resolved, via_host_proxy) {
        (Ok(addrs), _) if !addrs.is_empty() => addrs,
        // The host proxy resolves names the host cannot.
        (_, Some(_)) => Vec::new(),
        (Ok(_), None) => return Err(blocked(Denial::Unresolved)),
        (Err(err), None) => return Err(DialError::Failed(err)),
    };
    let ips: Vec<IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
    let allowed = if ips.is_empty() {
        Vec::new()
    } else {
        shared.judge.filter_addrs(name, &ips).map_err(blocked)?
    };

    Counters::add(&shared.counters.dials, 1);
    let connect = async {
        if let Some(proxy) = via_host_proxy {
            return proxy.connect(host, port).await;
        }
        let mut last_error = io::Error::other("no address");
        for ip in allowed {
            match TcpStream::connect((ip, port)).await {
                Ok(stream) => return Ok(stream),
                Err(err) => last_error = err,
            }
        }
        Err(last_error)
    };
    match tokio::time::timeout(DIAL_TIMEOUT, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(err)) => Err(DialError::Failed(err)),
        Err(_) => Err(DialError::Failed(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting to {destination} timed out"),
        ))),
    }
}

/// Reads from `stream` into `buffer` until [`sniff::sniff`] decides what
/// the bytes are, the peer stops sending, or [`HEAD_TIMEOUT`] passes.
async fn read_until_sniffed<R: AsyncRead + Unpin>(
    stream: &mut R,
    buffer: &mut Vec<u8>,
) -> io::Result<Sniffed> {
    let read = async {
        loop {
            match sniff::sniff(buffer) {
                Sniffed::Incomplete if buffer.len() < sniff::MAX_HEAD => {}
                Sniffed::Incomplete => return Ok(Sniffed::Other),
                decided => return Ok(decided),
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(Sniffed::Other);
            }
            buffer.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(HEAD_TIMEOUT, read)
        .await
        .unwrap_or(Ok(Sniffed::Other))
}

/// Serves the HTTP proxy port: `CONNECT host:port` tunnels and requests for
/// absolute `http://` URLs.
async fn serve_http_proxy(mut guest: GuestStream, shared: &Shared) -> io::Result<()> {
    let mut buffer = Vec::new();
    let Sniffed::Http(head) = read_until_sniffed(&mut guest, &mut buffer).await? else {
        return reply(
            &mut guest,
            "400 Bad Request",
            "expected an HTTP proxy request",
        )
        .await;
    };
    let rest = buffer.split_off(head.len);

    if head.method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = sniff::split_host_port(&head.target);
        let Some(port) = port else {
            return reply(&mut guest, "400 Bad Request", "CONNECT needs host:port").await;
        };
        let server = match dial(&host, port, shared).await {
            Ok(server) => server,
            Err(err) => return reply_dial_error(&mut guest, &head.target, err).await,
        };
        guest
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        return relay(guest, server, rest, true, shared).await;
    }

    let Some((host, port, path)) = split_http_url(&head.target) else {
        // An origin-form request: the proxy port was used as a web server.
        return forward_http(guest, &head, rest, 80, shared).await;
    };
    let mut server = match dial(&host, port, shared).await {
        Ok(server) => server,
        Err(err) => return reply_dial_error(&mut guest, &head.target, err).await,
    };
    server.write_all(&head.rewrite(&path)).await?;
    relay(guest, server, rest, false, shared).await
}

/// Splits `http://host[:port]/path` into host, port and path.
fn split_http_url(target: &str) -> Option<(String, u16, String)> {
    let rest = target.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, "/"),
    };
    let (host, port) = sniff::split_host_port(authority);
    Some((host, port.unwrap_or(80), path.to_string()))
}

/// Serves a connection the guest made to [`SERVICE_ADDR`] on `port` after
/// resolving a name through the proxy's DNS.
async fn serve_transparent(mut guest: GuestStream, port: u16, shared: &Shared) -> io::Result<()> {
    let mut buffer = Vec::new();
    match read_until_sniffed(&mut guest, &mut buffer).await? {
        Sniffed::Tls(Some(name)) => {
            let server = match dial(&name, port, shared).await {
                Ok(server) => server,
                Err(_) => {
                    reset(&guest);
                    return Ok(());
                }
            };
            relay(guest, server, buffer, false, shared).await
        }
        Sniffed::Http(head) => {
            let rest = buffer.split_off(head.len);
            forward_http(guest, &head, rest, port, shared).await
        }
        _ => {
            shared.blocked(&format!("{SERVICE_ADDR}:{port}"), &Denial::NoHostName);
            reset(&guest);
            Ok(())
        }
    }
}

/// Makes the coming close of `guest` a reset (SO_LINGER with a zero
/// timeout), so the guest gets a connection error instead of an end of
/// stream.
fn reset(guest: &GuestStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the pointer and length describe `linger`, which outlives the
    // call; a failure only leaves the ordinary close.
    unsafe {
        libc::setsockopt(
            guest.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Sends a request whose destination is its Host header to that host.
async fn forward_http(
    mut guest: GuestStream,
    head: &HttpHead,
    rest: Vec<u8>,
    port: u16,
    shared: &Shared,
) -> io::Result<()> {
    let Some(host) = head.host() else {
        shared.blocked(&format!("{SERVICE_ADDR}:{port}"), &Denial::NoHostName);
        return reply(
            &mut guest,
            "400 Bad Request",
            "the request has no Host header",
        )
        .await;
    };
    let mut server = match dial(&host, port, shared).await {
        Ok(server) => server,
        Err(err) => return reply_dial_error(&mut guest, &host, err).await,
    };
    server.write_all(&head.rewrite(&head.target)).await?;
    relay(guest, server, rest, false, shared).await
}

async fn reply_dial_error(guest: &mut GuestStream, target: &str, err: DialError) -> io::Result<()> {
    match err {
        DialError::Blocked(denial) => {
            let message = format!("upstream blocked {target}: {denial}");
            reply(guest, "403 Forbidden", &message).await
        }
        DialError::Failed(err) => {
            let message = format!("upstream could not connect to {target}: {err}");
            reply(guest, "502 Bad Gateway", &message).await
        }
    }
}

async fn reply(guest: &mut GuestStream, status: &str, message: &str) -> io::Result<()> {
    let body = format!("{message}\n");
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         X-Upstream-Proxy: {status}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    guest.write_all(response.as_bytes()).await?;
    guest.shutdown().await
}

/// Copies bytes both ways until both sides are done. `first` goes to the
/// server before anything else. With `inspect`, the first bytes the guest
/// sends (after `first`) are checked like a transparent connection: a TLS
/// server name or HTTP Host header must pass the name rules too.
async fn relay(
    guest: GuestStream,
    server: TcpStream,
    first: Vec<u8>,
    inspect: bool,
    shared: &Shared,
) -> io::Result<()> {
    let (mut guest_read, guest_write) = guest.into_split();
    let (server_read, mut server_write) = server.into_split();
    let upload = async {
        let mut first = first;
        if inspect {
            match read_until_sniffed(&mut guest_read, &mut first).await? {
                Sniffed::Tls(Some(name)) => check_inner_name(&name, shared)?,
                Sniffed::Http(head) => {
                    if let Some(host) = head.host() {
                        check_inner_name(&host, shared)?;
                    }
                }
                _ => {}
            }
        }
        if !first.is_empty() {
            if let Some(bandwidth) = &shared.bandwidth {
                bandwidth.take(first.len()).await;
            }
            server_write.write_all(&first).await?;
            Counters::add(&shared.counters.bytes_out, first.len() as u64);
        }
        copy(guest_read, server_write, &shared.counters.bytes_out, shared).await
    };
    let download = copy(server_read, guest_write, &shared.counters.bytes_in, shared);
    tokio::try_join!(upload, download).map(|_| ())
}

fn check_inner_name(name: &str, shared: &Shared) -> io::Result<()> {
    shared.judge.check_name(name).map_err(|denial| {
        shared.blocked(name, &denial);
        io::Error::new(io::ErrorKind::PermissionDenied, denial.to_string())
    })
}

async fn copy<R, W>(
    mut from: R,
    mut to: W,
    counter: &std::sync::atomic::AtomicU64,
    shared: &Shared,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        if let Some(bandwidth) = &shared.bandwidth {
            bandwidth.take(n).await;
        }
        to.write_all(&buffer[..n]).await?;
        Counters::add(counter, n as u64);
    }
}

#[cfg(test)]
mod tests;

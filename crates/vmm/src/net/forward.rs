//! Published ports of a guest behind a tap device: a listener on the
//! host's loopback, whose connections are relayed to the guest from a
//! socket opened inside the sandbox's network namespace.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::accept::serve_each;
use super::netns::NetworkNamespace;
use super::GUEST_ADDR;

/// How long connecting to the guest's port may take. The guest is one hop
/// away, so only a guest that does not respond takes this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A published port being served; dropping it closes the listener and
/// every connection.
pub(crate) struct Forwarder {
    task: JoinHandle<()>,
}

impl Forwarder {
    /// Relays each connection `listener` accepts on the host to
    /// `guest_port` of the guest, connecting from inside `namespace`.
    pub fn start(
        listener: std::net::TcpListener,
        namespace: NetworkNamespace,
        guest_port: u16,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let task = tokio::spawn(serve_each(listener, "published port", move |client| {
            forward(client, namespace.clone(), guest_port)
        }));
        Ok(Self { task })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(mut client: TcpStream, namespace: NetworkNamespace, guest_port: u16) {
    let mut guest = match connect_guest(namespace, guest_port).await {
        Ok(guest) => guest,
        Err(err) => {
            tracing::debug!(
                guest_port,
                error = %err,
                "connecting to a published guest port failed"
            );
            return;
        }
    };
    if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut guest).await {
        tracing::debug!(
            guest_port,
            error = %err,
            "a published port connection ended with an error"
        );
    }
}

/// Connects to the guest's `port` from inside `namespace`. The connect
/// blocks a thread of its own, because the socket must be created by a
/// thread in the namespace.
async fn connect_guest(namespace: NetworkNamespace, port: u16) -> io::Result<TcpStream> {
    let address = SocketAddr::from((GUEST_ADDR, port));
    let stream = tokio::task::spawn_blocking(move || {
        namespace.enter(|| std::net::TcpStream::connect_timeout(&address, CONNECT_TIMEOUT))
    })
    .await
    .map_err(io::Error::other)??;
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}

//! The accept loop shared by every listener of a sandbox network.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinSet;

/// A listener the loop can accept from.
pub(crate) trait Listener: Send + 'static {
    type Stream: Send + 'static;

    fn accept_stream(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listener for TcpListener {
    type Stream = TcpStream;

    async fn accept_stream(&self) -> io::Result<TcpStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;

    async fn accept_stream(&self) -> io::Result<UnixStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Accepts connections until the calling task is aborted, and serves each
/// on a task of its own. Aborting the loop also aborts those tasks. A
/// failed accept, such as one out of file descriptors, is logged and
/// retried after a pause. `kind` names the connections in that log.
pub(crate) async fn serve_each<L, F, Fut>(listener: L, kind: &'static str, serve: F)
where
    L: Listener,
    F: Fn(L::Stream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    loop {
        let stream = match listener.accept_stream().await {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "accepting a {kind} connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Reap finished tasks so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(serve(stream));
    }
}

//! Adapters between the store's blocking readers and the agent's async transfers.
//!
//! NOTE: both adapters do their blocking file I/O inside `poll_*`. That is cheap for the
//! local files they wrap (store blobs and host temp files), but it holds the executor thread
//! for the duration of each read or write.

use std::fs::File;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An [`AsyncRead`] over a blocking reader of a local file.
pub(crate) struct BlockingReader<R>(pub R);

impl<R: Read + Unpin> AsyncRead for BlockingReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let read = self.0.read(buf.initialize_unfilled())?;
        buf.advance(read);
        Poll::Ready(Ok(()))
    }
}

/// An [`AsyncWrite`] into a host temp file that fails once more than `limit` bytes arrive,
/// so a guest cannot fill the host's disk through a download.
pub(crate) struct BoundedFile {
    pub file: File,
    pub written: u64,
    pub limit: u64,
}

impl BoundedFile {
    pub fn new(file: File, limit: u64) -> BoundedFile {
        BoundedFile {
            file,
            written: 0,
            limit,
        }
    }
}

/// Message of the error that [`BoundedFile`] returns when its limit is passed.
pub(crate) const OVER_LIMIT: &str = "file is larger than the limit";

impl AsyncWrite for BoundedFile {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.written + buf.len() as u64 > self.limit {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::FileTooLarge, OVER_LIMIT)));
        }
        let written = self.file.write(buf)?;
        self.written += written as u64;
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.file.flush())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

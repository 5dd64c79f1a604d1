//! The host side of the agent channel.
//!
//! One reader task decodes frames and routes them by stream id to the
//! request that owns the stream; writers share the write half behind a lock
//! so frames never interleave. Everything from the guest is untrusted:
//! frame sizes are bounded by the protocol crate, and frames for unknown
//! streams are dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use upstream_protocol::{
    DirEntry, ExecRequest, ExitStatus, Frame, FrameKind, Hello, Request, Response, HEADER_LEN,
    PROTOCOL_VERSION,
};

use crate::{Error, Result};

/// Frames buffered per stream before the reader task waits for the
/// consumer: at most this many chunks of output are held in memory.
const STREAM_BUFFER: usize = 64;

/// Chunk size for file uploads (below the protocol's frame limit).
const UPLOAD_CHUNK: usize = 256 * 1024;

enum Incoming {
    Data(FrameKind, Bytes),
    Response(Response),
}

type Routes = Arc<Mutex<HashMap<u32, mpsc::Sender<Incoming>>>>;

/// A connection to one guest agent.
pub struct AgentClient {
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    routes: Routes,
    next_stream: AtomicU32,
    hello: Hello,
    reader: tokio::task::JoinHandle<String>,
}

impl AgentClient {
    /// Waits for the agent's hello on `stream` and starts routing frames.
    pub async fn handshake(stream: UnixStream) -> Result<Self> {
        let (mut read_half, write_half) = stream.into_split();
        let frame = read_frame(&mut read_half)
            .await?
            .ok_or_else(|| Error::Protocol("channel closed before the agent's hello".into()))?;
        if frame.kind != FrameKind::Hello {
            return Err(Error::Protocol(format!(
                "expected hello, got {:?}",
                frame.kind
            )));
        }
        let hello: Hello = frame
            .parse()
            .map_err(|err| Error::Protocol(err.to_string()))?;
        Self::with_halves(read_half, write_half, hello)
    }

    /// Continues the session of an agent that already sent `hello`, as a
    /// guest restored from a snapshot has: its agent still has the channel
    /// open and waits for requests. Returns once the agent has replied to a ping.
    pub async fn resume(stream: UnixStream, hello: Hello) -> Result<Self> {
        let (read_half, write_half) = stream.into_split();
        let client = Self::with_halves(read_half, write_half, hello)?;
        client.ping().await?;
        Ok(client)
    }

    fn with_halves(
        read_half: OwnedReadHalf,
        write_half: OwnedWriteHalf,
        hello: Hello,
    ) -> Result<Self> {
        if hello.protocol != PROTOCOL_VERSION {
            return Err(Error::ProtocolMismatch {
                found: hello.protocol,
                expected: PROTOCOL_VERSION,
            });
        }
        let routes: Routes = Arc::default();
        let reader = tokio::spawn(route_frames(read_half, Arc::clone(&routes)));
        Ok(Self {
            writer: Arc::new(tokio::sync::Mutex::new(write_half)),
            routes,
            next_stream: AtomicU32::new(1),
            hello,
            reader,
        })
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Whether the channel to the agent is still open.
    pub fn is_connected(&self) -> bool {
        !self.reader.is_finished()
    }

    fn open_stream(&self) -> (u32, mpsc::Receiver<Incoming>) {
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        self.routes.lock().unwrap().insert(stream, sender);
        (stream, receiver)
    }

    async fn send(&self, frame: Frame) -> Result<()> {
        send_frame(&self.writer, frame).await
    }

    /// Sends a request and waits for its response, ignoring data frames.
    async fn call(&self, request: &Request) -> Result<Response> {
        let (stream, mut receiver) = self.open_stream();
        let result = async {
            self.send(Frame::json(FrameKind::Request, stream, request))
                .await?;
            loop {
                match receiver.recv().await {
                    Some(Incoming::Response(response)) => return into_result(response),
                    Some(Incoming::Data(..)) => continue,
                    None => return Err(channel_closed()),
                }
            }
        }
        .await;
        self.routes.lock().unwrap().remove(&stream);
        result
    }

    /// Round trip of a no-op request.
    pub async fn ping(&self) -> Result<Duration> {
        let started = Instant::now();
        self.call(&Request::Ping).await?;
        Ok(started.elapsed())
    }

    /// Starts a command; its output and exit arrive through the handle.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecHandle> {
        let (stream, receiver) = self.open_stream();
        let wants_stdin = request.stdin;
        self.send(Frame::json(
            FrameKind::Request,
            stream,
            &Request::Exec(request),
        ))
        .await?;
        Ok(ExecHandle {
            stream,
            receiver,
            writer: Arc::clone(&self.writer),
            routes: Arc::clone(&self.routes),
            stdin_open: wants_stdin,
        })
    }

    /// Writes `data` to `path` in the guest, replacing it atomically.
    pub async fn write_file(
        &self,
        path: &str,
        mode: u32,
        mut data: impl AsyncRead + Unpin,
    ) -> Result<u64> {
        let (stream, mut receiver) = self.open_stream();
        let request = Request::WriteFile {
            path: path.to_string(),
            mode,
        };
        let result = async {
            self.send(Frame::json(FrameKind::Request, stream, &request))
                .await?;
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            let mut total = 0u64;
            loop {
                let n = data
                    .read(&mut buf)
                    .await
                    .map_err(Error::io("reading upload data"))?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                self.send(Frame::new(FrameKind::FileData, stream, buf[..n].to_vec()))
                    .await?;
            }
            self.send(Frame::new(FrameKind::FileEnd, stream, Vec::new()))
                .await?;
            match receiver.recv().await {
                Some(Incoming::Response(response)) => into_result(response).map(|_| total),
                _ => Err(channel_closed()),
            }
        }
        .await;
        self.routes.lock().unwrap().remove(&stream);
        result
    }

    /// Copies the guest file at `path` into `sink`; returns its size.
    pub async fn read_file(&self, path: &str, mut sink: impl AsyncWrite + Unpin) -> Result<u64> {
        let (stream, mut receiver) = self.open_stream();
        let request = Request::ReadFile {
            path: path.to_string(),
        };
        let result = async {
            self.send(Frame::json(FrameKind::Request, stream, &request))
                .await?;
            let mut received = 0u64;
            loop {
                match receiver.recv().await {
                    Some(Incoming::Data(FrameKind::FileData, data)) => {
                        received += data.len() as u64;
                        sink.write_all(&data)
                            .await
                            .map_err(Error::io("writing download data"))?;
                    }
                    Some(Incoming::Data(..)) => {}
                    Some(Incoming::Response(response)) => {
                        if let Response::FileSent { size } = into_result(response)? {
                            if size != received {
                                let message = format!(
                                    "agent sent {received} bytes of {path}, announced {size}"
                                );
                                return Err(Error::Protocol(message));
                            }
                        }
                        sink.flush()
                            .await
                            .map_err(Error::io("writing download data"))?;
                        return Ok(received);
                    }
                    None => return Err(channel_closed()),
                }
            }
        }
        .await;
        self.routes.lock().unwrap().remove(&stream);
        result
    }

    pub async fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>> {
        match self
            .call(&Request::ListDir {
                path: path.to_string(),
            })
            .await?
        {
            Response::Dir { entries } => Ok(entries),
            other => Err(unexpected(other)),
        }
    }

    pub async fn remove(&self, path: &str) -> Result<()> {
        self.call(&Request::Remove {
            path: path.to_string(),
        })
        .await
        .map(drop)
    }

    /// Sets the guest clock, reseeds its RNG and sets its host name.
    pub async fn refresh(&self, entropy: Vec<u8>, hostname: &str) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let request = Request::Refresh {
            unix_time_ns: now.as_nanos() as u64,
            entropy,
            hostname: hostname.to_string(),
        };
        self.call(&request).await.map(drop)
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A command running in the guest.
pub struct ExecHandle {
    stream: u32,
    receiver: mpsc::Receiver<Incoming>,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    routes: Routes,
    stdin_open: bool,
}

/// What a running command produced next.
#[derive(Debug)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExitStatus),
}

impl ExecHandle {
    /// The next chunk of output, or the exit status (always last).
    pub async fn next_event(&mut self) -> Result<ExecEvent> {
        loop {
            match self.receiver.recv().await {
                Some(Incoming::Data(FrameKind::Stdout, data)) => {
                    return Ok(ExecEvent::Stdout(data))
                }
                Some(Incoming::Data(FrameKind::Stderr, data)) => {
                    return Ok(ExecEvent::Stderr(data))
                }
                Some(Incoming::Data(..)) => continue,
                Some(Incoming::Response(Response::Exited(status))) => {
                    return Ok(ExecEvent::Exit(status))
                }
                Some(Incoming::Response(other)) => {
                    return Err(into_result(other).err().unwrap_or_else(unexpected_exec))
                }
                None => return Err(channel_closed()),
            }
        }
    }

    /// A handle that feeds the command's stdin from another task.
    pub fn stdin_writer(&self) -> StdinWriter {
        StdinWriter {
            stream: self.stream,
            writer: Arc::clone(&self.writer),
        }
    }

    /// Sends bytes to the command's stdin.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<()> {
        self.stdin_writer().write(data).await
    }

    /// Closes the command's stdin.
    pub async fn close_stdin(&mut self) -> Result<()> {
        if std::mem::take(&mut self.stdin_open) {
            send_frame(
                &self.writer,
                Frame::new(FrameKind::StdinEof, self.stream, Vec::new()),
            )
            .await?;
        }
        Ok(())
    }

    /// The stream id, for [`AgentClient`] requests that name this command.
    pub fn stream(&self) -> u32 {
        self.stream
    }

    /// Sends a signal to the command's process group.
    pub async fn signal(&self, signal: i32) -> Result<()> {
        let request = Request::Signal {
            target: self.stream,
            signal,
        };
        // The reply arrives on a stream this handle does not own, so it is
        // sent fire-and-forget on a fresh id with no route: the agent's
        // response is dropped by the router.
        send_frame(
            &self.writer,
            Frame::json(FrameKind::Request, u32::MAX - self.stream, &request),
        )
        .await
    }

    /// Collects everything until exit: stdout, stderr and the status.
    pub async fn collect(mut self) -> Result<(Vec<u8>, Vec<u8>, ExitStatus)> {
        let _ = self.close_stdin().await;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            match self.next_event().await? {
                ExecEvent::Stdout(data) => stdout.extend_from_slice(&data),
                ExecEvent::Stderr(data) => stderr.extend_from_slice(&data),
                ExecEvent::Exit(status) => return Ok((stdout, stderr, status)),
            }
        }
    }
}

/// Feeds one command's stdin; see [`ExecHandle::stdin_writer`].
pub struct StdinWriter {
    stream: u32,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
}

impl StdinWriter {
    pub async fn write(&self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(UPLOAD_CHUNK) {
            send_frame(
                &self.writer,
                Frame::new(FrameKind::Stdin, self.stream, chunk.to_vec()),
            )
            .await?;
        }
        Ok(())
    }

    /// Sends end-of-file.
    pub async fn close(&self) -> Result<()> {
        send_frame(
            &self.writer,
            Frame::new(FrameKind::StdinEof, self.stream, Vec::new()),
        )
        .await
    }
}

impl Drop for ExecHandle {
    fn drop(&mut self) {
        self.routes.lock().unwrap().remove(&self.stream);
    }
}

async fn send_frame(writer: &tokio::sync::Mutex<OwnedWriteHalf>, frame: Frame) -> Result<()> {
    let buf = frame.encode();
    let mut writer = writer.lock().await;
    writer.write_all(&buf).await.map_err(|_| channel_closed())
}

async fn read_frame(reader: &mut OwnedReadHalf) -> Result<Option<Frame>> {
    let mut header = [0u8; HEADER_LEN];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(Error::io("reading from the agent")(err)),
    }
    let (kind, stream, len) =
        Frame::parse_header(&header).map_err(|err| Error::Protocol(err.to_string()))?;
    let mut payload = vec![0u8; len];
    reader
        .read_exact(&mut payload)
        .await
        .map_err(Error::io("reading from the agent"))?;
    Ok(Some(Frame {
        kind,
        stream,
        payload,
    }))
}

/// Routes frames until the channel closes or breaks; returns why it ended.
async fn route_frames(mut reader: OwnedReadHalf, routes: Routes) -> String {
    let reason = loop {
        let frame = match read_frame(&mut reader).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break "channel closed".to_string(),
            Err(err) => break err.to_string(),
        };
        let incoming = match frame.kind {
            FrameKind::Response => match frame.parse::<Response>() {
                Ok(response) => Incoming::Response(response),
                Err(err) => break format!("invalid response from the agent: {err}"),
            },
            FrameKind::Stdout | FrameKind::Stderr | FrameKind::FileData => {
                Incoming::Data(frame.kind, Bytes::from(frame.payload))
            }
            _ => continue,
        };
        let route = routes.lock().unwrap().get(&frame.stream).cloned();
        if let Some(route) = route {
            // A consumer that went away just loses its frames.
            let _ = route.send(incoming).await;
        }
    };
    // Wake every waiter: dropping the senders ends their receivers.
    routes.lock().unwrap().clear();
    reason
}

fn into_result(response: Response) -> Result<Response> {
    match response {
        Response::Error { kind, message } => Err(Error::Guest { kind, message }),
        other => Ok(other),
    }
}

fn unexpected(response: Response) -> Error {
    Error::Protocol(format!("unexpected response {response:?}"))
}

fn unexpected_exec() -> Error {
    Error::Protocol("unexpected response to a command".into())
}

fn channel_closed() -> Error {
    Error::Protocol("the connection to the guest agent closed".into())
}

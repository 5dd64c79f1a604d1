//! Commands started through the API: their output log, exit, stdin and signals.
//!
//! Each command gets a [`Process`] and a pump task that moves the guest's output into the
//! process's [`OutputLog`]. Readers never talk to the guest: a blocking exec waits for the
//! exit in the log, and a stream (first attach or reattach) replays the log from a
//! sequence number and then follows it. The log keeps only the last `max_output_bytes` of
//! output, so a chatty command cannot exhaust the server's memory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use upstream_client::api;
use upstream_protocol::ErrorKind;
use upstream_vmm::{ExecEvent, ExecHandle, ExitStatus, StdinWriter};

/// SIGKILL, sent when a command is cancelled.
const SIGKILL: i32 = 9;

/// How long a killed command may take to report its exit before the pump gives up.
const KILL_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Which output stream a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    Stdout,
    Stderr,
}

/// One chunk of output with its sequence number (from 1).
#[derive(Clone, Debug)]
pub struct Chunk {
    pub seq: u64,
    pub channel: Channel,
    pub data: Bytes,
}

/// How a process ended.
#[derive(Clone, Debug)]
pub enum Ending {
    Exited(ExitStatus),
    /// The command could not start, or the guest connection failed before its exit was
    /// known.
    Failed(Failure),
}

/// Why a command has no exit status.
#[derive(Clone, Debug)]
pub struct Failure {
    /// Set when the guest rejected the command, for example because it was not found.
    pub guest: Option<ErrorKind>,
    pub message: String,
}

impl Failure {
    fn from_error(err: upstream_vmm::Error) -> Self {
        let guest = match &err {
            upstream_vmm::Error::Guest { kind, .. } => Some(*kind),
            _ => None,
        };
        Self {
            guest,
            message: err.to_string(),
        }
    }
}

/// The bounded output of one process and its ending.
#[derive(Debug, Default)]
pub struct OutputLog {
    chunks: VecDeque<Chunk>,
    last_seq: u64,
    kept_bytes: u64,
    dropped_bytes: u64,
    max_bytes: u64,
    ending: Option<Ending>,
}

impl OutputLog {
    /// Returns the state, exit and error of the process, as the API reports them.
    fn state(
        &self,
    ) -> (
        api::ProcessState,
        Option<api::ExitInfo>,
        Option<api::ErrorDetail>,
    ) {
        match &self.ending {
            None => (api::ProcessState::Running, None, None),
            Some(Ending::Exited(status)) => {
                (api::ProcessState::Exited, Some(exit_info(status)), None)
            }
            Some(Ending::Failed(failure)) => (
                api::ProcessState::Failed,
                None,
                Some(crate::api::ApiError::from_failure(failure).detail()),
            ),
        }
    }
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            ..Self::default()
        }
    }

    fn push(&mut self, channel: Channel, data: Bytes) {
        self.last_seq += 1;
        self.kept_bytes += data.len() as u64;
        self.chunks.push_back(Chunk {
            seq: self.last_seq,
            channel,
            data,
        });
        while self.kept_bytes > self.max_bytes {
            let Some(oldest) = self.chunks.pop_front() else {
                break;
            };
            self.kept_bytes -= oldest.data.len() as u64;
            self.dropped_bytes += oldest.data.len() as u64;
        }
    }

    /// Kept chunks with a sequence number above `after`.
    pub fn chunks_after(&self, after: u64) -> Vec<Chunk> {
        self.chunks
            .iter()
            .filter(|chunk| chunk.seq > after)
            .cloned()
            .collect()
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn ending(&self) -> Option<&Ending> {
        self.ending.as_ref()
    }

    /// Kept stdout and stderr, each concatenated.
    fn collected(&self) -> (Vec<u8>, Vec<u8>) {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        for chunk in &self.chunks {
            match chunk.channel {
                Channel::Stdout => stdout.extend_from_slice(&chunk.data),
                Channel::Stderr => stderr.extend_from_slice(&chunk.data),
            }
        }
        (stdout, stderr)
    }
}

/// A command started in a sandbox.
pub struct Process {
    pub id: String,
    pub command: Vec<String>,
    pub background: bool,
    started_at: SystemTime,
    log: Mutex<OutputLog>,
    /// Bumped after every change of `log`; readers wait on it.
    changed: watch::Sender<u64>,
    stdin: tokio::sync::Mutex<Option<StdinWriter>>,
    signals: mpsc::UnboundedSender<i32>,
    /// Fires when the process must be killed: sandbox destroyed or server stopping.
    cancel: CancellationToken,
}

impl Process {
    /// Starts the pump for `handle` and returns the process. `parent` cancels it.
    pub fn start(
        id: String,
        command: Vec<String>,
        background: bool,
        handle: ExecHandle,
        keep_stdin: bool,
        max_output_bytes: u64,
        parent: &CancellationToken,
    ) -> Arc<Self> {
        let (signals, signal_receiver) = mpsc::unbounded_channel();
        let stdin = keep_stdin.then(|| handle.stdin_writer());
        let process = Arc::new(Self {
            id,
            command,
            background,
            started_at: SystemTime::now(),
            log: Mutex::new(OutputLog::new(max_output_bytes)),
            changed: watch::channel(0).0,
            stdin: tokio::sync::Mutex::new(stdin),
            signals,
            cancel: parent.child_token(),
        });
        tokio::spawn(pump(Arc::clone(&process), handle, signal_receiver));
        process
    }

    /// Sends `signal` to the command's process group.
    pub fn signal(&self, signal: i32) {
        let _ = self.signals.send(signal);
    }

    /// Kills the command (SIGKILL to its process group).
    pub fn kill(&self) {
        self.cancel.cancel();
    }

    pub fn is_running(&self) -> bool {
        self.log.lock().unwrap().ending.is_none()
    }

    /// Writes to the command's stdin and, when `eof`, closes it.
    pub async fn write_stdin(&self, data: &[u8], eof: bool) -> Result<(), StdinError> {
        let mut stdin = self.stdin.lock().await;
        let Some(writer) = stdin.as_ref() else {
            return Err(StdinError::Closed);
        };
        if !data.is_empty() {
            writer
                .write(data)
                .await
                .map_err(|err| StdinError::Guest(err.to_string()))?;
        }
        if eof {
            let _ = writer.close().await;
            *stdin = None;
        }
        Ok(())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Reads the log under its lock.
    pub fn with_log<T>(&self, read: impl FnOnce(&OutputLog) -> T) -> T {
        read(&self.log.lock().unwrap())
    }

    /// Waits until the process has ended.
    pub async fn wait(&self) {
        let mut changed = self.subscribe();
        while self.is_running() {
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn summary(&self) -> api::Process {
        let log = self.log.lock().unwrap();
        let (state, exit, error) = log.state();
        api::Process {
            id: self.id.clone(),
            command: self.command.clone(),
            background: self.background,
            state,
            exit,
            error,
            last_seq: log.last_seq,
            started_at: crate::rfc3339(self.started_at),
        }
    }

    /// Output kept so far and the exit, if any.
    pub fn result(&self) -> api::ExecResult {
        let log = self.log.lock().unwrap();
        let (stdout, stderr) = log.collected();
        let (stdout, stdout_encoding) = api::encode(&stdout);
        let (stderr, stderr_encoding) = api::encode(&stderr);
        let (state, exit, error) = log.state();
        api::ExecResult {
            process_id: self.id.clone(),
            state,
            exit,
            error,
            stdout,
            stdout_encoding,
            stderr,
            stderr_encoding,
            dropped_bytes: log.dropped_bytes,
        }
    }

    fn record(&self, change: impl FnOnce(&mut OutputLog)) {
        change(&mut self.log.lock().unwrap());
        self.changed.send_modify(|version| *version += 1);
    }
}

/// Why stdin could not be written.
#[derive(Debug, thiserror::Error)]
pub enum StdinError {
    #[error("stdin of this process is closed; start it with keep_stdin_open to write to it")]
    Closed,
    #[error("writing stdin failed: {0}")]
    Guest(String),
}

pub fn exit_info(status: &ExitStatus) -> api::ExitInfo {
    api::ExitInfo {
        exit_code: status.code,
        signal: status.signal,
        timed_out: status.timed_out,
        duration_secs: status.duration_us as f64 / 1e6,
    }
}

/// Moves events from the guest into the log until the command exits. Signals and
/// cancellation are forwarded to the guest; a cancelled command that does not report its
/// exit within `KILL_GRACE` is recorded as failed.
async fn pump(
    process: Arc<Process>,
    mut handle: ExecHandle,
    mut signals: mpsc::UnboundedReceiver<i32>,
) {
    let mut kill_deadline: Option<Instant> = None;
    let ending = loop {
        let grace = async {
            match kill_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = handle.next_event() => match event {
                Ok(ExecEvent::Stdout(data)) => process.record(|log| log.push(Channel::Stdout, data)),
                Ok(ExecEvent::Stderr(data)) => process.record(|log| log.push(Channel::Stderr, data)),
                Ok(ExecEvent::Exit(status)) => break Ending::Exited(status),
                Err(err) => break Ending::Failed(Failure::from_error(err)),
            },
            Some(signal) = signals.recv() => {
                if let Err(err) = handle.signal(signal).await {
                    break Ending::Failed(Failure::from_error(err));
                }
            }
            _ = process.cancel.cancelled(), if kill_deadline.is_none() => {
                kill_deadline = Some(Instant::now() + KILL_GRACE);
                let _ = handle.signal(SIGKILL).await;
            }
            _ = grace => break Ending::Failed(Failure {
                guest: None,
                message: "the command did not exit after SIGKILL".into(),
            }),
        }
    };
    if let Ending::Failed(failure) = &ending {
        if failure.guest.is_none() {
            tracing::warn!(process = %process.id, reason = %failure.message, "lost a command's exit");
        }
    }
    *process.stdin.lock().await = None;
    process.record(|log| log.ending = Some(ending));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_drops_oldest_output_over_limit() {
        let mut log = OutputLog::new(10);
        log.push(Channel::Stdout, Bytes::from_static(b"aaaa"));
        log.push(Channel::Stderr, Bytes::from_static(b"bbbb"));
        log.push(Channel::Stdout, Bytes::from_static(b"cccc"));

        let (stdout, stderr) = log.collected();

        assert_eq!(stdout, b"cccc");
        assert_eq!(stderr, b"bbbb");
        assert_eq!(log.dropped_bytes, 4);
        assert_eq!(log.last_seq(), 3);
    }

    #[test]
    fn log_replays_after_sequence() {
        let mut log = OutputLog::new(1024);
        for text in ["one", "two", "three"] {
            log.push(Channel::Stdout, Bytes::from(text));
        }

        let replay = log.chunks_after(1);

        assert_eq!(replay.len(), 2);
        assert_eq!(replay[0].seq, 2);
        assert_eq!(&replay[1].data[..], b"three");
    }
}

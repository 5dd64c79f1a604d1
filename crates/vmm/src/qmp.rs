//! A minimal client for QEMU's machine protocol (QMP): JSON commands over
//! the Unix socket that `-qmp unix:PATH,server=on` opens.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::{Error, Result};

/// Bytes of one QMP message beyond which the connection is treated as
/// broken; QEMU's replies to the commands used here are under 4 KiB.
const MAX_LINE: usize = 1 << 20;

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, retrying until QEMU listens on
    /// it or `timeout` passes, and leaves capability negotiation mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(err) if Instant::now() < deadline && is_not_listening(&err) => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(err) => {
                    return Err(Error::io(format!(
                        "connecting to QMP at {}",
                        path.display()
                    ))(err))
                }
            }
        };
        let (read_half, writer) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(read_half),
            writer,
        };
        // The greeting names QEMU's version; nothing here depends on it.
        qmp.read_message().await?;
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value; events that arrive
    /// in between are skipped.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let mut line = serde_json::to_vec(&json!({"execute": command, "arguments": arguments}))
            .expect("QMP commands serialize");
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .await
            .map_err(Error::io(format!("sending QMP command {command}")))?;
        loop {
            let mut message = self.read_message().await?;
            if let Some(value) = message.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = message.get("error") {
                let description = error["desc"].as_str().unwrap_or("no description");
                return Err(Error::Qmp {
                    command: command.to_string(),
                    message: description.to_string(),
                });
            }
        }
    }

    /// Polls `query-migrate` until the migration ends; fails when it failed
    /// or `timeout` passed.
    pub async fn wait_for_migration(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.execute("query-migrate", json!({})).await?;
            match status["status"].as_str().unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let reason = status["error-desc"].as_str().unwrap_or("no reason given");
                    return Err(Error::Qmp {
                        command: "migrate".into(),
                        message: reason.to_string(),
                    });
                }
                _ if Instant::now() > deadline => {
                    return Err(Error::Qmp {
                        command: "migrate".into(),
                        message: format!("not finished after {timeout:?}"),
                    })
                }
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    /// Polls `query-status` until the guest runs; fails when QEMU reports
    /// that the incoming migration failed or `timeout` passed.
    pub async fn wait_until_running(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.execute("query-status", json!({})).await?;
            match status["status"].as_str().unwrap_or("") {
                "running" => return Ok(()),
                "inmigrate" | "prelaunch" | "paused" if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                other => {
                    return Err(Error::Qmp {
                        command: "migrate-incoming".into(),
                        message: format!("the guest is in state '{other}' instead of running"),
                    })
                }
            }
        }
    }

    async fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let read = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await
            .map_err(Error::io("reading from QMP"))?;
        if read == 0 {
            return Err(Error::Qmp {
                command: "connect".into(),
                message: "QEMU closed the QMP connection".into(),
            });
        }
        serde_json::from_str(&line).map_err(|err| Error::Qmp {
            command: "read".into(),
            message: format!("invalid reply: {err}"),
        })
    }
}

fn is_not_listening(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

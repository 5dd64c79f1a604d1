//! Reading the Server-Sent Events of an exec stream.

use reqwest::Response;

use crate::api;
use crate::{ClientError, Result};

/// One event of an exec stream.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    /// First event: the process, to reattach to or kill.
    Started {
        process_id: String,
    },
    Stdout {
        seq: u64,
        data: Vec<u8>,
    },
    Stderr {
        seq: u64,
        data: Vec<u8>,
    },
    /// Last event of a command that ended.
    Exit(api::ExitInfo),
    /// Last event of a command whose exit is unknown, such as one not found in the image.
    Error(api::ErrorDetail),
}

/// The events of one running command, in order.
pub struct ExecStream {
    response: Response,
    buffer: Vec<u8>,
    done: bool,
}

impl ExecStream {
    pub(crate) fn new(response: Response) -> Self {
        Self {
            response,
            buffer: Vec::new(),
            done: false,
        }
    }

    /// The next event, or `None` after the last one.
    pub async fn next_event(&mut self) -> Result<Option<StreamEvent>> {
        loop {
            if let Some(block) = self.take_block() {
                if let Some(event) = parse_block(&block)? {
                    if matches!(event, StreamEvent::Exit(_) | StreamEvent::Error(_)) {
                        self.done = true;
                    }
                    return Ok(Some(event));
                }
                continue;
            }
            if self.done {
                return Ok(None);
            }
            match self.response.chunk().await? {
                Some(chunk) => self.buffer.extend_from_slice(&chunk),
                None => {
                    return Err(ClientError::InvalidResponse(
                        "the event stream ended before the command's exit".into(),
                    ))
                }
            }
        }
    }

    /// Removes and returns the first complete event block (up to a blank line).
    fn take_block(&mut self) -> Option<String> {
        let text = &self.buffer;
        let end = text.windows(2).position(|pair| pair == b"\n\n")?;
        let block = String::from_utf8_lossy(&text[..end]).replace('\r', "");
        self.buffer.drain(..end + 2);
        Some(block)
    }
}

/// Parses one SSE block; comments and keep-alives give `None`.
fn parse_block(block: &str) -> Result<Option<StreamEvent>> {
    let mut name = "message";
    let mut data = String::new();
    for line in block.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            name = value.trim();
        } else if let Some(value) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    if data.is_empty() {
        return Ok(None);
    }
    let invalid = |err: serde_json::Error| {
        ClientError::InvalidResponse(format!("invalid {name} event: {err}"))
    };
    let output = |data: &str| -> Result<(u64, Vec<u8>)> {
        let event: api::OutputEvent = serde_json::from_str(data).map_err(invalid)?;
        let bytes = api::decode(&event.data, event.encoding)
            .map_err(|err| ClientError::InvalidResponse(err.to_string()))?;
        Ok((event.seq, bytes))
    };
    let event = match name {
        "started" => {
            let started: api::StartedEvent = serde_json::from_str(&data).map_err(invalid)?;
            StreamEvent::Started {
                process_id: started.process_id,
            }
        }
        "stdout" => {
            let (seq, data) = output(&data)?;
            StreamEvent::Stdout { seq, data }
        }
        "stderr" => {
            let (seq, data) = output(&data)?;
            StreamEvent::Stderr { seq, data }
        }
        "exit" => StreamEvent::Exit(serde_json::from_str(&data).map_err(invalid)?),
        "error" => StreamEvent::Error(serde_json::from_str(&data).map_err(invalid)?),
        _ => return Ok(None),
    };
    Ok(Some(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdout_block_decodes_base64() {
        let block =
            "event: stdout\nid: 3\ndata: {\"seq\":3,\"data\":\"/w==\",\"encoding\":\"base64\"}";
        let event = parse_block(block).unwrap().unwrap();
        assert_eq!(
            event,
            StreamEvent::Stdout {
                seq: 3,
                data: vec![0xff]
            }
        );
    }

    #[test]
    fn keep_alive_block_is_skipped() {
        assert_eq!(parse_block(":").unwrap(), None);
    }

    #[test]
    fn exit_block_parses() {
        let block = "event: exit\ndata: {\"exit_code\":0,\"signal\":null,\"timed_out\":false,\"duration_secs\":0.5}";
        let event = parse_block(block).unwrap().unwrap();
        assert!(matches!(event, StreamEvent::Exit(info) if info.exit_code == Some(0)));
    }
}

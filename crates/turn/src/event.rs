//! Events of a running turn, for progress display and for `--json`.
//!
//! Serialised, every event is one JSON object `{"type": ..., "data": ...}`; `upstream run
//! --json` prints one per line:
//!
//! | `type`           | `data`                                                          |
//! |------------------|-----------------------------------------------------------------|
//! | `turn_started`   | `turn`, `context`, `document`, `image`, `steps`                 |
//! | `image_pull`     | `reference`, `state` (`started`, `done`, `failed`)              |
//! | `context_loaded` | `artifacts`, `turns`                                            |
//! | `step_started`   | `step` (from 1), `label`                                        |
//! | `step_output`    | `step`, `stream` (`stdout`/`stderr`), `data`                    |
//! | `step_finished`  | `step`, `label`, `state`, `exit_code`, `duration_ms`            |
//! | `warning`        | `message`                                                       |
//! | `turn_finished`  | `outcome`, `turn` (the stored record with steps and artifacts), |
//! |                  | `document`, `written_to`                                        |
//!
//! Output `data` is `{"text": "..."}` when the chunk is valid UTF-8 and `{"bytes": "..."}`
//! with standard base64 otherwise. A chunk boundary can split a UTF-8 sequence, so a
//! multi-byte character may arrive as two `bytes` chunks.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use serde::{Serialize, Serializer};
use upstream_store::TurnDetail;

/// Something that happened during a turn, in the order it happened.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum TurnEvent {
    /// The turn holds its context and is about to prepare the image and sandbox.
    TurnStarted {
        turn: String,
        context: String,
        document: PathBuf,
        image: String,
        steps: usize,
    },
    /// Progress of an image pull; sent only when the image is not local.
    ImagePull { reference: String, state: PullState },
    /// Earlier turns' artifacts are in the sandbox under `$UPSTREAM_CONTEXT`. Sent only when
    /// the context has earlier turns.
    ContextLoaded { artifacts: usize, turns: usize },
    /// A step started running.
    StepStarted { step: usize, label: String },
    /// A chunk of a step's output.
    StepOutput {
        step: usize,
        stream: OutputStream,
        data: OutputData,
    },
    /// A step ended, or was skipped or not run.
    StepFinished {
        step: usize,
        label: String,
        state: StepOutcome,
        exit_code: Option<i32>,
        #[serde(serialize_with = "as_millis")]
        duration_ms: Duration,
    },
    /// A problem that did not stop the turn, such as an artifact over a limit.
    Warning { message: String },
    /// The turn ended and is recorded.
    TurnFinished {
        outcome: TurnOutcomeKind,
        turn: Box<TurnDetail>,
        document: PathBuf,
        /// File the document with results was written to, if any.
        written_to: Option<PathBuf>,
    },
}

/// Stages of an image pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PullState {
    Started,
    Done,
    Failed,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A chunk of output bytes, serialised as text or base64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputData(pub Bytes);

impl Serialize for OutputData {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(1))?;
        match std::str::from_utf8(&self.0) {
            Ok(text) => map.serialize_entry("text", text)?,
            Err(_) => map.serialize_entry(
                "bytes",
                &base64::engine::general_purpose::STANDARD.encode(&self.0),
            )?,
        }
        map.end()
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    Succeeded,
    /// Exited non-zero.
    Failed,
    /// Killed at its time limit.
    TimedOut,
    /// The run was interrupted while the step ran.
    Interrupted,
    /// Marked `skip` in the document.
    Skipped,
    /// Not run because an earlier step failed or the run was interrupted.
    NotRun,
}

/// How a turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnOutcomeKind {
    /// Every step that ran succeeded, or failed with `continue-on-error`.
    Succeeded,
    /// A step failed or timed out and stopped the turn.
    Failed,
    /// The run was cancelled, for example by Ctrl-C.
    Interrupted,
}

fn as_millis<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_as_type_and_data() {
        let event = TurnEvent::StepStarted {
            step: 1,
            label: "echo hi".into(),
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(
            json,
            r#"{"type":"step_started","data":{"step":1,"label":"echo hi"}}"#
        );
    }

    #[test]
    fn utf8_output_is_text() {
        let event = TurnEvent::StepOutput {
            step: 2,
            stream: OutputStream::Stderr,
            data: OutputData(Bytes::from_static("é\n".as_bytes())),
        };
        let json = serde_json::to_string(&event).unwrap();
        assert!(
            json.contains(r#""stream":"stderr","data":{"text":"é\n"}"#),
            "{json}"
        );
    }

    #[test]
    fn binary_output_is_base64() {
        let data = OutputData(Bytes::from_static(&[0xff, 0x00, 0x41]));
        let json = serde_json::to_string(&data).unwrap();
        assert_eq!(json, r#"{"bytes":"/wBB"}"#);
    }

    #[test]
    fn durations_are_milliseconds() {
        let event = TurnEvent::StepFinished {
            step: 1,
            label: "x".into(),
            state: StepOutcome::TimedOut,
            exit_code: Some(137),
            duration_ms: Duration::from_millis(1500),
        };
        let json = serde_json::to_string(&event).unwrap();
        assert!(json.contains(r#""state":"timed_out","exit_code":137,"duration_ms":1500"#));
    }
}

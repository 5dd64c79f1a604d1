//! Request and response bodies of the `/v1` API, shared by the server and the client.
//!
//! Every field here is described in `crates/server/openapi.json`; the server's tests check
//! real responses against that document.
//!
//! Command output travels as text when it is valid UTF-8 and as base64 otherwise: every
//! output field comes with an `*_encoding` field of type [`Encoding`], and
//! [`decode`] turns the pair back into bytes.

use std::collections::BTreeMap;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// How a byte string is carried in a JSON string.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// The bytes are valid UTF-8 and sent as they are.
    #[default]
    Utf8,
    /// The bytes are standard base64 with padding.
    Base64,
}

/// Encodes `bytes` as UTF-8 text when valid, else as base64.
pub fn encode(bytes: &[u8]) -> (String, Encoding) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_string(), Encoding::Utf8),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(bytes),
            Encoding::Base64,
        ),
    }
}

/// Decodes a string sent with `encoding` back into bytes.
pub fn decode(text: &str, encoding: Encoding) -> Result<Vec<u8>, base64::DecodeError> {
    match encoding {
        Encoding::Utf8 => Ok(text.as_bytes().to_vec()),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD.decode(text),
    }
}

/// Body of `POST /v1/sandboxes`. Every field is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Image reference (default: `base`, the image built by `upstream setup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u32>,
    /// Variables added to the image's environment for every command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Destroy the sandbox this many seconds after creation (default: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Labels for listing and usage reports.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// Lifecycle state of a sandbox as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    Running,
    Destroying,
}

/// A sandbox as returned by create, get and list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: String,
    pub image: String,
    pub state: SandboxState,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
    pub metadata: BTreeMap<String, String>,
    /// RFC 3339 time of creation (UTC).
    pub created_at: String,
    /// Seconds from the create request until the guest agent was ready.
    pub boot_secs: f64,
    /// The timeout last set, in seconds from when it was set; `None` means no timeout.
    pub timeout_secs: Option<u64>,
    /// RFC 3339 time at which the sandbox is destroyed, when a timeout is set.
    pub expires_at: Option<String>,
}

/// Body of `GET /v1/sandboxes`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
}

/// Body of `POST /v1/sandboxes/{id}/timeout`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetTimeout {
    /// Seconds from now until the sandbox is destroyed; `null` removes the timeout.
    pub timeout_secs: Option<u64>,
}

/// Body of `POST /v1/sandboxes/{id}/exec` and `.../exec/stream`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// Program and arguments; the program is looked up in `PATH` when it has no slash.
    pub command: Vec<String>,
    /// Variables added for this command; they override the sandbox's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the image's); created when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Bytes written to stdin before it is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(default, skip_serializing_if = "is_utf8")]
    pub stdin_encoding: Encoding,
    /// Keep stdin open after `stdin` for `POST .../processes/{pid}/stdin` (background
    /// commands only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub keep_stdin_open: bool,
    /// Kill the command's process group after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Return at once with the process; read its output later through `/processes`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub background: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_utf8(encoding: &Encoding) -> bool {
    *encoding == Encoding::Utf8
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, when the command exited by itself.
    pub exit_code: Option<i32>,
    /// Signal number, when a signal ended the command.
    pub signal: Option<i32>,
    /// Whether the command's timeout killed it.
    pub timed_out: bool,
    /// Seconds from start to exit.
    pub duration_secs: f64,
}

/// Body returned by `POST /v1/sandboxes/{id}/exec` for a command run to its end, and by
/// `GET .../processes/{pid}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecResult {
    pub process_id: String,
    pub state: ProcessState,
    /// `None` while the command runs, and when it failed.
    pub exit: Option<ExitInfo>,
    /// Why the command failed (state `failed`): it could not start, such as
    /// `command_not_found`, or the guest connection broke.
    pub error: Option<ErrorDetail>,
    pub stdout: String,
    pub stdout_encoding: Encoding,
    pub stderr: String,
    pub stderr_encoding: Encoding,
    /// Bytes of output dropped from the start because the server keeps only the last
    /// `max_output_bytes` of each command.
    pub dropped_bytes: u64,
}

impl ExecResult {
    /// The exit code a shell would report: the code, 128 + signal, or `None` while running.
    pub fn shell_code(&self) -> Option<i32> {
        let exit = self.exit.as_ref()?;
        Some(match (exit.exit_code, exit.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 255,
        })
    }

    pub fn stdout_bytes(&self) -> Vec<u8> {
        decode(&self.stdout, self.stdout_encoding).unwrap_or_default()
    }

    pub fn stderr_bytes(&self) -> Vec<u8> {
        decode(&self.stderr, self.stderr_encoding).unwrap_or_default()
    }
}

/// State of a process started by exec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessState {
    Running,
    Exited,
    /// The command could not start, or the connection to the guest failed before
    /// its exit was known.
    Failed,
}

/// A process in `GET /v1/sandboxes/{id}/processes` and the 202 response of a background
/// exec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Process {
    pub id: String,
    pub command: Vec<String>,
    pub background: bool,
    pub state: ProcessState,
    pub exit: Option<ExitInfo>,
    /// The reason the command failed, when its state is `failed`.
    pub error: Option<ErrorDetail>,
    /// Sequence number of the last output event so far (0 when none).
    pub last_seq: u64,
    pub started_at: String,
}

/// Body of `GET /v1/sandboxes/{id}/processes`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessList {
    pub processes: Vec<Process>,
}

/// Body of `POST .../processes/{pid}/kill`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kill {
    /// Signal number (default: 9, SIGKILL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// Data of the `stdout` and `stderr` events of an exec stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputEvent {
    /// Position of this chunk among the process's output events, from 1; also sent as
    /// the SSE `id`, so a reconnect with `after=seq` resumes after it.
    pub seq: u64,
    pub data: String,
    pub encoding: Encoding,
}

/// Data of the `started` event: the process to reattach to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartedEvent {
    pub process_id: String,
}

/// Body of `PUT /v1/sandboxes/{id}/files`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWritten {
    pub path: String,
    pub size: u64,
}

/// One entry of `GET /v1/sandboxes/{id}/files/list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    /// Permission bits and file type, as in `st_mode`.
    pub mode: u32,
    pub is_dir: bool,
    pub is_symlink: bool,
}

/// Body of `GET /v1/sandboxes/{id}/files/list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileList {
    pub path: String,
    pub entries: Vec<FileEntry>,
}

/// Body of `POST /v1/runs`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRun {
    /// The turn document: Markdown with YAML front matter.
    pub document: String,
    /// Context to record the turn in (default: the front matter's `context`, else `api`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Start a fresh context when the named one already has turns.
    #[serde(default, skip_serializing_if = "is_false")]
    pub new_context: bool,
}

/// Body returned by `POST /v1/runs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// `succeeded`, `failed` or `interrupted`.
    pub outcome: String,
    pub context: String,
    /// The document with each step's result written under it.
    pub document: String,
    /// The stored turn record with its steps and artifacts.
    pub turn: serde_json::Value,
    pub warnings: Vec<String>,
}

/// Error body of every failed request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What failed, in words and as a stable code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, such as `invalid_field` or `sandbox_not_found`.
    pub code: String,
    pub message: String,
    /// The request field at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

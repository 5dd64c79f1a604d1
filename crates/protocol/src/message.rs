use serde::{Deserialize, Serialize};

/// Version of this protocol. The agent reports it in [`Hello`]; the host
/// refuses to talk to an agent with another version.
pub const PROTOCOL_VERSION: u32 = 1;

/// Sent by the agent on stream 0 once it is ready for requests.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub protocol: u32,
    /// Version of the agent binary (its crate version).
    pub agent_version: String,
    /// The guest kernel's release, as `uname -r` prints it.
    pub kernel_release: String,
}

/// A request from the host. Each one gets exactly one [`Response`] on its
/// stream.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Answered with [`Response::Pong`]; measures the agent's round trip.
    Ping,
    /// Runs a command; output arrives as `Stdout`/`Stderr` frames, then
    /// [`Response::Exited`].
    Exec(ExecRequest),
    /// Sends a signal to the process group of the command running on stream
    /// `target`.
    Signal { target: u32, signal: i32 },
    /// Creates or replaces a file with the bytes of the `FileData` frames that
    /// follow on the same stream, up to a `FileEnd` frame.
    WriteFile { path: String, mode: u32 },
    /// Sends a file's bytes as `FileData` frames, then [`Response::FileSent`].
    ReadFile { path: String },
    /// Lists a directory.
    ListDir { path: String },
    /// Removes a file, or a directory with everything in it.
    Remove { path: String },
    /// Sets the guest clock and mixes host entropy into the guest's RNG; sent
    /// after a snapshot restore, where both would otherwise repeat the
    /// snapshot's state.
    Refresh {
        unix_time_ns: u64,
        entropy: Vec<u8>,
        hostname: String,
    },
    /// Flushes file systems and powers the guest off.
    Shutdown,
}

/// How to run one command.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH` when it has
    /// no slash.
    pub argv: Vec<String>,
    /// The complete environment of the command.
    pub env: Vec<(String, String)>,
    /// Working directory; created when missing.
    pub cwd: Option<String>,
    /// User to run as: a name, `uid`, or `uid:gid`, resolved in the guest's
    /// `/etc/passwd` and `/etc/group`.
    pub user: Option<String>,
    /// Kill the command's process group after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Whether `Stdin` frames follow. Without them stdin is `/dev/null`.
    pub stdin: bool,
}

/// How a command ended.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, when the command exited by itself.
    pub code: Option<i32>,
    /// Signal number, when a signal ended the command.
    pub signal: Option<i32>,
    /// Whether the agent killed the command because its timeout expired.
    pub timed_out: bool,
    /// Wall time from spawn to exit, in microseconds.
    pub duration_us: u64,
}

impl ExitStatus {
    /// The code a shell would report: the exit code, or 128 plus the signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 255,
        }
    }
}

/// One entry of a directory listing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub size: u64,
    pub mode: u32,
    pub is_dir: bool,
    pub is_symlink: bool,
}

/// The final message of a request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Pong,
    Ok,
    Exited(ExitStatus),
    FileSent { size: u64 },
    Dir { entries: Vec<DirEntry> },
    Error { kind: ErrorKind, message: String },
}

/// Why a request failed, so the host can map it to an exit code or an HTTP
/// status without parsing messages.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The program, file or directory does not exist.
    NotFound,
    /// The guest denied access.
    PermissionDenied,
    /// The request was malformed or names an invalid value.
    InvalidRequest,
    /// Anything else.
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_is_tagged() {
        let json = serde_json::to_string(&Request::Remove {
            path: "/tmp/x".into(),
        })
        .unwrap();
        assert_eq!(json, r#"{"type":"remove","path":"/tmp/x"}"#);
    }

    #[test]
    fn shell_code_of_signal() {
        let status = ExitStatus {
            code: None,
            signal: Some(9),
            timed_out: false,
            duration_us: 1,
        };
        assert_eq!(status.shell_code(), 137);
    }
}

//! The request loop: reads frames from the host and dispatches them.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use upstream_protocol::{
    read_frame, write_frame, ErrorKind, Frame, FrameKind, Hello, Request, Response,
    PROTOCOL_VERSION,
};

use crate::channel::Channel;
use crate::{exec, files};

/// What request threads share: the channel's write half and the state of
/// requests that receive further frames.
pub struct Shared {
    writer: Mutex<Channel>,
    /// Running commands by stream id.
    pub execs: Mutex<HashMap<u32, RunningExec>>,
    /// Files being written by stream id.
    pub uploads: Mutex<HashMap<u32, files::Upload>>,
}

/// A running command, as other requests see it.
pub struct RunningExec {
    /// The command's pid, or 0 while it is being spawned.
    pub pid: libc::pid_t,
    /// Feeds the command's stdin; `None` sends end-of-file.
    pub stdin: Option<Sender<Option<Vec<u8>>>>,
}

impl Shared {
    /// Sends one frame. Errors mean the host is gone; callers ignore them
    /// because the VM is about to be destroyed.
    pub fn send(&self, frame: &Frame) -> io::Result<()> {
        let mut writer = self.writer.lock().unwrap();
        write_frame(&mut *writer, frame)
    }

    /// Ends the session: kills its running commands and drops unfinished
    /// uploads. Their threads hold this session's writer, whose channel is
    /// closed, so nothing they still send reaches a later session.
    fn end(&self) {
        for exec in self.execs.lock().unwrap().values() {
            if exec.pid > 0 {
                // SAFETY: kill takes no pointers; a negative pid names the
                // command's process group.
                unsafe { libc::kill(-exec.pid, libc::SIGKILL) };
            }
        }
        self.uploads.lock().unwrap().clear();
    }

    pub fn respond(&self, stream: u32, response: &Response) {
        let _ = self.send(&Frame::json(FrameKind::Response, stream, response));
    }

    pub fn respond_error(&self, stream: u32, kind: ErrorKind, message: String) {
        self.respond(stream, &Response::Error { kind, message });
    }
}

/// Serves sessions until the host closes the channel for good.
///
/// A session is one connection: it starts with the agent's hello and ends
/// when the channel does. With `redial`, the agent then opens a new channel
/// and starts a new session. Firecracker needs this: restoring a snapshot
/// resets the guest's vsock device, which breaks the connection the agent
/// made before the snapshot, and the restored VM's host listens for a new
/// one. Without `redial`, or when it fails, the first ending is final.
pub fn serve(
    mut channel: Channel,
    redial: Option<&dyn Fn() -> io::Result<Channel>>,
) -> io::Result<()> {
    loop {
        let ended = serve_session(channel);
        let Some(redial) = redial else {
            return ended;
        };
        match &ended {
            Ok(()) => eprintln!("upstream-agent: the host closed the channel; dialing again"),
            Err(err) => eprintln!("upstream-agent: the host channel failed ({err}); dialing again"),
        }
        channel = redial()?;
    }
}

/// Serves one session. Its commands are killed when it ends: the next
/// session's host does not know them, and would reuse their stream ids.
fn serve_session(channel: Channel) -> io::Result<()> {
    let mut reader = channel.try_clone()?;
    let shared = Arc::new(Shared {
        writer: Mutex::new(channel),
        execs: Mutex::new(HashMap::new()),
        uploads: Mutex::new(HashMap::new()),
    });
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel_release: kernel_release(),
    };
    shared.send(&Frame::json(FrameKind::Hello, 0, &hello))?;

    let ended = loop {
        match read_frame(&mut reader) {
            Ok(Some(frame)) => dispatch(&shared, frame),
            Ok(None) => break Ok(()),
            Err(err) => break Err(io::Error::other(err.to_string())),
        }
    };
    shared.end();
    ended
}

fn dispatch(shared: &Arc<Shared>, frame: Frame) {
    let stream = frame.stream;
    match frame.kind {
        FrameKind::Request => match frame.parse::<Request>() {
            Ok(request) => handle_request(shared, stream, request),
            Err(err) => shared.respond_error(stream, ErrorKind::InvalidRequest, err.to_string()),
        },
        FrameKind::Stdin => feed_stdin(shared, stream, Some(frame.payload)),
        FrameKind::StdinEof => feed_stdin(shared, stream, None),
        FrameKind::FileData => files::upload_chunk(shared, stream, &frame.payload),
        FrameKind::FileEnd => files::finish_upload(shared, stream),
        // Frames only the agent sends; a host that sends them is broken, and
        // ignoring them keeps the other requests running.
        FrameKind::Response | FrameKind::Stdout | FrameKind::Stderr | FrameKind::Hello => {}
    }
}

fn handle_request(shared: &Arc<Shared>, stream: u32, request: Request) {
    match request {
        Request::Ping => shared.respond(stream, &Response::Pong),
        Request::Exec(exec) => exec::start(Arc::clone(shared), stream, exec),
        Request::Signal { target, signal } => {
            let pid = shared
                .execs
                .lock()
                .unwrap()
                .get(&target)
                .map(|exec| exec.pid);
            // A pid of 0 means the command is still being spawned.
            let pid = pid.filter(|&pid| pid > 0);
            match pid {
                Some(pid) => {
                    // SAFETY: kill takes no pointers; a negative pid names the
                    // command's process group, created by setsid at spawn.
                    unsafe { libc::kill(-pid, signal) };
                    shared.respond(stream, &Response::Ok);
                }
                None => shared.respond_error(
                    stream,
                    ErrorKind::NotFound,
                    format!("no running command on stream {target}"),
                ),
            }
        }
        Request::WriteFile { path, mode } => files::begin_upload(shared, stream, &path, mode),
        Request::ReadFile { path } => {
            let shared = Arc::clone(shared);
            std::thread::spawn(move || files::send_file(&shared, stream, &path));
        }
        Request::ListDir { path } => shared.respond(stream, &files::list_dir(&path)),
        Request::Remove { path } => shared.respond(stream, &files::remove(&path)),
        Request::Refresh {
            unix_time_ns,
            entropy,
            hostname,
        } => shared.respond(stream, &refresh(unix_time_ns, &entropy, &hostname)),
        Request::Shutdown => {
            shared.respond(stream, &Response::Ok);
            if std::process::id() == 1 {
                crate::init::power_off();
            }
        }
    }
}

fn feed_stdin(shared: &Shared, stream: u32, data: Option<Vec<u8>>) {
    let mut execs = shared.execs.lock().unwrap();
    let Some(exec) = execs.get_mut(&stream) else {
        return;
    };
    let Some(sender) = &exec.stdin else { return };
    let eof = data.is_none();
    // A closed receiver means the command no longer reads stdin.
    let _ = sender.send(data);
    if eof {
        exec.stdin = None;
    }
}

/// Sets the clock, mixes in and credits host entropy and sets the host name:
/// a restored snapshot otherwise repeats the snapshot's clock and RNG state.
fn refresh(unix_time_ns: u64, entropy: &[u8], hostname: &str) -> Response {
    let time = libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `time` is a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) } != 0 {
        let err = io::Error::last_os_error();
        return Response::Error {
            kind: ErrorKind::Other,
            message: format!("setting the clock: {err}"),
        };
    }
    if let Err(err) = add_entropy(entropy) {
        return Response::Error {
            kind: ErrorKind::Other,
            message: format!("reseeding: {err}"),
        };
    }
    if !hostname.is_empty() {
        if let Err(err) = crate::init::set_hostname(hostname) {
            return Response::Error {
                kind: ErrorKind::Other,
                message: format!("hostname: {err}"),
            };
        }
    }
    Response::Ok
}

/// Adds bytes to the kernel's input pool and credits them (RNDADDENTROPY),
/// then reseeds the output generator (RNDRESEEDCRNG). Crediting alone is not
/// enough: once the generator is initialised, Linux 6.1 reseeds it only when
/// its key is older than the reseed interval (one second after boot, growing
/// to a minute), so clones restored within it read the same bytes.
fn add_entropy(entropy: &[u8]) -> io::Result<()> {
    if entropy.is_empty() {
        return Ok(());
    }
    #[repr(C)]
    struct PoolInfo {
        entropy_count: libc::c_int,
        buf_size: libc::c_int,
        buf: [u8; 256],
    }
    let mut info = PoolInfo {
        entropy_count: 0,
        buf_size: 0,
        buf: [0; 256],
    };
    let len = entropy.len().min(info.buf.len());
    info.buf[..len].copy_from_slice(&entropy[..len]);
    info.buf_size = len as libc::c_int;
    info.entropy_count = (len * 8) as libc::c_int;
    let random = File::options().write(true).open("/dev/urandom")?;
    // RNDADDENTROPY = _IOW('R', 0x03, int[2])
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    use std::os::fd::AsRawFd;
    // SAFETY: `info` matches struct rand_pool_info with a 256-byte buffer.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &info) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // RNDRESEEDCRNG = _IO('R', 0x07)
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: the request takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn kernel_release() -> String {
    // SAFETY: utsname is plain data, and uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid out-pointer.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

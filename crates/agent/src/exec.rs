//! Running one command: spawn, stream its output, enforce its timeout and
//! report how it ended.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{ChildStderr, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use upstream_protocol::{ErrorKind, ExecRequest, ExitStatus, Frame, FrameKind, Response};

use crate::reaper;
use crate::server::{RunningExec, Shared};
use crate::users::{self, Identity};

/// Largest chunk of output in one frame.
const CHUNK: usize = 64 * 1024;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Starts a command on its own thread; its response comes later.
///
/// The command is registered before this returns, on the thread that reads
/// the channel, so stdin frames that follow the request at once are queued
/// rather than dropped.
pub fn start(shared: Arc<Shared>, stream: u32, request: ExecRequest) {
    let (sender, receiver) = mpsc::channel();
    let stdin = request.stdin.then_some(sender);
    shared
        .execs
        .lock()
        .unwrap()
        .insert(stream, RunningExec { pid: 0, stdin });
    std::thread::Builder::new()
        .name(format!("exec-{stream}"))
        .spawn(move || run(&shared, stream, request, receiver))
        .expect("spawning an exec thread failed");
}

fn run(
    shared: &Arc<Shared>,
    stream: u32,
    request: ExecRequest,
    stdin_frames: mpsc::Receiver<Option<Vec<u8>>>,
) {
    let started = Instant::now();
    let spawned = match spawn(&request) {
        Ok(spawned) => spawned,
        Err((kind, message)) => {
            shared.execs.lock().unwrap().remove(&stream);
            return shared.respond_error(stream, kind, message);
        }
    };
    let pid = spawned.pid;
    if let Some(exec) = shared.execs.lock().unwrap().get_mut(&stream) {
        exec.pid = pid;
    }
    if let Some(stdin) = spawned.stdin {
        std::thread::spawn(move || feed(stdin, stdin_frames));
    }

    let (wake_read, wake_write) = pipe().expect("creating a pipe failed");
    let pump_shared = Arc::clone(shared);
    let pump = std::thread::spawn(move || {
        pump_output(
            &pump_shared,
            stream,
            spawned.stdout,
            spawned.stderr,
            wake_read,
        )
    });

    let deadline = request
        .timeout_ms
        .map(|ms| started + Duration::from_millis(ms));
    let mut timed_out = false;
    let status = match reaper::wait(pid, deadline) {
        Some(status) => status,
        None => {
            timed_out = true;
            // SAFETY: kill takes no pointers; -pid is the command's group.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            reaper::wait(pid, None).expect("waiting without a deadline returns a status")
        }
    };
    let duration_us = started.elapsed().as_micros() as u64;

    // Background processes of the command may keep its pipes open: take what
    // is buffered now and stop, instead of waiting for an end of file that
    // may never come.
    let _ = (&wake_write).write_all(&[1]);
    let _ = pump.join();
    shared.execs.lock().unwrap().remove(&stream);

    let exit = ExitStatus {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        timed_out,
        duration_us,
    };
    shared.respond(stream, &Response::Exited(exit));
}

struct Spawned {
    pid: libc::pid_t,
    stdin: Option<std::process::ChildStdin>,
    stdout: ChildStdout,
    stderr: ChildStderr,
}

fn spawn(request: &ExecRequest) -> Result<Spawned, (ErrorKind, String)> {
    let Some(program) = request.argv.first() else {
        return Err((ErrorKind::InvalidRequest, "empty command".into()));
    };
    let identity = match &request.user {
        Some(spec) => users::resolve(spec).map_err(|msg| (ErrorKind::InvalidRequest, msg))?,
        None => Identity::root(),
    };

    let mut command = Command::new(program);
    command.args(&request.argv[1..]).env_clear();
    if !request.env.iter().any(|(key, _)| key == "PATH") {
        command.env("PATH", DEFAULT_PATH);
    }
    if let Some(home) = identity
        .home
        .as_deref()
        .filter(|_| !has_env(request, "HOME"))
    {
        command.env("HOME", home);
    }
    command.envs(request.env.iter().map(|(key, value)| (key, value)));
    if let Some(cwd) = &request.cwd {
        std::fs::create_dir_all(cwd).map_err(|err| {
            (
                ErrorKind::InvalidRequest,
                format!("cannot create working directory {cwd}: {err}"),
            )
        })?;
        command.current_dir(cwd);
    }
    command
        .stdin(if request.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let Identity {
        uid, gid, groups, ..
    } = identity;
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe system calls.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0
                || libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let guard = reaper::lock_for_spawn();
    let mut child = command.spawn().map_err(|err| spawn_error(program, err))?;
    let pid = child.id() as libc::pid_t;
    guard.watch(pid);
    Ok(Spawned {
        pid,
        stdin: child.stdin.take(),
        stdout: child.stdout.take().expect("stdout is piped"),
        stderr: child.stderr.take().expect("stderr is piped"),
    })
}

fn has_env(request: &ExecRequest, key: &str) -> bool {
    request.env.iter().any(|(k, _)| k == key)
}

fn spawn_error(program: &str, err: io::Error) -> (ErrorKind, String) {
    match err.kind() {
        io::ErrorKind::NotFound => (
            ErrorKind::NotFound,
            format!("command '{program}' not found in the image (searched PATH)"),
        ),
        io::ErrorKind::PermissionDenied => (
            ErrorKind::PermissionDenied,
            format!("command '{program}' is not executable"),
        ),
        _ => (
            ErrorKind::Other,
            format!("starting '{program}' failed: {err}"),
        ),
    }
}

/// Copies stdin frames into the command until end of file or until the
/// command stops reading.
fn feed(mut stdin: std::process::ChildStdin, receiver: mpsc::Receiver<Option<Vec<u8>>>) {
    while let Ok(Some(data)) = receiver.recv() {
        if stdin.write_all(&data).is_err() {
            break;
        }
    }
}

/// Forwards stdout and stderr until both end, or until `wake` says the
/// command exited; then takes what is still buffered and returns.
fn pump_output(
    shared: &Shared,
    stream: u32,
    stdout: ChildStdout,
    stderr: ChildStderr,
    wake: OwnedFd,
) {
    let mut sources = [
        Some((stdout.as_raw_fd(), FrameKind::Stdout)),
        Some((stderr.as_raw_fd(), FrameKind::Stderr)),
    ];
    for (fd, _) in sources.iter().flatten() {
        set_nonblocking(*fd);
    }
    let mut buf = vec![0u8; CHUNK];
    let mut exited = false;
    while sources.iter().any(Option::is_some) {
        let mut fds: Vec<libc::pollfd> = sources
            .iter()
            .map(|source| libc::pollfd {
                fd: source.map_or(-1, |(fd, _)| fd),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        fds.push(libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        if !exited {
            // SAFETY: `fds` is a valid array of pollfd of the given length.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                continue;
            }
            exited = fds[2].revents != 0;
        }
        for (slot, pollfd) in sources.iter_mut().zip(&fds) {
            let Some((fd, kind)) = *slot else { continue };
            if !exited && pollfd.revents == 0 {
                continue;
            }
            if !forward(shared, stream, fd, kind, &mut buf, exited) {
                *slot = None;
            }
        }
        if exited {
            break;
        }
    }
    drop((stdout, stderr));
}

/// Reads from `fd` and sends what it got. With `drain`, reads until nothing
/// is left. Returns false at end of file.
fn forward(
    shared: &Shared,
    stream: u32,
    fd: RawFd,
    kind: FrameKind,
    buf: &mut [u8],
    drain: bool,
) -> bool {
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            let _ = shared.send(&Frame::new(kind, stream, buf[..n as usize].to_vec()));
            if drain {
                continue;
            }
            return true;
        }
        if n == 0 {
            return false;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return true,
            _ => return false,
        }
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor this thread owns, no pointers.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

fn pipe() -> io::Result<(OwnedFd, std::fs::File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    crate::init::check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors are fresh and owned from here on.
    unsafe {
        Ok((
            OwnedFd::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        ))
    }
}

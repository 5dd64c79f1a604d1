//! The agent dials the host again when its channel breaks, as it must
//! after Firecracker restores a snapshot and resets the guest's vsock
//! device. The agent runs here as an ordinary process that dials a Unix
//! socket, the same code path as vsock, and the host side is the
//! `AgentClient` that upstream uses.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use upstream_protocol::ExecRequest;
use upstream_vmm::AgentClient;

const TIMEOUT: Duration = Duration::from_secs(10);

fn start_agent(socket: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_upstream-agent"))
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the agent")
}

async fn accept(listener: &UnixListener) -> AgentClient {
    let (stream, _) = tokio::time::timeout(TIMEOUT, listener.accept())
        .await
        .expect("the agent dialed within the timeout")
        .unwrap();
    AgentClient::handshake(stream).await.unwrap()
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..ExecRequest::default()
    }
}

fn is_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[tokio::test]
async fn agent_redials_and_ends_the_old_session() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let mut agent = start_agent(&socket);

    // First session: a command that outlives it.
    let first = accept(&listener).await;
    let mut sleeper = first.exec(sh("echo $$; exec sleep 60")).await.unwrap();
    let event = sleeper.next_event().await.unwrap();
    let upstream_vmm::ExecEvent::Stdout(bytes) = event else {
        panic!("expected the pid on stdout, got {event:?}");
    };
    let pid: i32 = String::from_utf8(bytes.to_vec())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(is_alive(pid));
    drop(sleeper);
    drop(first);

    // Second session: a fresh hello, and the same stream id as the old
    // command now names a new one.
    let second = accept(&listener).await;
    let (stdout, _, status) = second
        .exec(sh("echo second"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(status.code, Some(0));
    assert_eq!(stdout, b"second\n");

    let deadline = Instant::now() + TIMEOUT;
    while is_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !is_alive(pid),
        "the first session's command {pid} still runs"
    );

    // With no listener, dialing fails and the agent exits.
    drop(listener);
    std::fs::remove_file(&socket).unwrap();
    drop(second);
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(agent.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("dialing again"), "{stderr}");
    assert!(stderr.contains("channel closed"), "{stderr}");
    assert!(status.success(), "{status:?}: {stderr}");
}

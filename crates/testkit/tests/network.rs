//! Sandbox networking against real microVMs: the policy proxy, DNS and
//! published ports. Every server is one the test starts on 127.0.0.1; only
//! the pip test reaches the package index, the way the host's pip does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use upstream_testkit::{require_vm, sh_with, TestVm};
use upstream_vmm::{Limits, NetworkPolicy, PortForward, Sandbox};

/// An HTTP server on the host's loopback that returns `host-secret` and
/// counts the requests it received.
struct HostServer {
    port: u16,
    requests: Arc<AtomicUsize>,
}

impl HostServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&requests);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buffer = [0u8; 4096];
                    let _ = stream.read(&mut buffer).await;
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\n\
                              host-secret",
                        )
                        .await;
                });
            }
        });
        Self { port, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn sandbox(vm: &TestVm, network: NetworkPolicy, publish: Vec<PortForward>) -> Sandbox {
    let mut spec = vm.spec(Limits::default());
    spec.network = network;
    spec.publish = publish;
    Sandbox::create(&vm.runtime, spec)
        .await
        .expect("creating a sandbox")
}

/// Runs `script` and returns its stdout and stderr together, and the exit code.
async fn run(sandbox: &Sandbox, script: &str) -> (String, i32) {
    let (stdout, stderr, status) = sh_with(sandbox, script, Some(120_000)).await;
    let mut output = String::from_utf8_lossy(&stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&stderr));
    (output, status.shell_code())
}

/// curl through the sandbox's proxy, even for addresses in `NO_PROXY`.
fn curl_via_proxy(url: &str) -> String {
    format!(
        "curl -sS -m 20 --noproxy '' -x http://10.0.2.100:3128 -w ' status=%{{http_code}}' {url}"
    )
}

/// curl straight to the address, bypassing the proxy.
fn curl_direct(url: &str) -> String {
    format!("curl -sS -m 20 --noproxy '*' -w ' status=%{{http_code}}' {url}")
}

#[tokio::test]
async fn network_off_has_no_route() {
    let vm = require_vm!();
    let sandbox = sandbox(&vm, NetworkPolicy::off(), Vec::new()).await;
    let (routes, _) = run(&sandbox, "tail -n +2 /proc/net/route").await;
    assert_eq!(routes.trim(), "", "routing table");
    let (interfaces, _) = run(&sandbox, "ls /sys/class/net").await;
    assert!(!interfaces.contains("eth"), "{interfaces}");

    let started = Instant::now();
    let (output, code) = run(&sandbox, &curl_direct("http://10.0.2.100:3128/")).await;
    assert_ne!(code, 0, "{output}");
    assert!(started.elapsed() < Duration::from_secs(10), "{output}");
    sandbox.destroy().await;
}

#[tokio::test]
async fn host_loopback_is_refused_by_default() {
    let vm = require_vm!();
    let server = HostServer::start().await;
    let sandbox = sandbox(&vm, NetworkPolicy::internet(), Vec::new()).await;
    let port = server.port;

    let (output, _) = run(
        &sandbox,
        &curl_via_proxy(&format!("http://127.0.0.1:{port}/")),
    )
    .await;
    assert!(output.contains("status=403"), "{output}");
    assert!(output.contains("loopback"), "{output}");

    // The gateway address is the host's loopback under plain slirp.
    let started = Instant::now();
    let (output, code) = run(&sandbox, &curl_direct(&format!("http://10.0.2.2:{port}/"))).await;
    assert_ne!(code, 0, "{output}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(!output.contains("host-secret"), "{output}");

    assert_eq!(server.requests(), 0);
    assert!(sandbox.network_stats().blocked >= 1);
    sandbox.destroy().await;
}

#[tokio::test]
async fn allow_and_deny_rules_apply_as_written() {
    let vm = require_vm!();
    let server = HostServer::start().await;
    let policy = NetworkPolicy::rules(&["127.0.0.1"], &["localhost"]).unwrap();
    let sandbox = sandbox(&vm, policy, Vec::new()).await;
    let port = server.port;

    let (output, _) = run(
        &sandbox,
        &curl_via_proxy(&format!("http://127.0.0.1:{port}/")),
    )
    .await;
    assert!(output.contains("host-secret status=200"), "{output}");
    assert_eq!(server.requests(), 1);

    let (output, _) = run(
        &sandbox,
        &curl_via_proxy(&format!("http://localhost:{port}/")),
    )
    .await;
    assert!(output.contains("status=403"), "{output}");
    assert!(output.contains("denied by rule `localhost`"), "{output}");

    // A name the allow list does not hold fails in DNS already.
    let (output, code) = run(&sandbox, "getent hosts example.com").await;
    assert_ne!(code, 0, "{output}");
    assert_eq!(server.requests(), 1);
    sandbox.destroy().await;
}

/// The proxy refuses the metadata address before it dials anything, and the
/// guest has no route to it: `dials` counts every outbound connect attempt.
#[tokio::test]
async fn metadata_address_is_refused() {
    let vm = require_vm!();
    let policy = NetworkPolicy::rules(&["0.0.0.0/0"], &[] as &[&str]).unwrap();
    let sandbox = sandbox(&vm, policy, Vec::new()).await;

    let (output, _) = run(
        &sandbox,
        &curl_via_proxy("http://169.254.169.254/latest/meta-data/"),
    )
    .await;
    assert!(output.contains("status=403"), "{output}");
    assert!(output.contains("link-local and metadata"), "{output}");

    let started = Instant::now();
    let (output, code) = run(&sandbox, &curl_direct("http://169.254.169.254/")).await;
    assert_ne!(code, 0, "{output}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    assert_eq!(sandbox.network_stats().dials, 0);
    sandbox.destroy().await;
}

#[tokio::test]
async fn published_port_answers_the_host() {
    let vm = require_vm!();
    let forward = PortForward {
        guest: 8000,
        host: None,
    };
    let sandbox = sandbox(&vm, NetworkPolicy::off(), vec![forward]).await;
    let published = sandbox.published_ports()[0];
    assert_eq!(published.guest, 8000);
    assert!(published.host.ip().is_loopback());

    let (output, code) = run(
        &sandbox,
        "mkdir -p /srv && echo guest-page > /srv/index.html && cd /srv && \
         (setsid python3 -m http.server 8000 >/dev/null 2>&1 &)",
    )
    .await;
    assert_eq!(code, 0, "{output}");

    let deadline = Instant::now() + Duration::from_secs(60);
    let response = loop {
        if let Ok(response) = http_get(published.host).await {
            if response.contains("guest-page") {
                break response;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the published port never answered"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    sandbox.destroy().await;
}

async fn http_get(address: std::net::SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(address).await?;
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// The CA bundle the host's pip trusts: `PIP_CERT`, else the system bundle.
/// Hosts behind a TLS-inspecting proxy trust its CA only there, so the
/// sandbox gets the same file.
fn host_ca_bundle() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PIP_CERT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
    path.is_file().then_some(path)
}

/// Whether the host's own pip reaches the package index.
fn host_reaches_pypi() -> bool {
    let dir = tempfile_dir();
    let status = std::process::Command::new("pip")
        .args(["download", "--no-deps", "--no-cache-dir", "--no-index"])
        .arg("--find-links=https://pypi.org/simple/six/")
        .arg("-d")
        .arg(&dir)
        .arg("six")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(&dir);
    status.is_ok_and(|status| status.success())
}

fn tempfile_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("upstream-pip-probe-{}", std::process::id()))
}

#[tokio::test]
async fn pip_install_works_with_network_on() {
    let vm = require_vm!();
    if !host_reaches_pypi() {
        eprintln!("skipped: the host's pip cannot reach pypi.org");
        return;
    }
    let sandbox = sandbox(&vm, NetworkPolicy::internet(), Vec::new()).await;
    let mut script = String::new();
    if let Some(bundle) = host_ca_bundle() {
        let file = tokio::fs::File::open(&bundle).await.unwrap();
        sandbox
            .agent()
            .write_file("/tmp/host-ca.pem", 0o644, file)
            .await
            .expect("copying the host's CA bundle");
        script.push_str("export PIP_CERT=/tmp/host-ca.pem; ");
    }
    script.push_str(
        "pip install --no-cache-dir --break-system-packages --disable-pip-version-check six \
         && python3 -c 'import six; print(\"six\", six.__version__)'",
    );
    let (output, code) = run(&sandbox, &script).await;
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("six 1."), "{output}");
    assert!(sandbox.network_stats().dials >= 1);
    sandbox.destroy().await;
}

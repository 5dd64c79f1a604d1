//! A real server on 127.0.0.1:0 over a private data directory that shares the kernel,
//! agent, images and disk templates of the one `UPSTREAM_TEST_HOME` names.

#![allow(dead_code)]

use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use upstream_client::Client;
use upstream_server::{Server, ServerConfig};
use upstream_vmm::DataDir;

pub struct TestServer {
    pub data: tempfile::TempDir,
    pub addr: SocketAddr,
    pub client: Client,
    /// (METHOD, path) of every route the router registered.
    pub routes: Vec<(String, String)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Starts a server with `configure` applied to the default test configuration; `None`
    /// when tests that boot VMs are skipped.
    pub async fn start(configure: impl FnOnce(&mut ServerConfig)) -> Option<Self> {
        let data = prepared_data()?;
        Some(Self::start_in(data, configure).await)
    }

    /// Starts a server over an existing data directory.
    pub async fn start_in(
        data: tempfile::TempDir,
        configure: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        let mut config = ServerConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..ServerConfig::default()
        };
        configure(&mut config);
        let server = Server::bind(DataDir::new(data.path()), config)
            .await
            .expect("binding the server");
        let addr = server.local_addr().expect("a TCP listener");
        let routes = server
            .routes()
            .iter()
            .map(|(method, path)| (method.to_string(), path.to_string()))
            .collect();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        let client = Client::new(&format!("http://{addr}")).unwrap();
        Self {
            data,
            addr,
            client,
            routes,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends `GET path` and returns the body, parsed as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.get(path).await.json().await.unwrap()
    }

    /// Sends `GET path` and returns the body as text.
    pub async fn get_text(&self, path: &str) -> String {
        self.get(path).await.text().await.unwrap()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::Client::new()
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|err| panic!("GET {path}: {err}"))
    }

    /// Shuts the server down and waits until it has destroyed its sandboxes.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.stop.take().unwrap().send(()).unwrap();
        self.task
            .take()
            .unwrap()
            .await
            .unwrap()
            .expect("the server stopped cleanly");
        self.data
    }

    /// Sandbox folders left under `run/`.
    pub fn run_folders(&self) -> Vec<String> {
        run_folders(self.data.path())
    }
}

pub fn run_folders(data: &Path) -> Vec<String> {
    fs::read_dir(data.join("run"))
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A private data directory linked to the prepared one; `None` when VM tests are skipped.
pub fn prepared_data() -> Option<tempfile::TempDir> {
    let shared = upstream_testkit::test_home()?;
    let data = tempfile::tempdir().unwrap();
    link_shared(&shared, data.path());
    Some(data)
}

fn link_shared(shared: &Path, data: &Path) {
    fs::copy(shared.join("setup.json"), data.join("setup.json")).unwrap();
    for folder in ["images", "agent", "disks"] {
        std::os::unix::fs::symlink(shared.join(folder), data.join(folder)).unwrap();
    }
    let _ = fs::copy(shared.join(".notice-tcg"), data.join(".notice-tcg"));
}

//! Rust client of the upstream HTTP API (`upstream serve`).
//!
//! ```no_run
//! # async fn example() -> Result<(), upstream_client::ClientError> {
//! use upstream_client::{api, Client};
//!
//! let client = Client::new("http://127.0.0.1:7878")?;
//! let sandbox = client.create_sandbox(&api::CreateSandbox::default()).await?;
//! let result = client.exec(&sandbox.id, &api::Exec::command(["echo", "hi"])).await?;
//! assert_eq!(result.stdout, "hi\n");
//! client.destroy_sandbox(&sandbox.id).await?;
//! # Ok(())
//! # }
//! ```
//!
//! Every method maps to one route of the API; the route is named in its documentation.
//! A non-2xx answer becomes [`ClientError::Api`] with the server's error code, message and
//! the field at fault.

pub mod api;
mod stream;

use std::collections::BTreeMap;
use std::path::Path;

use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;

pub use stream::{ExecStream, StreamEvent};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("{status}: {} ({})", .error.message, .error.code)]
    Api {
        status: u16,
        error: api::ErrorDetail,
    },
    /// The request could not be sent or the answer not read.
    #[error("Request to the upstream server failed")]
    Http(#[from] reqwest::Error),
    /// The server's answer does not follow the API.
    #[error("Invalid answer from the upstream server: {0}")]
    InvalidResponse(String),
}

impl ClientError {
    /// The API error code, such as `sandbox_not_found`, when the server sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { error, .. } => Some(&error.code),
            _ => None,
        }
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

impl api::Exec {
    /// A request that runs `command` to its end with default settings.
    pub fn command<I, S>(command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            command: command.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

/// A connection to one upstream server.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

impl Client {
    /// A client for the server at `base_url`, such as `http://127.0.0.1:7878`.
    pub fn new(base_url: &str) -> Result<Self> {
        let http = reqwest::Client::builder().build()?;
        Ok(Self {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            api_key: None,
        })
    }

    /// A client for a server listening on the Unix socket at `path`.
    pub fn unix(path: &Path) -> Result<Self> {
        let http = reqwest::Client::builder()
            .unix_socket(path.to_path_buf())
            .build()?;
        Ok(Self {
            http,
            base: "http://localhost".into(),
            api_key: None,
        })
    }

    /// Sends `key` as `Authorization: Bearer` on every request.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        }
    }

    /// `GET /healthz`.
    pub async fn health(&self) -> Result<()> {
        checked(self.request(Method::GET, "/healthz").send().await?).await?;
        Ok(())
    }

    /// `POST /v1/sandboxes`: boots a sandbox and returns once it is ready.
    pub async fn create_sandbox(&self, request: &api::CreateSandbox) -> Result<api::Sandbox> {
        json(self.request(Method::POST, "/v1/sandboxes").json(request)).await
    }

    /// `GET /v1/sandboxes`: sandboxes whose metadata contains every pair of `metadata`.
    pub async fn list_sandboxes(
        &self,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Vec<api::Sandbox>> {
        let query: Vec<(String, &String)> = metadata
            .iter()
            .map(|(key, value)| (format!("metadata.{key}"), value))
            .collect();
        let list: api::SandboxList =
            json(self.request(Method::GET, "/v1/sandboxes").query(&query)).await?;
        Ok(list.sandboxes)
    }

    /// `GET /v1/sandboxes/{id}`.
    pub async fn get_sandbox(&self, id: &str) -> Result<api::Sandbox> {
        json(self.request(Method::GET, &format!("/v1/sandboxes/{id}"))).await
    }

    /// `POST /v1/sandboxes/{id}/timeout`: destroy the sandbox `secs` from now, or never.
    pub async fn set_timeout(&self, id: &str, secs: Option<u64>) -> Result<api::Sandbox> {
        let body = api::SetTimeout { timeout_secs: secs };
        json(
            self.request(Method::POST, &format!("/v1/sandboxes/{id}/timeout"))
                .json(&body),
        )
        .await
    }

    /// `DELETE /v1/sandboxes/{id}`.
    pub async fn destroy_sandbox(&self, id: &str) -> Result<()> {
        let response = self
            .request(Method::DELETE, &format!("/v1/sandboxes/{id}"))
            .send()
            .await?;
        checked(response).await?;
        Ok(())
    }

    /// `POST /v1/sandboxes/{id}/exec`: runs a command to its end.
    pub async fn exec(&self, id: &str, request: &api::Exec) -> Result<api::ExecResult> {
        json(
            self.request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
                .json(request),
        )
        .await
    }

    /// `POST /v1/sandboxes/{id}/exec` with `background: true`: starts a command and
    /// returns its process at once.
    pub async fn exec_background(&self, id: &str, request: &api::Exec) -> Result<api::Process> {
        let request = api::Exec {
            background: true,
            ..request.clone()
        };
        json(
            self.request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
                .json(&request),
        )
        .await
    }

    /// `POST /v1/sandboxes/{id}/exec/stream`: runs a command and streams its output. A
    /// foreground command is killed when the stream is dropped before it ends.
    pub async fn exec_stream(&self, id: &str, request: &api::Exec) -> Result<ExecStream> {
        let response = self
            .request(Method::POST, &format!("/v1/sandboxes/{id}/exec/stream"))
            .json(request)
            .send()
            .await?;
        Ok(ExecStream::new(checked(response).await?))
    }

    /// `GET /v1/sandboxes/{id}/processes/{pid}/events`: streams a process's output kept
    /// after chunk `after` (0 for all), then follows it.
    pub async fn attach(&self, id: &str, pid: &str, after: u64) -> Result<ExecStream> {
        let response = self
            .request(
                Method::GET,
                &format!("/v1/sandboxes/{id}/processes/{pid}/events"),
            )
            .query(&[("after", after)])
            .send()
            .await?;
        Ok(ExecStream::new(checked(response).await?))
    }

    /// `GET /v1/sandboxes/{id}/processes`.
    pub async fn processes(&self, id: &str) -> Result<Vec<api::Process>> {
        let list: api::ProcessList =
            json(self.request(Method::GET, &format!("/v1/sandboxes/{id}/processes"))).await?;
        Ok(list.processes)
    }

    /// `GET /v1/sandboxes/{id}/processes/{pid}`: the output kept so far and the exit.
    pub async fn process(&self, id: &str, pid: &str) -> Result<api::ExecResult> {
        json(self.request(Method::GET, &format!("/v1/sandboxes/{id}/processes/{pid}"))).await
    }

    /// `POST /v1/sandboxes/{id}/processes/{pid}/kill` with `signal` (default SIGKILL).
    pub async fn kill(&self, id: &str, pid: &str, signal: Option<i32>) -> Result<api::Process> {
        json(
            self.request(
                Method::POST,
                &format!("/v1/sandboxes/{id}/processes/{pid}/kill"),
            )
            .json(&api::Kill { signal }),
        )
        .await
    }

    /// `POST /v1/sandboxes/{id}/processes/{pid}/stdin`: writes `data`, then closes stdin
    /// when `eof`.
    pub async fn write_stdin(&self, id: &str, pid: &str, data: Vec<u8>, eof: bool) -> Result<()> {
        let response = self
            .request(
                Method::POST,
                &format!("/v1/sandboxes/{id}/processes/{pid}/stdin"),
            )
            .query(&[("eof", eof)])
            .body(data)
            .send()
            .await?;
        checked(response).await?;
        Ok(())
    }

    /// `PUT /v1/sandboxes/{id}/files`: creates or replaces the guest file at `path`.
    pub async fn upload(
        &self,
        id: &str,
        path: &str,
        data: impl Into<reqwest::Body>,
        mode: Option<u32>,
    ) -> Result<api::FileWritten> {
        let mut query = vec![("path", path.to_string())];
        if let Some(mode) = mode {
            query.push(("mode", format!("{mode:o}")));
        }
        json(
            self.request(Method::PUT, &format!("/v1/sandboxes/{id}/files"))
                .query(&query)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(data),
        )
        .await
    }

    /// `GET /v1/sandboxes/{id}/files`: the bytes of the guest file at `path`.
    pub async fn download(&self, id: &str, path: &str) -> Result<Vec<u8>> {
        let response = self
            .request(Method::GET, &format!("/v1/sandboxes/{id}/files"))
            .query(&[("path", path)])
            .send()
            .await?;
        Ok(checked(response).await?.bytes().await?.to_vec())
    }

    /// `GET /v1/sandboxes/{id}/files/list`.
    pub async fn list_files(&self, id: &str, path: &str) -> Result<Vec<api::FileEntry>> {
        let list: api::FileList = json(
            self.request(Method::GET, &format!("/v1/sandboxes/{id}/files/list"))
                .query(&[("path", path)]),
        )
        .await?;
        Ok(list.entries)
    }

    /// `DELETE /v1/sandboxes/{id}/files`: removes a file, or a directory with its contents.
    pub async fn remove_file(&self, id: &str, path: &str) -> Result<()> {
        let response = self
            .request(Method::DELETE, &format!("/v1/sandboxes/{id}/files"))
            .query(&[("path", path)])
            .send()
            .await?;
        checked(response).await?;
        Ok(())
    }

    /// `POST /v1/runs`: runs a turn document and returns it with its results.
    pub async fn submit_run(&self, request: &api::SubmitRun) -> Result<api::RunResult> {
        json(self.request(Method::POST, "/v1/runs").json(request)).await
    }

    /// `GET /v1/contexts`, as the server sends it.
    pub async fn contexts(&self) -> Result<serde_json::Value> {
        json(self.request(Method::GET, "/v1/contexts")).await
    }
}

/// Sends `request` and decodes a JSON answer.
async fn json<T: DeserializeOwned>(request: RequestBuilder) -> Result<T> {
    let response = checked(request.send().await?).await?;
    let bytes = response.bytes().await?;
    serde_json::from_slice(&bytes).map_err(|err| ClientError::InvalidResponse(err.to_string()))
}

/// Passes a 2xx response through and turns any other into [`ClientError::Api`].
async fn checked(response: Response) -> Result<Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let bytes = response.bytes().await?;
    let error = match serde_json::from_slice::<api::ErrorBody>(&bytes) {
        Ok(body) => body.error,
        Err(_) => api::ErrorDetail {
            code: "http_error".into(),
            message: String::from_utf8_lossy(&bytes).into_owned(),
            field: None,
        },
    };
    Err(ClientError::Api {
        status: status.as_u16(),
        error,
    })
}

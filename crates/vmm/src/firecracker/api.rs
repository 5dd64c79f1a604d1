//! A small HTTP/1.1 client for Firecracker's API socket.
//!
//! Firecracker serves one JSON API on a Unix socket and handles one request
//! at a time, so each request opens its own connection: a connect on a
//! local socket costs microseconds, and no connection state can go stale
//! between requests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

use super::FirecrackerError;

/// How long a configuration request may take. Firecracker completes them
/// in well under a millisecond, and the margin covers a loaded host.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a snapshot request may take: writing or mapping the guest
/// memory is bounded by disk speed, about 400 ms for 256 MiB on the
/// project's build hosts, so large guests on slow disks need minutes.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

/// One request to the API: what the backend sends, kept as data so tests
/// can check every body against Firecracker's OpenAPI schema.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiRequest {
    pub method: Method,
    pub path: String,
    pub body: Option<serde_json::Value>,
}

impl ApiRequest {
    pub fn put(path: impl Into<String>, body: &impl Serialize) -> Self {
        Self::with_body(Method::PUT, path, body)
    }

    pub fn patch(path: impl Into<String>, body: &impl Serialize) -> Self {
        Self::with_body(Method::PATCH, path, body)
    }

    pub fn get(path: impl Into<String>) -> Self {
        Self {
            method: Method::GET,
            path: path.into(),
            body: None,
        }
    }

    fn with_body(method: Method, path: impl Into<String>, body: &impl Serialize) -> Self {
        Self {
            method,
            path: path.into(),
            body: Some(serde_json::to_value(body).expect("API bodies serialize to JSON")),
        }
    }

    /// Formats the request for messages: `PUT /drives/rootfs`.
    pub fn describe(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// The error body of a rejected request.
#[derive(Deserialize)]
struct Fault {
    fault_message: String,
}

/// A client for one Firecracker process's API socket.
#[derive(Clone, Debug)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits until Firecracker accepts connections on its socket. The
    /// process creates the socket some milliseconds after it starts.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), FirecrackerError> {
        let deadline = Instant::now() + timeout;
        loop {
            if UnixStream::connect(&self.socket).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(FirecrackerError::SocketTimedOut {
                    path: self.socket.clone(),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Sends a request whose success has no body (HTTP 204).
    pub async fn send(&self, request: &ApiRequest) -> Result<(), FirecrackerError> {
        self.send_with_timeout(request, REQUEST_TIMEOUT).await
    }

    pub async fn send_with_timeout(
        &self,
        request: &ApiRequest,
        timeout: Duration,
    ) -> Result<(), FirecrackerError> {
        self.call(request, timeout).await.map(drop)
    }

    /// Sends a GET request and parses the JSON it returns.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, FirecrackerError> {
        let request = ApiRequest::get(path);
        let body = self.call(&request, REQUEST_TIMEOUT).await?;
        serde_json::from_slice(&body).map_err(|err| FirecrackerError::Transport {
            request: request.describe(),
            source: Box::new(err),
        })
    }

    /// Sends `request` and returns the body of a successful response.
    async fn call(
        &self,
        request: &ApiRequest,
        timeout: Duration,
    ) -> Result<Bytes, FirecrackerError> {
        let described = request.describe();
        let (status, body) = tokio::time::timeout(timeout, self.exchange(request))
            .await
            .map_err(|_| FirecrackerError::RequestTimedOut {
                request: described.clone(),
                timeout,
            })?
            .map_err(|source| FirecrackerError::Transport {
                request: described.clone(),
                source,
            })?;
        tracing::trace!(request = %described, status = status.as_u16(), "Firecracker API");
        if status.is_success() {
            return Ok(body);
        }
        Err(FirecrackerError::Rejected {
            request: described,
            status: status.as_u16(),
            fault: fault_message(&body),
        })
    }

    async fn exchange(
        &self,
        request: &ApiRequest,
    ) -> Result<(StatusCode, Bytes), Box<dyn std::error::Error + Send + Sync>> {
        let stream = UnixStream::connect(&self.socket).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The connection task ends when the response is read and the sender
        // is dropped, or when Firecracker closes the socket.
        let driver = tokio::spawn(connection);

        let body = match &request.body {
            Some(value) => Bytes::from(serde_json::to_vec(value)?),
            None => Bytes::new(),
        };
        let mut builder = Request::builder()
            .method(request.method.clone())
            .uri(request.path.as_str())
            // HTTP/1.1 requires a Host header; Firecracker ignores its value.
            .header(HOST, "localhost")
            .header(ACCEPT, "application/json");
        if request.body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let response = sender.send_request(builder.body(Full::new(body))?).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        drop(sender);
        driver.abort();
        Ok((status, bytes))
    }
}

/// Extracts the `fault_message` of an error body, or returns the body
/// itself when it is not Firecracker's error object.
fn fault_message(body: &[u8]) -> String {
    match serde_json::from_slice::<Fault>(body) {
        Ok(fault) => fault.fault_message,
        Err(_) if body.is_empty() => "no error message".to_string(),
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    /// Serves one connection: reads one request and writes `response`.
    /// Returns the request text. This server replaces Firecracker for its
    /// error paths, which a real process reaches only with broken input.
    async fn serve_once(listener: UnixListener, response: &'static str) -> String {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.unwrap();
            request.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&request);
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length: "))
                    .map_or(0, |value| value.trim().parse::<usize>().unwrap());
                if request.len() >= end + 4 + length {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        stream.write_all(response.as_bytes()).await.unwrap();
        String::from_utf8(request).unwrap()
    }

    fn listen() -> (tempfile::TempDir, PathBuf, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        (dir, socket, listener)
    }

    #[tokio::test]
    async fn put_sends_json_body() {
        let (_dir, socket, listener) = listen();
        let server = tokio::spawn(serve_once(
            listener,
            "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        ));
        let request = ApiRequest::put("/vm", &serde_json::json!({"state": "Paused"}));

        ApiClient::new(&socket).send(&request).await.unwrap();

        let text = server.await.unwrap();
        assert!(text.starts_with("PUT /vm HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("content-type: application/json"), "{text}");
        assert!(text.ends_with(r#"{"state":"Paused"}"#), "{text}");
    }

    #[tokio::test]
    async fn rejection_names_request_and_fault() {
        let (_dir, socket, listener) = listen();
        let body = r#"{"fault_message":"The kernel file cannot be opened"}"#;
        let response: &'static str = Box::leak(
            format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        tokio::spawn(serve_once(listener, response));
        let request = ApiRequest::put("/boot-source", &serde_json::json!({}));

        let err = ApiClient::new(&socket).send(&request).await.unwrap_err();

        assert_eq!(
            err.to_string(),
            "Firecracker rejected PUT /boot-source (HTTP 400): The kernel file cannot be opened"
        );
    }

    #[tokio::test]
    async fn get_parses_json() {
        let (_dir, socket, listener) = listen();
        let body = r#"{"firecracker_version":"1.16.1"}"#;
        let response: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let server = tokio::spawn(serve_once(listener, response));

        let version: serde_json::Value = ApiClient::new(&socket).get("/version").await.unwrap();

        assert_eq!(version["firecracker_version"], "1.16.1");
        assert!(server
            .await
            .unwrap()
            .starts_with("GET /version HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn closed_socket_is_transport_error() {
        let (_dir, socket, listener) = listen();
        drop(listener);

        let err = ApiClient::new(&socket)
            .send(&ApiRequest::get("/"))
            .await
            .unwrap_err();

        assert!(matches!(err, FirecrackerError::Transport { .. }), "{err}");
        assert_eq!(err.to_string(), "Firecracker API request GET / failed");
    }

    #[tokio::test]
    async fn wait_ready_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let client = ApiClient::new(dir.path().join("missing.sock"));

        let err = client
            .wait_ready(Duration::from_millis(20))
            .await
            .unwrap_err();

        assert!(
            matches!(err, FirecrackerError::SocketTimedOut { .. }),
            "{err}"
        );
    }

    #[test]
    fn fault_message_falls_back_to_body() {
        assert_eq!(fault_message(br#"{"fault_message":"bad"}"#), "bad");
        assert_eq!(fault_message(b"plain text\n"), "plain text");
        assert_eq!(fault_message(b""), "no error message");
    }
}

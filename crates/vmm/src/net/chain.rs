//! The host's own HTTP proxy, when its environment names one: the sandbox
//! proxy then opens every outbound connection through it with `CONNECT`,
//! the way the host's own tools reach the internet.

use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the host proxy may take to answer a `CONNECT`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostProxy {
    /// `host:port` of the proxy.
    address: String,
    /// `user:password` from the proxy URL, sent as Basic authorization.
    credentials: Option<String>,
    no_proxy: Vec<String>,
}

impl HostProxy {
    /// Reads `https_proxy`, `http_proxy` and `all_proxy` (either case, in
    /// that order) and `no_proxy`. Only `http://` proxies are used; any
    /// other scheme is logged and ignored.
    pub fn from_env() -> Option<Self> {
        let var = |name: &str| {
            std::env::var(name)
                .or_else(|_| std::env::var(name.to_ascii_uppercase()))
                .ok()
                .filter(|value| !value.trim().is_empty())
        };
        let url = ["https_proxy", "http_proxy", "all_proxy"]
            .iter()
            .find_map(|name| var(name))?;
        let no_proxy = var("no_proxy").unwrap_or_default();
        let parsed = Self::parse(&url, &no_proxy);
        if parsed.is_none() {
            tracing::warn!(
                proxy = %url,
                "ignoring the host's proxy setting: only http://host:port proxies are supported"
            );
        }
        parsed
    }

    fn parse(url: &str, no_proxy: &str) -> Option<Self> {
        let rest = url
            .trim()
            .strip_prefix("http://")
            .or_else(|| (!url.contains("://")).then_some(url.trim()))?;
        let authority = rest.split('/').next()?;
        let (credentials, address) = match authority.rsplit_once('@') {
            Some((credentials, address)) => (Some(credentials.to_string()), address),
            None => (None, authority),
        };
        let address = if address
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            address.to_string()
        } else {
            format!("{address}:80")
        };
        let no_proxy = no_proxy
            .split(',')
            .map(|entry| entry.trim().trim_start_matches('.').to_ascii_lowercase())
            .filter(|entry| !entry.is_empty())
            .collect();
        Some(Self {
            address,
            credentials,
            no_proxy,
        })
    }

    /// Whether `no_proxy` says to reach `host` directly.
    pub fn bypasses(&self, host: &str) -> bool {
        self.no_proxy.iter().any(|entry| {
            entry == "*"
                || host == entry
                || host
                    .strip_suffix(entry.as_str())
                    .is_some_and(|head| head.ends_with('.'))
        })
    }

    /// Opens a tunnel to `host:port` through the proxy.
    pub async fn connect(&self, host: &str, port: u16) -> std::io::Result<TcpStream> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner(host, port))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the host proxy {} did not answer CONNECT", self.address),
                )
            })?
    }

    async fn connect_inner(&self, host: &str, port: u16) -> std::io::Result<TcpStream> {
        let mut stream = TcpStream::connect(&self.address).await?;
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(credentials) = &self.credentials {
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            request.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;

        // Read the reply byte by byte so no byte of the tunnel is consumed.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > 16 * 1024 {
                return Err(std::io::Error::other(
                    "the host proxy sent an oversized reply",
                ));
            }
            let byte = stream.read_u8().await?;
            head.push(byte);
        }
        let status_line = String::from_utf8_lossy(&head);
        let status = status_line.split_whitespace().nth(1).unwrap_or("");
        if status != "200" {
            let line = status_line.lines().next().unwrap_or("").to_string();
            return Err(std::io::Error::other(format!(
                "the host proxy {} refused CONNECT {target}: {line}",
                self.address
            )));
        }
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_url_is_parsed() {
        let proxy =
            HostProxy::parse("http://user:pw@proxy.corp:3128/", ".corp, localhost").unwrap();
        assert_eq!(proxy.address, "proxy.corp:3128");
        assert_eq!(proxy.credentials.as_deref(), Some("user:pw"));
        assert!(proxy.bypasses("git.corp"));
        assert!(proxy.bypasses("localhost"));
        assert!(!proxy.bypasses("pypi.org"));
        assert_eq!(
            HostProxy::parse("proxy:8080", "").unwrap().address,
            "proxy:8080"
        );
        assert_eq!(
            HostProxy::parse("http://proxy", "").unwrap().address,
            "proxy:80"
        );
        assert_eq!(HostProxy::parse("socks5://proxy:1080", ""), None);
    }

    #[tokio::test]
    async fn connect_goes_through_the_proxy() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 1024];
            let n = stream.read(&mut request).await.unwrap();
            stream
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\ntunnel")
                .await
                .unwrap();
            String::from_utf8_lossy(&request[..n]).into_owned()
        });
        let proxy = HostProxy::parse(&format!("http://a:b@{address}"), "").unwrap();
        let mut stream = proxy.connect("pypi.org", 443).await.unwrap();
        let mut first = [0u8; 6];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"tunnel");
        let request = server.await.unwrap();
        assert!(
            request.starts_with("CONNECT pypi.org:443 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains("Proxy-Authorization: Basic YTpi\r\n"),
            "{request}"
        );
    }
}

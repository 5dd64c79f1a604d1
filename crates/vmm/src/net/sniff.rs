//! Reading the host name a client uses from the first bytes it sends: the
//! server name (SNI) of a TLS ClientHello, or the Host header of an HTTP
//! request.

/// Longest request head or ClientHello read before giving up.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// What the first bytes of a connection show.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sniffed {
    /// More bytes are needed to decide.
    Incomplete,
    /// A TLS ClientHello, with its server name if it has one.
    Tls(Option<String>),
    /// An HTTP request head.
    Http(HttpHead),
    /// Neither TLS nor HTTP.
    Other,
}

pub(crate) fn sniff(data: &[u8]) -> Sniffed {
    match data.first() {
        None => Sniffed::Incomplete,
        Some(0x16) => sniff_tls(data),
        Some(byte) if byte.is_ascii_uppercase() && !first_line_is_other(data) => {
            match parse_http_head(data) {
                Ok(Some(head)) => Sniffed::Http(head),
                Ok(None) if data.len() < MAX_HEAD => Sniffed::Incomplete,
                _ => Sniffed::Other,
            }
        }
        Some(_) => Sniffed::Other,
    }
}

/// Whether a complete first line is no HTTP/1 request line, as in the
/// banner an SSH client sends first.
fn first_line_is_other(data: &[u8]) -> bool {
    let Some(end) = data.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    let line = &data[..end];
    !(line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0"))
}

/// An HTTP/1 request head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct HttpHead {
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    /// Length of the head including the blank line that ends it.
    pub len: usize,
}

impl HttpHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The host of the Host header, without a port.
    pub fn host(&self) -> Option<String> {
        self.header("host").map(|host| split_host_port(host).0)
    }

    /// Writes the head back with `target` as the request target and the
    /// proxy-only headers removed. `Connection: close` makes the server end
    /// the connection after one response, so one guest connection never
    /// carries requests for two servers.
    pub fn rewrite(&self, target: &str) -> Vec<u8> {
        let mut out = format!("{} {} {}\r\n", self.method, target, self.version);
        for (key, value) in &self.headers {
            let lower = key.to_ascii_lowercase();
            if lower == "connection" || lower.starts_with("proxy-") || lower == "keep-alive" {
                continue;
            }
            out.push_str(&format!("{key}: {value}\r\n"));
        }
        out.push_str("Connection: close\r\n\r\n");
        out.into_bytes()
    }
}

/// Splits `host[:port]` or `[v6]:port`; the port is `None` when absent.
pub(crate) fn split_host_port(text: &str) -> (String, Option<u16>) {
    if let Some(rest) = text.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
            return (host.to_string(), port);
        }
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host.to_string(), port.parse().ok()),
        _ => (text.to_string(), None),
    }
}

/// Parses a request head; `Ok(None)` until the blank line has arrived.
fn parse_http_head(data: &[u8]) -> Result<Option<HttpHead>, ()> {
    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&data[..end]).map_err(|_| ())?;
    let mut lines = text.split("\r\n");
    let mut request = lines.next().ok_or(())?.split(' ');
    let (Some(method), Some(target), Some(version), None) = (
        request.next(),
        request.next(),
        request.next(),
        request.next(),
    ) else {
        return Err(());
    };
    if !version.starts_with("HTTP/1.") {
        return Err(());
    }
    let headers = lines
        .map(|line| {
            let (key, value) = line.split_once(':').ok_or(())?;
            Ok((key.trim().to_string(), value.trim().to_string()))
        })
        .collect::<Result<_, ()>>()?;
    Ok(Some(HttpHead {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers,
        len: end + 4,
    }))
}

/// Reads the server name from a ClientHello in the first TLS record.
fn sniff_tls(data: &[u8]) -> Sniffed {
    if data.len() < 5 {
        return Sniffed::Incomplete;
    }
    let record_len = usize::from(u16::from_be_bytes([data[3], data[4]]));
    if data[1] != 3 {
        return Sniffed::Other;
    }
    if data.len() < 5 + record_len {
        return Sniffed::Incomplete;
    }
    match client_hello_server_name(&data[5..5 + record_len]) {
        Some(name) => Sniffed::Tls(name),
        None => Sniffed::Other,
    }
}

/// Returns `Some(None)` for a ClientHello without a server name and `None`
/// for bytes that are not a ClientHello. A ClientHello split over several
/// records is treated as having no name.
fn client_hello_server_name(body: &[u8]) -> Option<Option<String>> {
    let mut reader = Reader(body);
    if reader.u8()? != 1 {
        return None;
    }
    let hello_len = reader.u24()?;
    let hello = reader.take(hello_len)?;
    let mut reader = Reader(hello);
    reader.take(2 + 32)?; // version, random
    let session = usize::from(reader.u8()?);
    reader.take(session)?;
    let suites = usize::from(reader.u16()?);
    reader.take(suites)?;
    let compression = usize::from(reader.u8()?);
    reader.take(compression)?;
    if reader.0.is_empty() {
        return Some(None);
    }
    let extensions_len = usize::from(reader.u16()?);
    let mut extensions = Reader(reader.take(extensions_len)?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let len = usize::from(extensions.u16()?);
        let data = extensions.take(len)?;
        if kind == 0 {
            return Some(server_name_extension(data));
        }
    }
    Some(None)
}

fn server_name_extension(data: &[u8]) -> Option<String> {
    let mut reader = Reader(data);
    let list_len = usize::from(reader.u16()?);
    let mut list = Reader(reader.take(list_len)?);
    while !list.0.is_empty() {
        let kind = list.u8()?;
        let len = usize::from(list.u16()?);
        let name = list.take(len)?;
        if kind == 0 {
            return std::str::from_utf8(name).ok().map(str::to_string);
        }
    }
    None
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ClientHello record carrying `name` as its server name.
    pub(crate) fn client_hello(name: &str) -> Vec<u8> {
        let name = name.as_bytes();
        let mut sni = Vec::new();
        sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        let mut extensions = vec![0, 0];
        extensions.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        extensions.extend_from_slice(&sni);

        let mut hello = vec![3, 3];
        hello.extend_from_slice(&[7; 32]);
        hello.push(0); // session id
        hello.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        hello.extend_from_slice(&[1, 0]); // null compression
        hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        hello.extend_from_slice(&extensions);

        let mut handshake = vec![1];
        handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&hello);
        let mut record = vec![0x16, 3, 1];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[test]
    fn tls_server_name_is_read() {
        let record = client_hello("pypi.org");
        assert_eq!(sniff(&record), Sniffed::Tls(Some("pypi.org".into())));
        assert_eq!(sniff(&record[..record.len() - 1]), Sniffed::Incomplete);
    }

    #[test]
    fn http_head_is_read() {
        let request = b"GET /simple/ HTTP/1.1\r\nHost: pypi.org:80\r\nAccept: */*\r\n\r\nbody";
        let Sniffed::Http(head) = sniff(request) else {
            panic!("expected an HTTP head");
        };
        assert_eq!(head.host().as_deref(), Some("pypi.org"));
        assert_eq!(head.len, request.len() - 4);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: x"), Sniffed::Incomplete);
    }

    #[test]
    fn other_protocols_are_recognised() {
        assert_eq!(sniff(b"SSH-2.0-OpenSSH_9.2\r\n"), Sniffed::Other);
        assert_eq!(sniff(b"SSH-2.0-Open"), Sniffed::Incomplete);
        assert_eq!(sniff(b"\x00\x01binary"), Sniffed::Other);
        assert_eq!(sniff(b"GET / SPDY/3\r\n\r\n"), Sniffed::Other);
    }

    #[test]
    fn rewrite_drops_proxy_headers() {
        let request =
            b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\nProxy-Connection: keep-alive\r\n\r\n";
        let Sniffed::Http(head) = sniff(request) else {
            panic!("expected an HTTP head");
        };
        let text = String::from_utf8(head.rewrite("/x")).unwrap();
        assert_eq!(
            text,
            "GET /x HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn host_and_port_split() {
        assert_eq!(split_host_port("a.org:8443"), ("a.org".into(), Some(8443)));
        assert_eq!(split_host_port("a.org"), ("a.org".into(), None));
        assert_eq!(split_host_port("[::1]:80"), ("::1".into(), Some(80)));
    }
}

//! Bounded tails of VMM output: the guest console and the VMM's standard
//! error, kept for the messages of failed starts.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The last bytes written to a stream.
#[derive(Default)]
pub struct TailBuffer {
    bytes: Vec<u8>,
    keep: usize,
}

/// A tail shared between its reader task and the process that reports it.
pub type SharedTail = Arc<Mutex<TailBuffer>>;

impl TailBuffer {
    pub fn new(keep: usize) -> Self {
        Self {
            bytes: Vec::new(),
            keep,
        }
    }

    pub fn shared(keep: usize) -> SharedTail {
        Arc::new(Mutex::new(Self::new(keep)))
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > self.keep {
            let excess = self.bytes.len() - self.keep;
            self.bytes.drain(..excess);
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Copies `reader` into `tail` until end of file or an error.
pub async fn read_into(mut reader: impl AsyncRead + Unpin, tail: SharedTail) {
    let mut chunk = vec![0u8; 4096];
    while let Ok(n) = reader.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        tail.lock().unwrap().push(&chunk[..n]);
    }
}

/// Returns at most the last `max` bytes of `text`, starting on a character
/// boundary.
pub fn last_chars(text: &str, max: usize) -> &str {
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_buffer_keeps_last_bytes() {
        let mut buffer = TailBuffer::new(4);
        buffer.push(b"abc");
        buffer.push(b"defg");

        assert_eq!(buffer.text(), "defg");
    }

    #[tokio::test]
    async fn read_into_keeps_the_end_of_a_stream() {
        let tail = TailBuffer::shared(3);
        read_into(&b"hello world"[..], tail.clone()).await;

        assert_eq!(tail.lock().unwrap().text(), "rld");
    }

    #[test]
    fn last_chars_respects_boundaries() {
        assert_eq!(last_chars("héllo", 4), "llo");
        assert_eq!(last_chars("abc", 10), "abc");
    }
}

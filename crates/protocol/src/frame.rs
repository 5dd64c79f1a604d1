use std::io::{self, Read, Write};

/// Length of a frame header in bytes.
pub const HEADER_LEN: usize = 9;

/// Maximum payload of one frame. Both sides reject larger frames, so a peer
/// cannot make the other allocate without bound.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// What a frame's payload carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Host to guest: a JSON [`crate::Request`].
    Request = 1,
    /// Guest to host: the JSON [`crate::Response`] that ends a request.
    Response = 2,
    /// Guest to host: raw bytes the command wrote to its stdout.
    Stdout = 3,
    /// Guest to host: raw bytes the command wrote to its stderr.
    Stderr = 4,
    /// Host to guest: raw bytes for the command's stdin.
    Stdin = 5,
    /// Host to guest: end of the command's stdin.
    StdinEof = 6,
    /// Guest to host: the JSON [`crate::Hello`] sent once the agent is ready.
    Hello = 7,
    /// Either way: a chunk of a file being copied.
    FileData = 8,
    /// Host to guest: the end of a file being written.
    FileEnd = 9,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Stdout,
            4 => Self::Stderr,
            5 => Self::Stdin,
            6 => Self::StdinEof,
            7 => Self::Hello,
            8 => Self::FileData,
            9 => Self::FileEnd,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: FrameKind, stream: u32, payload: Vec<u8>) -> Self {
        Self {
            kind,
            stream,
            payload,
        }
    }

    /// Encodes a frame whose payload is `value` as JSON.
    pub fn json<T: serde::Serialize>(kind: FrameKind, stream: u32, value: &T) -> Self {
        let payload = serde_json::to_vec(value).expect("protocol messages always serialize");
        Self::new(kind, stream, payload)
    }

    /// Decodes the payload as JSON.
    pub fn parse<'a, T: serde::Deserialize<'a>>(&'a self) -> Result<T, FrameError> {
        serde_json::from_slice(&self.payload).map_err(FrameError::Json)
    }

    /// Encodes the header and payload into one buffer, so a single write
    /// sends the whole frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(HEADER_LEN + self.payload.len());
        buf.extend_from_slice(&Self::header(self.kind, self.stream, self.payload.len()));
        buf.extend_from_slice(&self.payload);
        buf
    }

    /// Encodes the header for a payload of `len` bytes.
    pub fn header(kind: FrameKind, stream: u32, len: usize) -> [u8; HEADER_LEN] {
        assert!(
            len <= MAX_PAYLOAD,
            "frame payload of {len} bytes exceeds the maximum"
        );
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&(len as u32).to_le_bytes());
        header[4] = kind as u8;
        header[5..].copy_from_slice(&stream.to_le_bytes());
        header
    }

    /// Decodes a header into kind, stream id and payload length.
    pub fn parse_header(header: &[u8; HEADER_LEN]) -> Result<(FrameKind, u32, usize), FrameError> {
        let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        let kind = FrameKind::from_byte(header[4]).ok_or(FrameError::UnknownKind(header[4]))?;
        let stream = u32::from_le_bytes(header[5..].try_into().unwrap());
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        Ok((kind, stream, len))
    }
}

/// Errors from reading or decoding a frame.
#[derive(Debug)]
pub enum FrameError {
    Io(io::Error),
    UnknownKind(u8),
    TooLarge(usize),
    Json(serde_json::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(err) => write!(f, "channel I/O failed: {err}"),
            Self::UnknownKind(byte) => write!(f, "unknown frame kind {byte}"),
            Self::TooLarge(len) => {
                write!(
                    f,
                    "frame payload of {len} bytes exceeds the maximum of {MAX_PAYLOAD}"
                )
            }
            Self::Json(err) => write!(f, "invalid JSON message: {err}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<io::Error> for FrameError {
    fn from(err: io::Error) -> Self {
        Self::Io(err)
    }
}

/// Reads one frame. Returns `Ok(None)` on a clean end of stream between frames.
pub fn read_frame(reader: &mut impl Read) -> Result<Option<Frame>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match reader.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err.into()),
        }
    }
    let (kind, stream, len) = Frame::parse_header(&header)?;
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload)?;
    Ok(Some(Frame {
        kind,
        stream,
        payload,
    }))
}

/// Writes one frame with a single `write_all` so frames from several threads
/// never interleave when the caller holds the writer's lock.
pub fn write_frame(writer: &mut impl Write, frame: &Frame) -> io::Result<()> {
    writer.write_all(&frame.encode())?;
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip() {
        let frame = Frame::new(FrameKind::Stdout, 7, vec![0, 159, 146, 150, 255]);
        let mut buf = Vec::new();
        write_frame(&mut buf, &frame).unwrap();
        let decoded = read_frame(&mut buf.as_slice()).unwrap().unwrap();
        assert_eq!(decoded, frame);
    }

    #[test]
    fn clean_end_of_stream() {
        assert!(read_frame(&mut [].as_slice()).unwrap().is_none());
    }

    #[test]
    fn truncated_header_is_an_error() {
        let err = read_frame(&mut [1u8, 0, 0].as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::Io(_)));
    }

    #[test]
    fn oversized_frame_rejected() {
        let mut header = Frame::header(FrameKind::Stdout, 1, 0);
        header[..4].copy_from_slice(&((MAX_PAYLOAD as u32) + 1).to_le_bytes());
        let err = read_frame(&mut header.as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_)));
    }

    #[test]
    fn unknown_kind_rejected() {
        let mut header = Frame::header(FrameKind::Stdout, 1, 0);
        header[4] = 200;
        let err = read_frame(&mut header.as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::UnknownKind(200)));
    }
}

//! Wire protocol between the host and the guest agent.
//!
//! Both sides exchange frames over one byte stream: a virtio-serial port under
//! QEMU, a vsock connection under Firecracker. A frame is a 9-byte header
//! (payload length as `u32` little endian, a [`FrameKind`] byte, a stream id as
//! `u32` little endian) followed by the payload. Control messages
//! ([`Request`], [`Response`], [`Hello`]) are JSON; output, input and file
//! contents are raw bytes, so binary data needs no encoding.
//!
//! A stream id names one request and everything that belongs to it: the host
//! picks a fresh id for every request, and the agent tags the output and the
//! final [`Response`] of that request with the same id. Stream id 0 is the
//! agent's [`Hello`].

mod frame;
mod message;

pub use frame::{read_frame, write_frame, Frame, FrameError, FrameKind, HEADER_LEN, MAX_PAYLOAD};
pub use message::{
    DirEntry, ErrorKind, ExecRequest, ExitStatus, Hello, Request, Response, PROTOCOL_VERSION,
};

/// Name of the virtio-serial port the agent listens on, as seen in
/// `/sys/class/virtio-ports/*/name` inside the guest.
pub const SERIAL_PORT_NAME: &str = "upstream.agent";

/// The vsock port the agent connects to on the host (CID 2) under Firecracker.
pub const VSOCK_PORT: u32 = 1024;

//! Opening the byte stream to the host.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::init::BootConfig;
use crate::init::ChannelSpec;

/// The channel as a file: reads and writes go straight to the device or
/// socket.
pub type Channel = File;

pub fn open(boot: &BootConfig) -> io::Result<Channel> {
    match &boot.channel {
        ChannelSpec::VirtioPort => open_virtio_port(),
        ChannelSpec::Vsock(port) => connect_vsock(*port),
        ChannelSpec::UnixSocket(path) => {
            let stream = UnixStream::connect(path)?;
            Ok(File::from(OwnedFd::from(stream)))
        }
    }
}

/// Finds the port by name in sysfs (there is no udev to make a by-name link)
/// and opens its device node.
fn open_virtio_port() -> io::Result<Channel> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(device) = find_virtio_port()? {
            return OpenOptions::new().read(true).write(true).open(device);
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no virtio-serial port named {}",
                    upstream_protocol::SERIAL_PORT_NAME
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn find_virtio_port() -> io::Result<Option<PathBuf>> {
    let entries = match fs::read_dir("/sys/class/virtio-ports") {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    for entry in entries {
        let entry = entry?;
        let name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == upstream_protocol::SERIAL_PORT_NAME {
            return Ok(Some(PathBuf::from("/dev").join(entry.file_name())));
        }
    }
    Ok(None)
}

/// Connects to the host over vsock. Firecracker forwards a guest connection
/// to port P to the Unix socket `<uds_path>_P` on which the host listens.
fn connect_vsock(port: u32) -> io::Result<Channel> {
    // SAFETY: plain socket call; the descriptor is owned right after.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    crate::init::check(fd)?;
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_HOST;
    addr.svm_port = port;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: `addr` is a valid sockaddr_vm of the given length.
        let rc = unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(File::from(owned));
        }
        let err = io::Error::last_os_error();
        if Instant::now() > deadline {
            return Err(err);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

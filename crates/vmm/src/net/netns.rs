//! Named network namespaces: created with `unshare(CLONE_NEWNET)` on a
//! short-lived thread and named by a bind mount under [`NETNS_DIR`], the
//! folder where `ip netns` and the jailer's `--netns` look for them.
//!
//! A thread that calls `setns` changes only its own namespace, and a socket
//! stays in the namespace it was created in. So code that must open sockets
//! or devices in a namespace runs on a new thread through
//! [`NetworkNamespace::enter`], and the thread ends afterwards.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Folder of named network namespaces, shared with iproute2.
pub const NETNS_DIR: &str = "/run/netns";

/// Returns the path that names the network namespace of sandbox `id`. It
/// contains the id, so the sweep can find the namespace of a sandbox whose
/// upstream process died.
pub fn path_of(id: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(format!("upstream-{id}"))
}

/// An open network namespace and its name. Clones share the open
/// namespace. The name stays until [`NetworkNamespace::remove`].
#[derive(Clone, Debug)]
pub struct NetworkNamespace {
    path: PathBuf,
    file: Arc<OwnedFd>,
}

impl NetworkNamespace {
    /// Creates an empty network namespace named `path`, which must be in
    /// [`NETNS_DIR`] and must not exist. Needs root.
    pub fn create(path: &Path) -> io::Result<Self> {
        prepare_dir()?;
        // The mount point is created first, and `create_new` fails if the
        // name is taken.
        File::options().write(true).create_new(true).open(path)?;
        let mounted = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: unshare takes only flags. It moves this thread,
                    // which ends with the scope, into a new namespace.
                    if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    bind_mount(Path::new("/proc/thread-self/ns/net"), path)
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        let opened = mounted.and_then(|()| File::open(path));
        match opened {
            Ok(file) => Ok(Self {
                path: path.to_path_buf(),
                file: Arc::new(file.into()),
            }),
            Err(err) => {
                let _ = remove(path);
                Err(err)
            }
        }
    }

    /// Opens the existing network namespace named `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Arc::new(file.into()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the open namespace, for `setns` in a child process before
    /// `exec`.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.file.as_fd()
    }

    /// Runs `task` on a new thread that has joined this namespace and
    /// returns its result. Sockets and devices the task opens belong to
    /// the namespace. Blocks until the task is done.
    pub fn enter<T: Send>(&self, task: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        let fd = self.file.as_raw_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(fd)?;
                    task()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Removes the namespace's name. The namespace itself ends once no
    /// process, socket or open descriptor (such as a clone of this value)
    /// uses it.
    pub fn remove(&self) -> io::Result<()> {
        remove(&self.path)
    }
}

/// Moves the calling thread into the network namespace open as `fd`.
/// Async-signal-safe, so a child process may call it before `exec`.
pub fn setns(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: setns takes a descriptor and flags; a closed or wrong
    // descriptor makes it fail with EBADF or EINVAL.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes the name `path` of a network namespace: unmounts it and deletes
/// the file. A name that does not exist is not an error.
pub fn remove(path: &Path) -> io::Result<()> {
    let c_path = c_path(path)?;
    // SAFETY: the pointer is a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) } < 0 {
        let err = io::Error::last_os_error();
        // EINVAL: not a mount point, as after a failed create.
        if !matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
            return Err(err);
        }
    }
    match fs::remove_file(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Creates [`NETNS_DIR`] and makes it a shared mount, as `ip netns add`
/// does. Mount namespaces created later, such as the jailer's, get copies
/// of the names in it, and each copy keeps its namespace alive. A shared
/// mount passes an unmount on to those copies.
fn prepare_dir() -> io::Result<()> {
    static PREPARED: Mutex<bool> = Mutex::new(false);
    let mut prepared = PREPARED.lock().unwrap();
    if *prepared {
        return Ok(());
    }
    fs::create_dir_all(NETNS_DIR)?;
    let dir = Path::new(NETNS_DIR);
    if let Err(err) = make_shared(dir) {
        // EINVAL: the folder is not a mount point yet.
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
        bind_mount(dir, dir)?;
        make_shared(dir)?;
    }
    *prepared = true;
    Ok(())
}

fn make_shared(path: &Path) -> io::Result<()> {
    mount(None, path, libc::MS_SHARED | libc::MS_REC)
}

fn bind_mount(source: &Path, target: &Path) -> io::Result<()> {
    mount(Some(source), target, libc::MS_BIND | libc::MS_REC)
}

fn mount(source: Option<&Path>, target: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let source = source.map(c_path).transpose()?;
    let target = c_path(target)?;
    let source_ptr = source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: the pointers are NUL-terminated strings that outlive the
    // call, or null where mount(2) allows it.
    let rc = unsafe {
        libc::mount(
            source_ptr,
            target.as_ptr(),
            c"none".as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

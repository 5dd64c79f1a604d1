//! Advisory file locks (`flock(2)`) used for context locks, the gc lock and temp blobs.
//!
//! The kernel releases an `flock` lock when the last descriptor of its open file description
//! closes, which includes the death of the owning process by `kill -9`. A lock therefore never
//! outlives its owner, and no pid liveness check (with its pid-reuse hazard) is needed.
//! Locks taken through separate `open` calls conflict with each other even inside one process,
//! so two threads that each open the lock file are serialised like two processes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Result, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockMode {
    Shared,
    Exclusive,
}

impl LockMode {
    fn operation(self) -> libc::c_int {
        match self {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        }
    }
}

/// A held lock on a file; dropping it closes the file and so releases the lock.
#[derive(Debug)]
pub(crate) struct FileLock {
    // Only kept open: closing the descriptor is what releases the lock.
    _file: File,
}

impl FileLock {
    /// Takes the lock on `path`, creating the file, and blocks until it is free.
    pub(crate) fn acquire(path: &Path, mode: LockMode) -> Result<FileLock> {
        let file = open_lock_file(path)?;
        flock(&file, mode.operation()).map_err(|source| StoreError::io("lock", path, source))?;
        Ok(FileLock { _file: file })
    }

    /// Takes the lock on `path`, creating the file, or returns `None` when another holder has it.
    pub(crate) fn try_acquire(path: &Path, mode: LockMode) -> Result<Option<FileLock>> {
        let file = open_lock_file(path)?;
        if !try_flock(&file, mode).map_err(|source| StoreError::io("lock", path, source))? {
            return Ok(None);
        }
        Ok(Some(FileLock { _file: file }))
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    // std opens with O_CLOEXEC, so processes spawned while the lock is held (a VMM, say) do
    // not inherit the descriptor and cannot keep the lock alive after this process dies.
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map_err(|source| StoreError::io("open lock file", path, source))
}

/// Blocks until `file` is locked in `mode`.
pub(crate) fn lock_file(file: &File, mode: LockMode) -> io::Result<()> {
    flock(file, mode.operation())
}

/// Locks `file` in `mode` without blocking; returns false when another holder has it.
pub(crate) fn try_flock(file: &File, mode: LockMode) -> io::Result<bool> {
    match flock(file, mode.operation() | libc::LOCK_NB) {
        Ok(()) => Ok(true),
        Err(error) if error.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(error) => Err(error),
    }
}

fn flock(file: &File, operation: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: the descriptor belongs to `file`, which is open for the whole call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), operation) };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

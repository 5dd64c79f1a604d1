//! The VMM's working directory and the files placed in it.
//!
//! Firecracker runs with its working directory set to the sandbox's run
//! folder, or to the chroot that the jailer builds inside it, and every
//! path the backend sends is relative to that directory. A snapshot records
//! those relative paths, so it loads in any other sandbox's folder that has
//! the same names in place.

use std::fs;
use std::io;
use std::os::unix::fs::{chown, symlink};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use crate::{Error, Result};

/// The files of one VMM, by their host paths.
#[derive(Debug)]
pub struct Layout {
    root: PathBuf,
    /// The jailed user and group that must own writable files and sockets.
    owner: Option<(u32, u32)>,
    /// The folder to remove on teardown when the backend created it (the
    /// jail); `None` when the root is the caller's run folder.
    remove_tree: Option<PathBuf>,
    created: Vec<PathBuf>,
}

impl Layout {
    /// Files placed directly in the run folder, for a VMM without a jail.
    pub fn unconfined(run_dir: &Path) -> Self {
        Self {
            root: run_dir.to_path_buf(),
            owner: None,
            remove_tree: None,
            created: Vec::new(),
        }
    }

    /// Files placed in the jailer's chroot `root`, owned by `uid`:`gid`;
    /// `tree` is removed on teardown.
    pub fn jailed(root: PathBuf, tree: PathBuf, uid: u32, gid: u32) -> Result<Self> {
        fs::create_dir_all(&root).map_err(Error::io(format!("creating {}", root.display())))?;
        Ok(Self {
            root,
            owner: Some((uid, gid)),
            remove_tree: Some(tree),
            created: Vec::new(),
        })
    }

    /// Returns the VMM's working directory on the host.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Makes `source` visible to the VMM as `name`.
    ///
    /// Without a jail a symbolic link does. In a chroot a link would point
    /// outside it, so the file is hard-linked, or copied when it is on
    /// another file system. Writable files are handed to the jailed user.
    /// Read-only ones must be readable by it already, because a hard link
    /// shares the owner and mode of its source.
    pub fn place(&mut self, source: &Path, name: &str, writable: bool) -> Result<()> {
        let target = self.path(name);
        if source == target {
            return Ok(());
        }
        let context = || format!("placing {} at {}", source.display(), target.display());
        remove_if_exists(&target).map_err(Error::io(context()))?;
        if self.owner.is_none() {
            let source = source.canonicalize().map_err(Error::io(context()))?;
            symlink(&source, &target).map_err(Error::io(context()))?;
        } else {
            match fs::hard_link(source, &target) {
                Ok(()) => {}
                Err(err) if err.raw_os_error() == Some(libc::EXDEV) => {
                    tracing::warn!(
                        file = %source.display(),
                        "copying into the jail because it is on another file system; keep \
                         the data directory on one file system so files can be hard-linked"
                    );
                    crate::disk::copy_sparse(source, &target)?;
                }
                Err(err) => return Err(Error::io(context())(err)),
            }
        }
        self.created.push(target.clone());
        if writable {
            self.hand_over(&target)?;
        }
        Ok(())
    }

    /// Listens on the Unix socket `name` before the VMM needs it.
    pub fn listen(&mut self, name: &str) -> Result<UnixListener> {
        let path = self.path(name);
        check_socket_path(&path)?;
        remove_if_exists(&path).map_err(Error::io(format!("removing {}", path.display())))?;
        let listener = UnixListener::bind(&path)
            .map_err(Error::io(format!("listening on {}", path.display())))?;
        self.created.push(path.clone());
        // The jailed VMM connects as its own user, which needs write
        // permission on the socket file.
        self.hand_over(&path)?;
        Ok(listener)
    }

    /// Records a file that the VMM creates in its directory (its sockets,
    /// snapshot files), so teardown removes it.
    pub fn expect(&mut self, name: &str) -> PathBuf {
        let path = self.path(name);
        self.created.push(path.clone());
        path
    }

    fn hand_over(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.owner {
            chown(path, Some(uid), Some(gid)).map_err(Error::io(format!(
                "changing the owner of {}",
                path.display()
            )))?;
        }
        Ok(())
    }

    /// Removes every file the backend and the VMM created; the run folder
    /// itself belongs to the caller.
    pub fn remove(&self) {
        for path in &self.created {
            let _ = remove_if_exists(path);
        }
        if let Some(tree) = &self.remove_tree {
            if let Err(err) = fs::remove_dir_all(tree) {
                if err.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(dir = %tree.display(), error = %err, "removing the jail failed");
                }
            }
        }
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// Rejects socket paths that do not fit `sun_path`, whose 108 bytes include
/// the terminating NUL.
pub fn check_socket_path(path: &Path) -> Result<()> {
    if path.as_os_str().len() > 107 {
        return Err(Error::SocketPathTooLong(path.to_path_buf()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unconfined_place_links_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("vmlinux");
        fs::write(&source, b"kernel").unwrap();
        let mut layout = Layout::unconfined(dir.path());

        layout.place(&source, "kernel", false).unwrap();
        let linked = dir.path().join("kernel");
        assert!(fs::symlink_metadata(&linked).unwrap().is_symlink());
        assert_eq!(fs::read(&linked).unwrap(), b"kernel");

        layout.remove();
        assert!(!linked.exists());
        assert!(source.exists());
    }

    #[test]
    fn place_onto_itself_is_noop() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("scratch-disk");
        fs::write(&source, b"disk").unwrap();
        let mut layout = Layout::unconfined(dir.path());

        layout.place(&source, "scratch-disk", true).unwrap();
        layout.remove();

        assert_eq!(fs::read(&source).unwrap(), b"disk");
    }

    #[test]
    fn jailed_place_hard_links() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("rootfs.ext4");
        fs::write(&source, b"root").unwrap();
        let tree = dir.path().join("jail");
        let root = tree.join("firecracker/sb-1/root");
        let uid = unsafe { libc::geteuid() };
        let gid = unsafe { libc::getegid() };
        let mut layout = Layout::jailed(root.clone(), tree.clone(), uid, gid).unwrap();

        layout.place(&source, "root-disk", true).unwrap();
        let placed = root.join("root-disk");
        assert!(!fs::symlink_metadata(&placed).unwrap().is_symlink());
        assert_eq!(fs::read(&placed).unwrap(), b"root");

        layout.remove();
        assert!(!tree.exists());
        assert!(source.exists());
    }

    #[tokio::test]
    async fn listen_rejects_long_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut layout = Layout::unconfined(&dir.path().join("x".repeat(100)));

        let err = layout.listen("v.sock_1024").unwrap_err();

        assert!(matches!(err, Error::SocketPathTooLong(_)), "{err}");
    }
}

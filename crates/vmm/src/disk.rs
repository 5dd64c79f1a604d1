//! Per-sandbox scratch disks.
//!
//! Each sandbox writes to its own ext4 disk, the upper layer of its root.
//! Formatting costs tens of milliseconds, so one empty disk per size is
//! formatted once and copied for each sandbox; the copy skips holes, and a
//! fresh ext4 is almost all holes. The guest mounts it with `noinit_itable`
//! so no background thread zeroes inode tables of a disk that lives minutes.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// Returns the empty template disk of `size_mib`, formatting it on first use.
pub fn template(dir: &Path, size_mib: u32) -> Result<PathBuf> {
    let path = dir.join(format!("scratch-{size_mib}.ext4"));
    if path.exists() {
        return Ok(path);
    }
    fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    let temp = dir.join(format!(".scratch-{size_mib}.{}.tmp", std::process::id()));
    let file = File::create(&temp).map_err(Error::io(format!("creating {}", temp.display())))?;
    file.set_len(u64::from(size_mib) << 20)
        .map_err(Error::io(format!("sizing {}", temp.display())))?;
    drop(file);

    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-O", "^has_journal"])
        .args(["-E", "lazy_itable_init=1,nodiscard"])
        .arg(&temp)
        .output();
    let output = match output {
        Ok(output) => output,
        Err(err) => {
            let _ = fs::remove_file(&temp);
            let message = "running mkfs.ext4 failed; install e2fsprogs".to_string();
            return Err(Error::io(message)(err));
        }
    };
    if !output.status.success() {
        let _ = fs::remove_file(&temp);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message = format!("mkfs.ext4 failed on {}: {}", temp.display(), stderr.trim());
        return Err(Error::io(message)(io::Error::other("mkfs.ext4 failed")));
    }
    fs::rename(&temp, &path).map_err(Error::io(format!("renaming {}", temp.display())))?;
    Ok(path)
}

/// Moves a file a VMM wrote into a snapshot folder: a rename on the same file
/// system, else a sparse copy and the removal of the original.
pub fn move_file(from: &Path, to: &Path) -> Result<()> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::EXDEV) => {
            copy_sparse(from, to)?;
            let _ = fs::remove_file(from);
            Ok(())
        }
        Err(err) => Err(Error::io(format!(
            "moving {} to {}",
            from.display(),
            to.display()
        ))(err)),
    }
}

/// Copies `src` to `dst`, leaving holes as holes.
pub fn copy_sparse(src: &Path, dst: &Path) -> Result<()> {
    let context = || format!("copying {} to {}", src.display(), dst.display());
    let input = File::open(src).map_err(Error::io(context()))?;
    let output = File::create(dst).map_err(Error::io(context()))?;
    let len = input.metadata().map_err(Error::io(context()))?.len();
    output.set_len(len).map_err(Error::io(context()))?;

    let mut offset: i64 = 0;
    while (offset as u64) < len {
        // SAFETY: lseek on a descriptor owned by `input`.
        let data = unsafe { libc::lseek(input.as_raw_fd(), offset, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after `offset`, only a trailing hole.
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(input.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        copy_range(&input, &output, data, end - data).map_err(Error::io(context()))?;
        offset = end;
    }
    Ok(())
}

fn copy_range(input: &File, output: &File, start: i64, mut len: i64) -> io::Result<()> {
    let mut in_offset = start;
    let mut out_offset = start;
    while len > 0 {
        // SAFETY: both descriptors are valid and the offsets are owned locals.
        let copied = unsafe {
            libc::copy_file_range(
                input.as_raw_fd(),
                &mut in_offset,
                output.as_raw_fd(),
                &mut out_offset,
                len as usize,
                0,
            )
        };
        if copied < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if copied == 0 {
            break;
        }
        len -= copied as i64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut file = File::create(&src).unwrap();
        file.set_len(64 << 20).unwrap();
        file.seek(SeekFrom::Start(32 << 20)).unwrap();
        file.write_all(b"middle").unwrap();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.write_all(b"start").unwrap();
        drop(file);

        let dst = dir.path().join("dst");
        copy_sparse(&src, &dst).unwrap();
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        let allocated = fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(allocated < 4 << 20, "copy allocated {allocated} bytes");
    }
}

//! The initramfs that carries the guest agent.
//!
//! It holds the agent as `/upstream-agent` (started with `rdinit=`), a
//! `/dev/console` node so the agent has stdio before it mounts devtmpfs, and
//! the mount points it needs. The format is the kernel's uncompressed
//! `newc` cpio, written here directly: a few hundred bytes of headers.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Builds (once per agent binary) the initramfs for `agent` under `dir`
/// and returns its path.
pub fn ensure(dir: &Path, agent: &Path) -> Result<PathBuf> {
    let binary = fs::read(agent).map_err(|_| Error::AgentMissing(agent.to_path_buf()))?;
    let hash = hex::encode(Sha256::digest(&binary));
    let folder = dir.join(&hash[..16]);
    let path = folder.join("initramfs.cpio");
    fs::create_dir_all(&folder).map_err(Error::io(format!("creating {}", folder.display())))?;
    install_agent_copy(&agent_beside(&path), &binary)?;
    if path.exists() {
        return Ok(path);
    }
    let temp = folder.join(format!(".initramfs.{}.tmp", std::process::id()));
    let mut out = io::BufWriter::new(
        fs::File::create(&temp).map_err(Error::io(format!("creating {}", temp.display())))?,
    );
    write_archive(&mut out, &binary).map_err(Error::io(format!("writing {}", temp.display())))?;
    out.into_inner()
        .map_err(|err| Error::io(format!("writing {}", temp.display()))(err.into_error()))?;
    fs::rename(&temp, &path).map_err(Error::io(format!("renaming {}", temp.display())))?;
    Ok(path)
}

/// The copy of the agent binary kept beside `initramfs`. QEMU runs it on
/// the host as the network relay (`upstream-agent net-relay`), so a sandbox
/// needs no other helper binary.
pub fn agent_beside(initramfs: &Path) -> PathBuf {
    initramfs.with_file_name("upstream-agent")
}

fn install_agent_copy(path: &Path, binary: &[u8]) -> Result<()> {
    if fs::metadata(path).is_ok_and(|meta| meta.len() == binary.len() as u64) {
        return Ok(());
    }
    let temp = path.with_extension(format!("{}.tmp", std::process::id()));
    let write = || -> io::Result<()> {
        fs::write(&temp, binary)?;
        fs::set_permissions(&temp, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        fs::rename(&temp, path)
    };
    write().map_err(Error::io(format!("writing {}", path.display())))
}

fn write_archive(out: &mut impl Write, agent: &[u8]) -> io::Result<()> {
    let mut inode = 1;
    for dir in ["dev", "proc", "sys", "lower", "layer", "root"] {
        write_entry(out, &mut inode, dir, 0o040755, 0, &[])?;
    }
    // Character device 5:1 is the console.
    write_entry(out, &mut inode, "dev/console", 0o020600, makedev(5, 1), &[])?;
    write_entry(out, &mut inode, "upstream-agent", 0o100755, 0, agent)?;
    write_entry(out, &mut inode, "TRAILER!!!", 0, 0, &[])
}

fn makedev(major: u32, minor: u32) -> u64 {
    (u64::from(major) << 32) | u64::from(minor)
}

fn write_entry(
    out: &mut impl Write,
    inode: &mut u32,
    name: &str,
    mode: u32,
    rdev: u64,
    data: &[u8],
) -> io::Result<()> {
    let name_len = name.len() + 1;
    let fields = [
        *inode,
        mode,
        0,                           // uid
        0,                           // gid
        1,                           // nlink
        0,                           // mtime
        data.len() as u32,           // file size
        0,                           // dev major
        0,                           // dev minor
        (rdev >> 32) as u32,         // rdev major
        (rdev & 0xffff_ffff) as u32, // rdev minor
        name_len as u32,
        0, // check
    ];
    *inode += 1;
    write!(out, "070701")?;
    for field in fields {
        write!(out, "{field:08x}")?;
    }
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad(out, 110 + name_len)?;
    out.write_all(data)?;
    pad(out, data.len())
}

/// Pads to the next multiple of four bytes, as newc requires after the
/// header-and-name and after the data.
fn pad(out: &mut impl Write, written: usize) -> io::Result<()> {
    let padding = (4 - written % 4) % 4;
    out.write_all(&[0u8; 3][..padding])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_entries_are_aligned() {
        let mut out = Vec::new();
        write_archive(&mut out, b"agent!").unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("upstream-agent"));
        assert!(text.contains("TRAILER!!!"));
    }
}

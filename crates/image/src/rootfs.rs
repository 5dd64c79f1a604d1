//! Building the read-only ext4 root filesystem from a directory tree with `mkfs.ext4 -d`.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::ImageError;

/// Directories the guest agent mounts file systems on, with their modes. An image that lacks
/// one gets it empty, because a read-only root cannot grow a mount point at boot.
pub(crate) const GUEST_DIRS: [(&str, u32); 5] = [
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("tmp", 0o1777),
    ("run", 0o755),
];

const BLOCK_SIZE: u64 = 4096;
const INODE_SIZE: u64 = 256;

/// Space and inode counts of a tree, counting each hard-linked inode once.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TreeUsage {
    /// Bytes of data blocks the files, directories and long symlinks occupy in ext4.
    pub block_bytes: u64,
    pub inodes: u64,
}

/// Measures `root` without following symlinks.
pub(crate) fn measure_tree(root: &Path) -> io::Result<TreeUsage> {
    let mut usage = TreeUsage::default();
    let mut seen_inodes = HashSet::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let metadata = fs::symlink_metadata(&path)?;
        if metadata.nlink() > 1 && !metadata.is_dir() && !seen_inodes.insert(metadata.ino()) {
            continue;
        }
        usage.inodes += 1;
        let file_type = metadata.file_type();
        // Symlinks up to 59 bytes live inside the inode ("fast symlinks").
        let data_bytes = if file_type.is_symlink() && metadata.len() < 60 {
            0
        } else if file_type.is_file() || file_type.is_dir() || file_type.is_symlink() {
            metadata.len().max(1)
        } else {
            0
        };
        usage.block_bytes += data_bytes.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        if file_type.is_dir() {
            for child in fs::read_dir(&path)? {
                pending.push(child?.path());
            }
        }
    }
    Ok(usage)
}

/// Returns the file system size in bytes and inode count for a tree of `usage`.
///
/// The headroom covers ext4 metadata (extent blocks, bitmaps, group descriptors, directory
/// index blocks and xattr blocks): an eighth of the data plus 16 MiB, which leaves small
/// images room for the fixed costs and large ones room for per-file overhead.
fn filesystem_size(usage: TreeUsage) -> (u64, u64) {
    let inodes = usage.inodes + usage.inodes / 10 + 1024;
    let bytes = usage.block_bytes + usage.block_bytes / 8 + inodes * INODE_SIZE + (16 << 20);
    (bytes.div_ceil(BLOCK_SIZE) * BLOCK_SIZE, inodes)
}

/// Creates the missing [`GUEST_DIRS`] in a tree that this crate owns.
pub(crate) fn add_guest_dirs(tree: &Path) -> io::Result<()> {
    for (name, mode) in GUEST_DIRS {
        let path = tree.join(name);
        if fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        fs::create_dir(&path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Builds an ext4 image of `tree` at `output`, which must not exist yet.
///
/// The image has no journal because it is mounted read-only. `mkfs.ext4` copies ownership,
/// modes, hard links, symlinks, device nodes and xattrs from the tree, so it must run as
/// root for ownership other than the caller's to survive. `missing_guest_dirs` lists
/// [`GUEST_DIRS`] entries to add inside the image with `debugfs`, for trees this crate must
/// not modify.
pub(crate) fn build_ext4(
    reference: &str,
    tree: &Path,
    output: &Path,
    missing_guest_dirs: &[(&str, u32)],
) -> Result<(), ImageError> {
    let usage = measure_tree(tree).map_err(|source| ImageError::io(reference, tree, source))?;
    let (bytes, inodes) = filesystem_size(usage);
    let file =
        fs::File::create_new(output).map_err(|source| ImageError::io(reference, output, source))?;
    file.set_len(bytes)
        .map_err(|source| ImageError::io(reference, output, source))?;
    drop(file);

    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-b", "4096", "-I", "256", "-m", "0"])
        .args(["-O", "^has_journal,^resize_inode", "-L", "upstream-root"])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-d")
        .arg(tree)
        .arg(output);
    run_tool(reference, &mut mkfs, "mkfs.ext4")?;

    for (name, mode) in missing_guest_dirs {
        let mut debugfs = Command::new("debugfs");
        let script = format!("mkdir /{name}\nsif /{name} mode 0{:o}\n", 0o040000 | mode);
        debugfs.arg("-w").arg("-f").arg("-").arg(output);
        run_tool_with_input(reference, &mut debugfs, "debugfs", script.as_bytes())?;
    }
    Ok(())
}

fn run_tool(reference: &str, command: &mut Command, name: &str) -> Result<(), ImageError> {
    run_tool_with_input(reference, command, name, &[])
}

fn run_tool_with_input(
    reference: &str,
    command: &mut Command,
    name: &str,
    input: &[u8],
) -> Result<(), ImageError> {
    use std::io::Write;
    use std::process::Stdio;

    let mkfs_error = |reason: String| ImageError::Mkfs {
        reference: reference.to_string(),
        reason,
    };
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| {
            mkfs_error(format!(
                "cannot run {name} ({error}); install e2fsprogs 1.43 or later"
            ))
        })?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin
        .write_all(input)
        .map_err(|error| mkfs_error(format!("writing to {name} failed: {error}")))?;
    drop(stdin);
    let output = child
        .wait_with_output()
        .map_err(|error| mkfs_error(format!("waiting for {name} failed: {error}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(mkfs_error(format!(
            "{name} exited with {}: {}",
            output.status,
            stderr.trim()
        )));
    }
    Ok(())
}

/// Computes a digest of a tree's names, types, modes, ownership, link targets and file
/// contents, in sorted order, so that the same tree always gets the same image digest.
pub(crate) fn tree_digest(root: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    hash_entry(root, Path::new(""), &mut hasher)?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

fn hash_entry(root: &Path, relative: &Path, hasher: &mut Sha256) -> io::Result<()> {
    let path = root.join(relative);
    let metadata = fs::symlink_metadata(&path)?;
    let header = format!(
        "{}\0{:o}\0{}\0{}\0{}\0",
        relative.display(),
        metadata.mode(),
        metadata.uid(),
        metadata.gid(),
        metadata.rdev()
    );
    hasher.update(header.as_bytes());
    let file_type = metadata.file_type();
    if file_type.is_symlink() {
        hasher.update(fs::read_link(&path)?.as_os_str().as_encoded_bytes());
    } else if file_type.is_file() {
        hasher.update(metadata.len().to_le_bytes());
        let mut file = fs::File::open(&path)?;
        let mut buffer = vec![0; 64 << 10];
        loop {
            let count = file.read(&mut buffer)?;
            if count == 0 {
                break;
            }
            hasher.update(&buffer[..count]);
        }
    } else if file_type.is_dir() {
        let mut names: Vec<_> = fs::read_dir(&path)?
            .map(|child| child.map(|child| child.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            hash_entry(root, &relative.join(name), hasher)?;
        }
    }
    hasher.update(b"\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filesystem_size_has_headroom() {
        let usage = TreeUsage {
            block_bytes: 100 << 20,
            inodes: 5000,
        };
        let (bytes, inodes) = filesystem_size(usage);
        assert!(bytes > (100 << 20) + (16 << 20));
        assert_eq!(bytes % BLOCK_SIZE, 0);
        assert!(inodes > 5000);
    }

    #[test]
    fn measure_counts_hard_links_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), vec![1u8; 5000]).unwrap();
        fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        let usage = measure_tree(dir.path()).unwrap();
        assert_eq!(usage.inodes, 2);
        assert_eq!(usage.block_bytes, 8192 + 4096);
    }

    #[test]
    fn tree_digest_tracks_content() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), "one").unwrap();
        let first = tree_digest(dir.path()).unwrap();
        assert_eq!(first, tree_digest(dir.path()).unwrap());
        fs::write(dir.path().join("a"), "two").unwrap();
        assert_ne!(first, tree_digest(dir.path()).unwrap());
    }
}

//! Copying files in and out of the guest and small file-system requests.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use upstream_protocol::{DirEntry, ErrorKind, Frame, FrameKind, Response};

use crate::server::Shared;

/// Size of the chunks a file is sent in.
const CHUNK: usize = 256 * 1024;

/// A file being written: data goes to a temporary sibling that replaces the
/// target only once complete, so a broken upload never leaves half a file.
pub struct Upload {
    temp: PathBuf,
    target: PathBuf,
    mode: u32,
    /// `None` after a write failed; later chunks are dropped and the end
    /// frame reports the error.
    file: Option<File>,
    error: Option<String>,
}

pub fn begin_upload(shared: &Shared, stream: u32, path: &str, mode: u32) {
    let target = PathBuf::from(path);
    let temp = temp_path(&target, stream);
    let opened = target
        .parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|()| File::create(&temp));
    let upload = match opened {
        Ok(file) => Upload {
            temp,
            target,
            mode,
            file: Some(file),
            error: None,
        },
        Err(err) => Upload {
            temp,
            target,
            mode,
            file: None,
            error: Some(format!("cannot create {path}: {err}")),
        },
    };
    shared.uploads.lock().unwrap().insert(stream, upload);
}

pub fn upload_chunk(shared: &Shared, stream: u32, data: &[u8]) {
    let mut uploads = shared.uploads.lock().unwrap();
    let Some(upload) = uploads.get_mut(&stream) else {
        return;
    };
    let Some(file) = upload.file.as_mut() else {
        return;
    };
    if let Err(err) = file.write_all(data) {
        upload.error = Some(format!("writing {}: {err}", upload.target.display()));
        upload.file = None;
    }
}

pub fn finish_upload(shared: &Shared, stream: u32) {
    let Some(upload) = shared.uploads.lock().unwrap().remove(&stream) else {
        return shared.respond_error(stream, ErrorKind::InvalidRequest, "no upload".into());
    };
    let result = match upload.error {
        Some(message) => Err(message),
        None => {
            drop(upload.file);
            fs::set_permissions(
                &upload.temp,
                fs::Permissions::from_mode(upload.mode & 0o7777),
            )
            .and_then(|()| fs::rename(&upload.temp, &upload.target))
            .map_err(|err| format!("finishing {}: {err}", upload.target.display()))
        }
    };
    match result {
        Ok(()) => shared.respond(stream, &Response::Ok),
        Err(message) => {
            let _ = fs::remove_file(&upload.temp);
            shared.respond_error(stream, ErrorKind::Other, message);
        }
    }
}

fn temp_path(target: &Path, stream: u32) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.upstream-{stream}"))
}

/// Sends a file's contents as `FileData` frames followed by its size.
pub fn send_file(shared: &Shared, stream: u32, path: &str) {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(err) => return shared.respond_error(stream, io_kind(&err), format!("{path}: {err}")),
    };
    if file.metadata().map(|meta| meta.is_dir()).unwrap_or(false) {
        let message = format!("{path} is a directory; name a file");
        return shared.respond_error(stream, ErrorKind::InvalidRequest, message);
    }
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                size += n as u64;
                if shared
                    .send(&Frame::new(FrameKind::FileData, stream, buf[..n].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => {
                return shared.respond_error(stream, ErrorKind::Other, format!("{path}: {err}"))
            }
        }
    }
    shared.respond(stream, &Response::FileSent { size });
}

pub fn list_dir(path: &str) -> Response {
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(err) => return error_response(path, &err),
    };
    let mut listed = Vec::new();
    for entry in entries.flatten() {
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        listed.push(DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            size: meta.len(),
            mode: meta.mode(),
            is_dir: meta.is_dir(),
            is_symlink: meta.file_type().is_symlink(),
        });
    }
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    Response::Dir { entries: listed }
}

/// Removes a file, a symbolic link or a folder with everything in it. The
/// root folder is refused, under any spelling: removing it would break every
/// later command of the sandbox and still fail on the mounts inside it.
pub fn remove(path: &str) -> Response {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() && is_root(path) => {
            return Response::Error {
                kind: ErrorKind::InvalidRequest,
                message: format!(
                    "{path} is the root folder, which cannot be removed; remove the entries \
                     inside it instead"
                ),
            };
        }
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(err) => Err(err),
    };
    match result {
        Ok(()) => Response::Ok,
        Err(err) => error_response(path, &err),
    }
}

fn is_root(path: &str) -> bool {
    fs::canonicalize(path).is_ok_and(|resolved| resolved == std::path::Path::new("/"))
}

fn error_response(path: &str, err: &std::io::Error) -> Response {
    Response::Error {
        kind: io_kind(err),
        message: format!("{path}: {err}"),
    }
}

fn io_kind(err: &std::io::Error) -> ErrorKind {
    match err.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        _ => ErrorKind::Other,
    }
}

//! `/v1/sandboxes/{id}/files`: upload, download, list and remove guest files.
//!
//! Files travel as raw bytes (`application/octet-stream`) in both directions and are
//! streamed, so their size is bounded by `--max-upload`, not by the server's memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::{StreamExt, TryStreamExt};
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio_util::io::{ReaderStream, StreamReader};
use upstream_client::api;

use super::{ApiError, ApiQuery, AppState};
use crate::manager::{Caller, Entry, ManagerError};

/// Bytes of a download buffered between the guest and the HTTP body.
const DOWNLOAD_BUFFER: usize = 256 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    path: String,
    /// Permission bits in octal, such as `755` (default `644`).
    mode: Option<String>,
}

fn guest_path(path: &str) -> Result<&str, ApiError> {
    if !path.starts_with('/') {
        return Err(ApiError::invalid(
            "path",
            format!("path '{path}' is not absolute; send a path that starts with /"),
        ));
    }
    if path.contains('\0') {
        return Err(ApiError::invalid("path", "path contains a NUL byte"));
    }
    Ok(path)
}

fn file_mode(mode: Option<&str>) -> Result<u32, ApiError> {
    let Some(text) = mode else {
        return Ok(0o644);
    };
    match u32::from_str_radix(text, 8) {
        Ok(mode) if mode <= 0o7777 => Ok(mode),
        _ => Err(ApiError::invalid(
            "mode",
            format!("mode '{text}' is not an octal permission such as 644 or 755"),
        )),
    }
}

/// Runs `operation` unless the sandbox is destroyed first.
async fn until_destroyed<T>(
    entry: &Entry,
    operation: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::select! {
        result = operation => result,
        _ = entry.cancel.cancelled() => Err(ManagerError::Destroying(entry.id.clone()).into()),
    }
}

pub async fn upload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<api::FileWritten>, ApiError> {
    let path = guest_path(&query.path)?;
    let mode = file_mode(query.mode.as_deref())?;
    let limit = state.max_upload_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large(limit));
    }
    let entry = state.manager.get(&caller, &id)?;
    let sandbox = entry.sandbox()?;

    let over_limit = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&over_limit);
    let mut received = 0u64;
    let stream = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        received += chunk.len() as u64;
        if received > limit {
            flag.store(true, Ordering::Relaxed);
            return Err(std::io::Error::other("upload over the size limit"));
        }
        Ok::<Bytes, std::io::Error>(chunk)
    });
    let reader = StreamReader::new(stream);
    let written = until_destroyed(&entry, async {
        sandbox
            .agent()
            .write_file(path, mode, reader)
            .await
            .map_err(ApiError::from)
    })
    .await;
    match written {
        Err(_) if over_limit.load(Ordering::Relaxed) => Err(too_large(limit)),
        Err(err) => Err(err),
        Ok(size) => Ok(Json(api::FileWritten {
            path: path.to_string(),
            size,
        })),
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("The upload is larger than the server's limit of {limit} bytes (--max-upload)"),
    )
}

pub async fn download(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<PathQuery>,
) -> Result<Response, ApiError> {
    let path = guest_path(&query.path)?.to_string();
    let entry = state.manager.get(&caller, &id)?;
    let sandbox = entry.sandbox()?;

    // The guest's response (such as "not found") comes only after the data, so the copy
    // runs in a task, and the status is chosen once the first bytes or the response arrive.
    let (writer, mut reader) = tokio::io::duplex(DOWNLOAD_BUFFER);
    let (done_sender, mut done) = tokio::sync::oneshot::channel();
    let cancel = entry.cancel.clone();
    let task_path = path.clone();
    tokio::spawn(async move {
        let result = tokio::select! {
            result = sandbox.agent().read_file(&task_path, writer) => result.map_err(ApiError::from),
            _ = cancel.cancelled() => Err(ApiError::new(
                StatusCode::CONFLICT,
                "sandbox_destroying",
                "The sandbox was destroyed during the download",
            )),
        };
        let _ = done_sender.send(result);
    });

    let mut first = vec![0u8; 64 * 1024];
    let mut answered = false;
    let read = tokio::select! {
        read = reader.read(&mut first) => read,
        result = &mut done => {
            // Finished before anything was read: an error, or a file that fit the buffer.
            result.unwrap_or_else(|_| Err(ApiError::internal("the download task failed")))?;
            answered = true;
            reader.read(&mut first).await
        }
    };
    let filled = read.map_err(|err| ApiError::internal(format!("reading the download: {err}")))?;
    if filled == 0 && !answered {
        // End of data: the response decides between an empty file and an error.
        if let Ok(Err(err)) = done.await {
            return Err(err);
        }
    }
    first.truncate(filled);
    let head =
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(first)) });
    let tail = ReaderStream::new(reader).map_err(std::io::Error::other);
    let body = Body::from_stream(head.chain(tail));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<PathQuery>,
) -> Result<Json<api::FileList>, ApiError> {
    let path = guest_path(&query.path)?;
    let entry = state.manager.get(&caller, &id)?;
    let sandbox = entry.sandbox()?;
    let entries = until_destroyed(&entry, async {
        sandbox.agent().list_dir(path).await.map_err(ApiError::from)
    })
    .await?;
    let entries = entries
        .into_iter()
        .map(|entry| api::FileEntry {
            name: entry.name,
            size: entry.size,
            mode: entry.mode,
            is_dir: entry.is_dir,
            is_symlink: entry.is_symlink,
        })
        .collect();
    Ok(Json(api::FileList {
        path: path.to_string(),
        entries,
    }))
}

pub async fn remove(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<PathQuery>,
) -> Result<StatusCode, ApiError> {
    let path = guest_path(&query.path)?;
    let entry = state.manager.get(&caller, &id)?;
    let sandbox = entry.sandbox()?;
    until_destroyed(&entry, async {
        sandbox.agent().remove(path).await.map_err(ApiError::from)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

//! `/v1/runs` and `/v1/contexts`: Markdown turns and the context store.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use upstream_client::api;
use upstream_store::{ContextStore, StoreError};
use upstream_turn::{DocumentTarget, TurnError, TurnOptions, TurnOutcomeKind, TurnRequest};

use super::{ApiError, ApiJson, AppState};
use crate::manager::Caller;

/// Context of a submitted turn that names none, in the request or in its front matter.
const DEFAULT_RUN_CONTEXT: &str = "api";

/// Chunk size of artifact downloads.
const ARTIFACT_CHUNK: usize = 256 * 1024;

pub async fn submit_run(
    State(state): State<AppState>,
    Extension(_caller): Extension<Caller>,
    ApiJson(request): ApiJson<api::SubmitRun>,
) -> Result<Json<api::RunResult>, ApiError> {
    // Documents submitted over the API have no file; the path only names them in messages
    // and in the turn record.
    let path = PathBuf::from("api-run.md");
    let turn = TurnRequest::from_source(&path, request.document).map_err(turn_error)?;
    let context = request
        .context
        .or_else(|| turn.document.front_matter.context.first().cloned())
        .unwrap_or_else(|| DEFAULT_RUN_CONTEXT.to_string());
    let options = TurnOptions {
        context: Some(context),
        new_context: request.new_context,
        target: DocumentTarget::Discard,
        ..TurnOptions::default()
    };
    state.manager.metrics.runs.fetch_add(1, Ordering::Relaxed);
    let cancel = state.manager.shutdown_token().child_token();
    // The runner's event callback is not `Send`, so its future cannot move between
    // threads: it runs on a blocking thread of its own.
    let runner = Arc::clone(&state.runner);
    let handle = tokio::runtime::Handle::current();
    let result = tokio::task::spawn_blocking(move || {
        handle.block_on(runner.run(&turn, &options, &mut |_event| {}, &cancel))
    })
    .await
    .map_err(|err| ApiError::internal(format!("the turn task failed: {err}")))?
    .map_err(turn_error)?;
    let outcome = match result.outcome {
        TurnOutcomeKind::Succeeded => "succeeded",
        TurnOutcomeKind::Failed => "failed",
        TurnOutcomeKind::Interrupted => "interrupted",
    };
    let record = serde_json::to_value(&result.turn)
        .map_err(|err| ApiError::internal(format!("serializing the turn record: {err}")))?;
    Ok(Json(api::RunResult {
        outcome: outcome.to_string(),
        context: result.context,
        document: result.rendered,
        turn: record,
        warnings: result.warnings,
    }))
}

fn turn_error(err: TurnError) -> ApiError {
    if err.is_usage_error() {
        return ApiError::invalid("document", err.to_string());
    }
    match err {
        TurnError::Store(err) => store_error(err),
        TurnError::Image(err) => ApiError {
            field: Some("document".into()),
            ..ApiError::new(StatusCode::NOT_FOUND, "image_not_found", err.to_string())
        },
        TurnError::DefaultImageMissing(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            err.to_string(),
        ),
        TurnError::Sandbox(err) => ApiError::from(err),
        other => ApiError::internal(other.to_string()),
    }
}

fn store_error(err: StoreError) -> ApiError {
    let message = err.to_string();
    match err {
        StoreError::ContextNotFound(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "context_not_found", message)
        }
        StoreError::ArtifactNotFound { .. } => {
            ApiError::new(StatusCode::NOT_FOUND, "artifact_not_found", message)
        }
        StoreError::InvalidContextName { .. } => ApiError::invalid("context", message),
        StoreError::InvalidArtifactName { .. } => ApiError::invalid("artifact", message),
        StoreError::ContextBusy { .. } | StoreError::ContextWaitTimedOut { .. } => {
            ApiError::new(StatusCode::CONFLICT, "context_busy", message)
        }
        _ => ApiError::internal(message),
    }
}

/// Runs a blocking store call off the async threads.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|err| ApiError::internal(format!("the store task failed: {err}")))?
        .map_err(store_error)
}

pub async fn list(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let store = state.store.clone();
    let contexts = blocking(move || store.list_contexts()).await?;
    Ok(Json(serde_json::json!({ "contexts": contexts })))
}

pub async fn show(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = state.store.clone();
    let detail = blocking(move || store.context(&name)).await?;
    Ok(Json(serde_json::to_value(detail).map_err(|err| {
        ApiError::internal(format!("serializing the context: {err}"))
    })?))
}

pub async fn artifacts(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = state.store.clone();
    let artifacts = blocking(move || {
        // A context that does not exist is a 404, not an empty list.
        store.context(&name)?;
        store.visible_artifacts(&name)
    })
    .await?;
    Ok(Json(serde_json::json!({ "artifacts": artifacts })))
}

pub async fn artifact(
    State(state): State<AppState>,
    Path((name, artifact)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let store = state.store.clone();
    let content = blocking(move || store.get_artifact(&name, &artifact)).await?;
    let size = content.artifact.size;
    let mut reader = content.reader;
    let (sender, receiver) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || loop {
        let mut buf = vec![0u8; ARTIFACT_CHUNK];
        match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                if sender.blocking_send(Ok(Bytes::from(buf))).is_err() {
                    return;
                }
            }
            Err(err) => {
                let _ = sender.blocking_send(Err(err));
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let item = receiver.recv().await?;
        Some((item, receiver))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

//! Commands: run to the end, stream as Server-Sent Events, and background processes that
//! can be reattached, fed stdin and killed.
//!
//! A stream sends `started` (the process id), then `stdout` and `stderr` events whose SSE
//! `id` is the chunk's sequence number, then `exit` or `error` last. Reattaching with
//! `?after=N` or a `Last-Event-ID: N` header replays the kept output after chunk N.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::Stream;
use serde::Deserialize;
use tokio::sync::watch;
use upstream_client::api;

use super::sandboxes::validate_env;
use super::{ApiError, ApiJson, ApiQuery, AppState};
use crate::manager::{Caller, ExecAction};
use crate::process::{Channel, Chunk, Ending, Process};

/// Signals a kill request may send: the standard Linux numbers 1 to 31.
const MAX_SIGNAL: i32 = 31;

/// Validates an exec request into an action.
fn exec_action(request: api::Exec) -> Result<ExecAction, ApiError> {
    match request.command.first() {
        None => {
            return Err(ApiError::invalid(
                "command",
                "command is empty; send the program and its arguments, such as [\"ls\", \"-l\"]",
            ))
        }
        Some(program) if program.is_empty() => {
            return Err(ApiError::invalid(
                "command",
                "command[0], the program, is empty",
            ))
        }
        Some(_) => {}
    }
    if request.command.iter().any(|arg| arg.contains('\0')) {
        return Err(ApiError::invalid("command", "command contains a NUL byte"));
    }
    validate_env(&request.env, "env")?;
    if request.timeout_ms == Some(0) {
        return Err(ApiError::invalid(
            "timeout_ms",
            "timeout_ms must be at least 1; omit it for no timeout",
        ));
    }
    if request.keep_stdin_open && !request.background {
        return Err(ApiError::invalid(
            "keep_stdin_open",
            "keep_stdin_open needs background: true, because only background processes \
             accept stdin later",
        ));
    }
    let stdin = match &request.stdin {
        None => None,
        Some(text) => Some(api::decode(text, request.stdin_encoding).map_err(|err| {
            ApiError::invalid("stdin", format!("stdin is not valid base64: {err}"))
        })?),
    };
    Ok(ExecAction {
        command: request.command,
        env: request.env,
        cwd: request.cwd,
        stdin,
        keep_stdin_open: request.keep_stdin_open,
        timeout_ms: request.timeout_ms,
        background: request.background,
    })
}

/// Kills a foreground process when the request that waits for it goes away first.
struct KillOnDrop(Option<Arc<Process>>);

impl KillOnDrop {
    fn new(process: &Arc<Process>) -> Self {
        Self((!process.background).then(|| Arc::clone(process)))
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(process) = self.0.take() {
            if process.is_running() {
                tracing::info!(process = %process.id, "client went away; killing its command");
                process.kill();
            }
        }
    }
}

pub async fn exec(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<api::Exec>,
) -> Result<Response, ApiError> {
    let action = exec_action(request)?;
    let background = action.background;
    let process = state.manager.exec(&caller, &id, action).await?;
    if background {
        return Ok((StatusCode::ACCEPTED, Json(process.summary())).into_response());
    }
    let _guard = KillOnDrop::new(&process);
    process.wait().await;
    let failure = process.with_log(|log| match log.ending() {
        Some(Ending::Failed(failure)) => Some(failure.clone()),
        _ => None,
    });
    if let Some(failure) = failure {
        return Err(ApiError::from_failure(&failure));
    }
    Ok(Json(process.result()).into_response())
}

pub async fn exec_stream(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<api::Exec>,
) -> Result<Response, ApiError> {
    let action = exec_action(request)?;
    let process = state.manager.exec(&caller, &id, action).await?;
    let guard = KillOnDrop::new(&process);
    Ok(sse(process, 0, Some(guard)).into_response())
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<api::ProcessList>, ApiError> {
    let entry = state.manager.get(&caller, &id)?;
    Ok(Json(api::ProcessList {
        processes: entry.processes(),
    }))
}

pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, pid)): Path<(String, String)>,
) -> Result<Json<api::ExecResult>, ApiError> {
    let process = state.manager.get(&caller, &id)?.process(&pid)?;
    Ok(Json(process.result()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    after: Option<u64>,
}

pub async fn events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, pid)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let process = state.manager.get(&caller, &id)?.process(&pid)?;
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    let after = query.after.or(last_event_id).unwrap_or(0);
    Ok(sse(process, after, None).into_response())
}

pub async fn kill(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, pid)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<api::Process>, ApiError> {
    // The body is optional: an empty one means SIGKILL.
    let kill: api::Kill = if body.is_empty() {
        api::Kill::default()
    } else {
        serde_json::from_slice(&body).map_err(|err| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", err.to_string())
        })?
    };
    let signal = kill.signal.unwrap_or(9);
    if !(1..=MAX_SIGNAL).contains(&signal) {
        return Err(ApiError::invalid(
            "signal",
            format!("signal {signal} is out of range; use 1 to {MAX_SIGNAL}, such as 15 or 9"),
        ));
    }
    let process = state.manager.get(&caller, &id)?.process(&pid)?;
    if signal == 9 {
        process.kill();
    } else {
        process.signal(signal);
    }
    Ok(Json(process.summary()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdinQuery {
    #[serde(default)]
    eof: bool,
}

pub async fn stdin(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, pid)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<StdinQuery>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let process = state.manager.get(&caller, &id)?.process(&pid)?;
    process
        .write_stdin(&body, query.eof)
        .await
        .map_err(|err| ApiError::new(StatusCode::CONFLICT, "stdin_closed", err.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}

/// The state of one process's event stream: what it still has to send.
struct Feed {
    process: Arc<Process>,
    changed: watch::Receiver<u64>,
    after: u64,
    pending: VecDeque<Event>,
    started_sent: bool,
    finished: bool,
    _guard: Option<KillOnDrop>,
}

fn sse(
    process: Arc<Process>,
    after: u64,
    guard: Option<KillOnDrop>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let feed = Feed {
        changed: process.subscribe(),
        process,
        after,
        pending: VecDeque::new(),
        started_sent: false,
        finished: false,
        _guard: guard,
    };
    let stream = futures_util::stream::unfold(feed, |mut feed| async move {
        let event = next_event(&mut feed).await?;
        Some((Ok(event), feed))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

async fn next_event(feed: &mut Feed) -> Option<Event> {
    if !feed.started_sent {
        feed.started_sent = true;
        let started = api::StartedEvent {
            process_id: feed.process.id.clone(),
        };
        return Some(json_event("started", &started));
    }
    loop {
        if let Some(event) = feed.pending.pop_front() {
            return Some(event);
        }
        if feed.finished {
            return None;
        }
        // Mark the current version seen before reading, so a change made after the read
        // wakes the wait below.
        feed.changed.borrow_and_update();
        let (chunks, ending) = feed
            .process
            .with_log(|log| (log.chunks_after(feed.after), log.ending().cloned()));
        if let Some(last) = chunks.last() {
            feed.after = last.seq;
            feed.pending.extend(chunks.iter().map(chunk_event));
            continue;
        }
        if let Some(ending) = ending {
            feed.finished = true;
            return Some(match ending {
                Ending::Exited(status) => json_event("exit", &crate::process::exit_info(&status)),
                Ending::Failed(failure) => {
                    json_event("error", &ApiError::from_failure(&failure).detail())
                }
            });
        }
        if feed.changed.changed().await.is_err() {
            return None;
        }
    }
}

fn chunk_event(chunk: &Chunk) -> Event {
    let (data, encoding) = api::encode(&chunk.data);
    let output = api::OutputEvent {
        seq: chunk.seq,
        data,
        encoding,
    };
    let name = match chunk.channel {
        Channel::Stdout => "stdout",
        Channel::Stderr => "stderr",
    };
    json_event(name, &output).id(chunk.seq.to_string())
}

fn json_event(name: &str, data: &impl serde::Serialize) -> Event {
    Event::default()
        .event(name)
        .data(serde_json::to_string(data).expect("API types serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_rejects_empty_command() {
        let err = exec_action(api::Exec::default()).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("command"));
    }

    #[test]
    fn exec_rejects_stdin_kept_open_in_foreground() {
        let request = api::Exec {
            command: vec!["cat".into()],
            keep_stdin_open: true,
            ..api::Exec::default()
        };
        let err = exec_action(request).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("keep_stdin_open"));
    }

    #[test]
    fn exec_rejects_invalid_base64_stdin() {
        let request = api::Exec {
            command: vec!["cat".into()],
            stdin: Some("***".into()),
            stdin_encoding: api::Encoding::Base64,
            ..api::Exec::default()
        };
        let err = exec_action(request).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("stdin"));
    }
}

//! `/v1/sandboxes`: create, list, get, set timeout, destroy.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use upstream_client::api;
use upstream_vmm::Limits;

use super::{ApiError, ApiJson, ApiQuery, AppState};
use crate::manager::{Caller, CreateAction};

/// Metadata entries allowed per sandbox, and the longest key and value in bytes.
const MAX_METADATA_ENTRIES: usize = 32;
const MAX_METADATA_KEY: usize = 64;
const MAX_METADATA_VALUE: usize = 512;

pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(request): ApiJson<api::CreateSandbox>,
) -> Result<(StatusCode, Json<api::Sandbox>), ApiError> {
    let action = create_action(request)?;
    let sandbox = state.manager.create(&caller, action).await?;
    Ok((StatusCode::CREATED, Json(sandbox)))
}

/// Validates a create request into an action.
fn create_action(request: api::CreateSandbox) -> Result<CreateAction, ApiError> {
    let defaults = Limits::default();
    let limits = Limits {
        vcpus: request.vcpus.unwrap_or(defaults.vcpus),
        memory_mib: request.memory_mib.unwrap_or(defaults.memory_mib),
        disk_mib: request.disk_mib.unwrap_or(defaults.disk_mib),
    };
    limits.validate()?;
    if let Some(image) = &request.image {
        if image.trim().is_empty() {
            return Err(ApiError::invalid("image", "image must not be empty"));
        }
    }
    validate_env(&request.env, "env")?;
    let timeout = timeout(request.timeout_secs, "timeout_secs")?;
    validate_metadata(&request.metadata)?;
    Ok(CreateAction {
        image: request.image,
        limits,
        env: request.env,
        timeout,
        metadata: request.metadata,
    })
}

/// Checks environment variable names: non-empty, without `=` or NUL.
pub fn validate_env(env: &BTreeMap<String, String>, field: &str) -> Result<(), ApiError> {
    for (key, value) in env {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(ApiError::invalid(
                &format!("{field}.{key}"),
                format!("invalid environment variable name '{key}'; use a name without '=' or NUL"),
            ));
        }
        if value.contains('\0') {
            return Err(ApiError::invalid(
                &format!("{field}.{key}"),
                format!("environment variable {key} contains a NUL byte"),
            ));
        }
    }
    Ok(())
}

fn validate_metadata(metadata: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(ApiError::invalid(
            "metadata",
            format!(
                "metadata has {} entries; the maximum is {MAX_METADATA_ENTRIES}",
                metadata.len()
            ),
        ));
    }
    for (key, value) in metadata {
        if key.is_empty() || key.len() > MAX_METADATA_KEY {
            return Err(ApiError::invalid(
                "metadata",
                format!("metadata key '{key}' must have 1 to {MAX_METADATA_KEY} bytes"),
            ));
        }
        if value.len() > MAX_METADATA_VALUE {
            return Err(ApiError::invalid(
                &format!("metadata.{key}"),
                format!("metadata value of '{key}' is longer than {MAX_METADATA_VALUE} bytes"),
            ));
        }
    }
    Ok(())
}

/// A timeout in seconds: at least 1 when set.
fn timeout(secs: Option<u64>, field: &str) -> Result<Option<Duration>, ApiError> {
    match secs {
        None => Ok(None),
        Some(0) => Err(ApiError::invalid(
            field,
            format!("{field} must be at least 1; omit it or send null for no timeout"),
        )),
        // Larger values would overflow `Instant` arithmetic; ten years is "never" here.
        Some(secs) if secs > 315_360_000 => Err(ApiError::invalid(
            field,
            format!(
                "{field} {secs} is larger than 315360000 (ten years); send null for no timeout"
            ),
        )),
        Some(secs) => Ok(Some(Duration::from_secs(secs))),
    }
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(query): ApiQuery<BTreeMap<String, String>>,
) -> Result<Json<api::SandboxList>, ApiError> {
    let mut metadata = BTreeMap::new();
    let mut requested_state = None;
    for (name, value) in query {
        if let Some(key) = name.strip_prefix("metadata.") {
            metadata.insert(key.to_string(), value);
        } else if name == "state" {
            requested_state = Some(match value.as_str() {
                "running" => api::SandboxState::Running,
                "destroying" => api::SandboxState::Destroying,
                other => {
                    return Err(ApiError::invalid(
                        "state",
                        format!("unknown state '{other}'; use running or destroying"),
                    ))
                }
            });
        } else {
            return Err(ApiError::invalid(
                &name,
                format!("unknown query parameter '{name}'; use state or metadata.KEY"),
            ));
        }
    }
    let sandboxes = state.manager.list(&caller, &metadata, requested_state);
    Ok(Json(api::SandboxList { sandboxes }))
}

pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<api::Sandbox>, ApiError> {
    Ok(Json(state.manager.get(&caller, &id)?.info()))
}

pub async fn set_timeout(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<api::SetTimeout>,
) -> Result<Json<api::Sandbox>, ApiError> {
    let timeout = timeout(request.timeout_secs, "timeout_secs")?;
    Ok(Json(state.manager.set_timeout(&caller, &id, timeout)?))
}

pub async fn destroy(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.manager.destroy(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_rejects_zero_vcpus() {
        let request = api::CreateSandbox {
            vcpus: Some(0),
            ..api::CreateSandbox::default()
        };
        let err = create_action(request).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.field.as_deref(), Some("vcpus"));
    }

    #[test]
    fn create_rejects_zero_timeout() {
        let request = api::CreateSandbox {
            timeout_secs: Some(0),
            ..api::CreateSandbox::default()
        };
        let err = create_action(request).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("timeout_secs"));
    }

    #[test]
    fn create_rejects_env_name_with_equals() {
        let request = api::CreateSandbox {
            env: BTreeMap::from([("A=B".to_string(), "c".to_string())]),
            ..api::CreateSandbox::default()
        };
        let err = create_action(request).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("env.A=B"));
    }

    #[test]
    fn create_defaults_are_valid() {
        let action = create_action(api::CreateSandbox::default()).unwrap();
        assert_eq!(action.limits, Limits::default());
        assert!(action.timeout.is_none());
    }
}

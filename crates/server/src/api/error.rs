//! JSON errors of the API and the JSON extractor that produces them.
//!
//! Status codes separate who is at fault: 4xx for the request (400 invalid field, 404
//! unknown sandbox or guest path, 413 too large, 422 the guest rejected the command, 429
//! over a limit), 5xx for the server or the sandbox (500 internal, 503 sandbox or server
//! unavailable).

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use upstream_client::api::{ErrorBody, ErrorDetail};
use upstream_protocol::ErrorKind;

use crate::manager::ManagerError;
use crate::process::Failure;

/// An error response: status, stable code, message and the field at fault.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A 400 naming the invalid `field`.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_field", message)
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The error of a command the guest could not run, or whose guest connection failed.
    pub fn from_failure(failure: &Failure) -> Self {
        let (status, code) = match failure.guest {
            Some(ErrorKind::NotFound) => (StatusCode::UNPROCESSABLE_ENTITY, "command_not_found"),
            Some(ErrorKind::PermissionDenied) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "command_not_executable")
            }
            Some(ErrorKind::InvalidRequest) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Some(ErrorKind::Other) => (StatusCode::UNPROCESSABLE_ENTITY, "guest_error"),
            None => (StatusCode::SERVICE_UNAVAILABLE, "sandbox_unavailable"),
        };
        Self::new(status, code, failure.message.clone())
    }

    /// The error of a file request that the guest answered with `kind`.
    pub fn from_guest_path(kind: ErrorKind, message: String) -> Self {
        let (status, code) = match kind {
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, "path_not_found"),
            ErrorKind::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
            ErrorKind::InvalidRequest => (StatusCode::BAD_REQUEST, "invalid_request"),
            ErrorKind::Other => (StatusCode::UNPROCESSABLE_ENTITY, "guest_error"),
        };
        Self::new(status, code, message)
    }

    pub fn detail(&self) -> ErrorDetail {
        ErrorDetail {
            code: self.code.to_string(),
            message: self.message.clone(),
            field: self.field.clone(),
        }
    }
}

impl From<ManagerError> for ApiError {
    fn from(err: ManagerError) -> Self {
        let message = err.to_string();
        match err {
            ManagerError::SandboxNotFound(_) => {
                Self::new(StatusCode::NOT_FOUND, "sandbox_not_found", message)
            }
            ManagerError::ProcessNotFound { .. } => {
                Self::new(StatusCode::NOT_FOUND, "process_not_found", message)
            }
            ManagerError::TooManySandboxes { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "too_many_sandboxes", message)
            }
            ManagerError::Image { .. } => Self {
                field: Some("image".into()),
                ..Self::new(StatusCode::NOT_FOUND, "image_not_found", message)
            },
            ManagerError::ShuttingDown => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
            }
            ManagerError::Destroying(_) => {
                Self::new(StatusCode::CONFLICT, "sandbox_destroying", message)
            }
            ManagerError::Sandbox(err) => Self::from(err),
        }
    }
}

impl From<upstream_vmm::Error> for ApiError {
    fn from(err: upstream_vmm::Error) -> Self {
        use upstream_vmm::Error as E;
        match err {
            E::Guest { kind, message } => Self::from_guest_path(kind, message),
            E::OutOfRange { name, .. } => {
                let field = match name {
                    "vcpus" => "vcpus",
                    "memory (MiB)" => "memory_mib",
                    "disk (MiB)" => "disk_mib",
                    other => other,
                };
                Self::invalid(field, err.to_string())
            }
            E::Boot { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "boot_failed",
                err.to_string(),
            ),
            E::SandboxLost { .. } | E::Protocol(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "sandbox_unavailable",
                err.to_string(),
            ),
            other => Self::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, message = %self.message, "request failed");
        }
        let body = ErrorBody {
            error: self.detail(),
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// `Json<T>` whose rejections are [`ApiError`]s naming the field at fault.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// A query string parsed into `T`, rejected with the API's error body.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                rejection.body_text(),
            )),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "The request body is larger than the server's limit (--max-body)",
        );
    }
    match rejection {
        JsonRejection::JsonDataError(err) => {
            // The message reads "Failed to deserialize ...: FIELD: reason" when serde
            // knows the path, and names unknown or missing fields in backquotes.
            let text = std::error::Error::source(&err)
                .map(ToString::to_string)
                .unwrap_or_else(|| err.body_text());
            let field = field_of(&text);
            ApiError {
                field,
                ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", text)
            }
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Send the body as JSON with Content-Type: application/json",
        ),
        other => ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", other.body_text()),
    }
}

/// The field a serde error message is about: its path prefix, or a name in backquotes
/// after "field".
fn field_of(message: &str) -> Option<String> {
    if let Some(start) = message.find("field `") {
        let rest = &message[start + "field `".len()..];
        return rest.find('`').map(|end| rest[..end].to_string());
    }
    let (path, _) = message.split_once(": ")?;
    let looks_like_path = !path.is_empty()
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']'));
    looks_like_path.then(|| path.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_from_path_prefix() {
        let message = "vcpus: invalid type: string \"two\", expected u32 at line 1 column 16";
        assert_eq!(field_of(message).as_deref(), Some("vcpus"));
    }

    #[test]
    fn field_from_unknown_field() {
        let message = "unknown field `cpus`, expected one of `image`, `vcpus`";
        assert_eq!(field_of(message).as_deref(), Some("cpus"));
    }

    #[test]
    fn field_from_missing_field() {
        let message = "missing field `command` at line 1 column 2";
        assert_eq!(field_of(message).as_deref(), Some("command"));
    }
}

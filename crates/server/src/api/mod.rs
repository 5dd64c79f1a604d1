//! The HTTP layer: routes, authentication and request metrics.
//!
//! Handlers only parse and validate; each turns its request into a call on
//! [`SandboxManager`] or the context store. [`router`] also returns the list of routes it
//! registered, which the tests compare with `openapi.json`.

mod contexts;
mod error;
mod exec;
mod files;
mod sandboxes;

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::handler::Handler;
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use upstream_store::LocalStore;
use upstream_turn::TurnRunner;

pub use error::{ApiError, ApiJson, ApiQuery};

use crate::db::Db;
use crate::manager::{Caller, SandboxManager};

/// The OpenAPI document of this API, served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<SandboxManager>,
    pub db: Arc<Db>,
    pub store: Arc<LocalStore>,
    pub runner: Arc<TurnRunner>,
    /// Whether requests must carry an API key.
    pub require_keys: bool,
    /// Largest accepted upload, in bytes.
    pub max_upload_bytes: u64,
}

/// A router that records each (method, path) it registers.
struct Routes {
    router: Router<AppState>,
    list: Vec<(Method, &'static str)>,
}

impl Routes {
    fn add<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
        self.router = self.router.route(path, on(filter, handler));
        self.list.push((method, path));
        self
    }
}

/// Builds the router with its middleware; also returns every registered route.
pub fn router(state: AppState, max_body_bytes: usize) -> (Router, Vec<(Method, &'static str)>) {
    let routes = Routes {
        router: Router::new(),
        list: Vec::new(),
    };
    let routes = routes
        .add(Method::GET, "/healthz", healthz)
        .add(Method::GET, "/metrics", metrics)
        .add(Method::GET, "/v1/openapi.json", openapi)
        .add(Method::POST, "/v1/sandboxes", sandboxes::create)
        .add(Method::GET, "/v1/sandboxes", sandboxes::list)
        .add(Method::GET, "/v1/sandboxes/{id}", sandboxes::get)
        .add(Method::DELETE, "/v1/sandboxes/{id}", sandboxes::destroy)
        .add(
            Method::POST,
            "/v1/sandboxes/{id}/timeout",
            sandboxes::set_timeout,
        )
        .add(Method::POST, "/v1/sandboxes/{id}/exec", exec::exec)
        .add(
            Method::POST,
            "/v1/sandboxes/{id}/exec/stream",
            exec::exec_stream,
        )
        .add(Method::GET, "/v1/sandboxes/{id}/processes", exec::list)
        .add(Method::GET, "/v1/sandboxes/{id}/processes/{pid}", exec::get)
        .add(
            Method::GET,
            "/v1/sandboxes/{id}/processes/{pid}/events",
            exec::events,
        )
        .add(
            Method::POST,
            "/v1/sandboxes/{id}/processes/{pid}/kill",
            exec::kill,
        )
        .add(
            Method::POST,
            "/v1/sandboxes/{id}/processes/{pid}/stdin",
            exec::stdin,
        )
        .add(Method::PUT, "/v1/sandboxes/{id}/files", files::upload)
        .add(Method::GET, "/v1/sandboxes/{id}/files", files::download)
        .add(Method::DELETE, "/v1/sandboxes/{id}/files", files::remove)
        .add(Method::GET, "/v1/sandboxes/{id}/files/list", files::list)
        .add(Method::POST, "/v1/runs", contexts::submit_run)
        .add(Method::GET, "/v1/contexts", contexts::list)
        .add(Method::GET, "/v1/contexts/{name}", contexts::show)
        .add(
            Method::GET,
            "/v1/contexts/{name}/artifacts",
            contexts::artifacts,
        )
        .add(
            Method::GET,
            "/v1/contexts/{name}/artifacts/{*artifact}",
            contexts::artifact,
        );
    let list = routes.list;
    // `route_layer` runs after routing, so the metrics layer gets the matched path; the
    // layer added last runs first, so authentication failures are counted too.
    let router = routes
        .router
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .route_layer(middleware::from_fn_with_state(state.clone(), count_request))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .with_state(state);
    (router, list)
}

/// Checks the `Authorization: Bearer` key when keys are required and records the caller.
async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let exempt = request.uri().path() == "/healthz";
    if !state.require_keys || exempt {
        request.extensions_mut().insert(Caller::default());
        return next.run(request).await;
    }
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return unauthorized("Missing API key; send it as `Authorization: Bearer KEY`");
    };
    match state.db.authenticate(token) {
        Ok(Some(key)) => {
            request.extensions_mut().insert(Caller { key: Some(key) });
            next.run(request).await
        }
        Ok(None) => {
            unauthorized("Invalid or revoked API key; create one with `upstream key create`")
        }
        Err(err) => {
            ApiError::internal(format!("Checking the API key failed: {err}")).into_response()
        }
    }
}

fn unauthorized(message: &str) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, "Bearer".parse().unwrap());
    response
}

async fn count_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_default();
    let method = request.method().to_string();
    let response = next.run(request).await;
    state
        .manager
        .metrics
        .count_request(&route, &method, response.status().as_u16());
    response
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not a method of {}; see /v1/openapi.json for its methods",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route_not_found",
        format!(
            "No route for {} {}; see /v1/openapi.json",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.manager.metrics.render(state.manager.running());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

//! The HTTP layer: parses a request, calls one [`Lifecycle`] method, and
//! maps its error to a status code in one place ([`status_of`]). No logic
//! lives here.
//!
//! The router is built from [`hearth_api::routes::ROUTES`], and a test
//! checks that table against `docs/openapi.json`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use hearth_api::{CreateVmRequest, ErrorBody, Health, StopRequest, Version, VmState};
use serde::Deserialize;

use crate::lifecycle::{Lifecycle, LifecycleError, error_chain};
use crate::metrics::Op;
use crate::store::StoreError;

type AppState = Arc<Lifecycle>;

/// An error on its way out as `{code, message, chain}`.
#[derive(Debug)]
pub enum ApiError {
    /// From the lifecycle.
    Lifecycle(LifecycleError),
    /// The request itself could not be parsed.
    BadRequest(String),
    /// No such route.
    NoRoute,
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        ApiError::Lifecycle(e)
    }
}

/// The one place errors become status codes: 400 bad input, 404 unknown
/// VM, 409 wrong state (or name taken), 500 for everything else.
pub fn status_of(e: &LifecycleError) -> (StatusCode, &'static str) {
    match e {
        LifecycleError::Invalid { .. } => (StatusCode::BAD_REQUEST, "bad_request"),
        LifecycleError::NotFound(_) | LifecycleError::Store(StoreError::NotFound { .. }) => {
            (StatusCode::NOT_FOUND, "not_found")
        }
        LifecycleError::WrongState { .. }
        | LifecycleError::Conflict { .. }
        | LifecycleError::Corrupt { .. }
        | LifecycleError::Store(StoreError::NameTaken { .. })
        | LifecycleError::Store(StoreError::StaleGeneration { .. }) => {
            (StatusCode::CONFLICT, "conflict")
        }
        LifecycleError::StartFailed { .. }
        | LifecycleError::TeardownFailed { .. }
        | LifecycleError::Metrics { .. }
        | LifecycleError::Io { .. }
        | LifecycleError::Net(_)
        | LifecycleError::Sweep(_)
        | LifecycleError::Injected(_)
        | LifecycleError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, mut chain) = match &self {
            ApiError::Lifecycle(e) => {
                let (s, c) = status_of(e);
                (s, c, error_chain(e))
            }
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", vec![m.clone()]),
            ApiError::NoRoute => (
                StatusCode::NOT_FOUND,
                "no_route",
                vec!["no such route".to_owned()],
            ),
        };
        let message = chain.remove(0);
        if status.is_server_error() {
            tracing::error!(%message, ?chain, "request failed");
        }
        let body = ErrorBody {
            code: code.to_owned(),
            message,
            chain,
        };
        (status, axum::Json(body)).into_response()
    }
}

/// `Json<T>` whose rejection is our error body.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        if bytes.is_empty() {
            return serde_json::from_slice(b"{}")
                .map(JsonBody)
                .map_err(|e| ApiError::BadRequest(format!("a JSON body is required: {e}")));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn health(State(l): State<AppState>) -> ApiResult<axum::Json<Health>> {
    let mut vms: std::collections::BTreeMap<String, u64> =
        VmState::ALL.iter().map(|s| (s.to_string(), 0)).collect();
    for vm in l.list()? {
        *vms.entry(vm.state.to_string()).or_default() += 1;
    }
    Ok(axum::Json(Health {
        status: "ok".into(),
        vms,
    }))
}

async fn version(State(l): State<AppState>) -> axum::Json<Version> {
    axum::Json(Version {
        version: env!("CARGO_PKG_VERSION").into(),
        vmm_binary: l.config().vmm_binary.display().to_string(),
    })
}

async fn list(State(l): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(axum::Json(l.list()?))
}

async fn create(
    State(l): State<AppState>,
    JsonBody(req): JsonBody<CreateVmRequest>,
) -> ApiResult<impl IntoResponse> {
    let vm = l
        .metrics()
        .observe(Op::Create, async { l.create(req) })
        .await?;
    Ok((StatusCode::CREATED, axum::Json(vm)))
}

async fn get_vm(State(l): State<AppState>, Path(vm): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(axum::Json(l.get(&vm)?))
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete_vm(
    State(l): State<AppState>,
    Path(vm): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<StatusCode> {
    l.metrics()
        .observe(Op::Delete, l.delete(&vm, q.force))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start(State(l): State<AppState>, Path(vm): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(axum::Json(
        l.metrics().observe(Op::Start, l.start(&vm)).await?,
    ))
}

async fn stop(
    State(l): State<AppState>,
    Path(vm): Path<String>,
    JsonBody(req): JsonBody<StopRequest>,
) -> ApiResult<impl IntoResponse> {
    let timeout = req.timeout_secs.map(std::time::Duration::from_secs);
    Ok(axum::Json(
        l.metrics().observe(Op::Stop, l.stop(&vm, timeout)).await?,
    ))
}

async fn kill(State(l): State<AppState>, Path(vm): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(axum::Json(
        l.metrics().observe(Op::Kill, l.kill(&vm)).await?,
    ))
}

#[derive(Debug, Deserialize)]
struct ConsoleQuery {
    tail: Option<usize>,
    #[serde(default)]
    follow: bool,
}

async fn console(
    State(l): State<AppState>,
    Path(vm): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> ApiResult<Response> {
    let (tail, follower) = l.console(&vm, q.tail, q.follow)?;
    let body = match follower {
        None => Body::from(tail),
        Some(follower) => {
            let first = futures_util::stream::once(async move { Ok::<_, std::io::Error>(tail) });
            let rest = futures_util::stream::unfold(follower, |mut f| async move {
                f.next_chunk().await.map(|chunk| (chunk, f))
            });
            Body::from_stream(futures_util::StreamExt::chain(first, rest))
        }
    };
    Ok(([("content-type", "text/plain; charset=utf-8")], body).into_response())
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    #[serde(default)]
    since: i64,
}

async fn events(
    State(l): State<AppState>,
    Path(vm): Path<String>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<impl IntoResponse> {
    Ok(axum::Json(l.events(&vm, q.since)?))
}

#[derive(Debug, Deserialize)]
struct EventStreamQuery {
    #[serde(default)]
    since: i64,
    #[serde(default)]
    follow: bool,
    vm: Option<String>,
}

/// Every VM's events (or one's) after `since`, one JSON object per line;
/// with `follow`, the response stays open and new events stream as they
/// are appended.
async fn event_stream(
    State(l): State<AppState>,
    Query(q): Query<EventStreamQuery>,
) -> ApiResult<Response> {
    let follower = l.follow_events(q.vm.as_deref(), q.since, q.follow)?;
    let lines = futures_util::stream::unfold(follower, |mut f| async move {
        let batch = f.next_batch().await?;
        // The status line is already out: a store failure can only cut
        // the stream (the client sees it break off), so it is logged here.
        let chunk = batch
            .map_err(|e| {
                let chain = error_chain(&e).join(": ");
                tracing::error!(error = %chain, "event stream failed");
                std::io::Error::other(chain)
            })
            .and_then(|events| {
                let mut buf = Vec::new();
                for e in &events {
                    serde_json::to_writer(&mut buf, e)?;
                    buf.push(b'\n');
                }
                Ok(buf)
            });
        Some((chunk, f))
    });
    Ok((
        [("content-type", "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

async fn metrics(State(l): State<AppState>) -> ApiResult<Response> {
    let text = l.metrics_text()?;
    Ok(([("content-type", crate::metrics::CONTENT_TYPE)], text).into_response())
}

async fn vm_stats(
    State(l): State<AppState>,
    Path(vm): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(axum::Json(l.stats(&vm)?))
}

async fn all_stats(State(l): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(axum::Json(l.stats_all()?))
}

async fn set_ttl(
    State(l): State<AppState>,
    Path(vm): Path<String>,
    JsonBody(req): JsonBody<hearth_api::TtlRequest>,
) -> ApiResult<impl IntoResponse> {
    Ok(axum::Json(l.set_ttl(&vm, req.ttl_secs)?))
}

async fn leaks(State(l): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(axum::Json(l.leaks().await?))
}

async fn gc(State(l): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(axum::Json(l.gc().await?))
}

async fn no_route() -> ApiError {
    ApiError::NoRoute
}

fn handler(method: &str, path: &str) -> MethodRouter<AppState> {
    match (method, path) {
        ("GET", "/v1/health") => get(health),
        ("GET", "/v1/version") => get(version),
        ("GET", "/v1/vms") => get(list),
        ("POST", "/v1/vms") => post(create),
        ("GET", "/v1/vms/{vm}") => get(get_vm),
        ("DELETE", "/v1/vms/{vm}") => delete(delete_vm),
        ("POST", "/v1/vms/{vm}/start") => post(start),
        ("POST", "/v1/vms/{vm}/stop") => post(stop),
        ("POST", "/v1/vms/{vm}/kill") => post(kill),
        ("GET", "/v1/vms/{vm}/console") => get(console),
        ("GET", "/v1/vms/{vm}/events") => get(events),
        ("GET", "/v1/events") => get(event_stream),
        ("GET", "/metrics") => get(metrics),
        ("GET", "/v1/vms/{vm}/stats") => get(vm_stats),
        ("POST", "/v1/vms/{vm}/ttl") => post(set_ttl),
        ("GET", "/v1/stats") => get(all_stats),
        ("GET", "/v1/leaks") => get(leaks),
        ("POST", "/v1/gc") => post(gc),
        _ => unreachable!("route {method} {path} is in ROUTES but has no handler"),
    }
}

/// The daemon's router over `lifecycle`.
pub fn router(lifecycle: Arc<Lifecycle>) -> Router {
    hearth_api::routes::ROUTES
        .iter()
        .fold(Router::new(), |r, (m, p)| r.route(p, handler(m, p)))
        .fallback(no_route)
        .with_state(lifecycle)
}

#[cfg(test)]
mod tests;

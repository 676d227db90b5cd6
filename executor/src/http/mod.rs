//! The HTTP API (hyper 1, HTTP/1.1): routing, bearer-token auth, body size
//! limits and the JSON error shape; the handlers live in one submodule per
//! resource (`jobs`, `sandboxes`, `images`, `piston`). The API is documented in
//! `docs/openapi.json`, which is also served at `/openapi.json`.

mod body;
pub(crate) mod contexts;
mod error;
mod images;
pub(crate) mod jobs;
pub(crate) mod piston;
pub(crate) mod ports;
pub(crate) mod sandboxes;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use body::Body;
use body::SseSender;
pub use error::ApiError;

use crate::metrics::Metrics;
use crate::scheduler::Scheduler;

/// The OpenAPI document of this API, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// What every handler needs.
pub struct App {
    pub scheduler: Scheduler,
    pub registry: Registry,
    pub metrics: Metrics,
    /// Bearer token; empty: no auth.
    pub token: String,
    pub max_body_bytes: u64,
    /// The MCP server at `/mcp`.
    pub mcp: crate::mcp::McpEndpoint,
}

/// How long open connections get to finish their responses once the server
/// stops.
const CONNECTION_GRACE: Duration = Duration::from_secs(5);

/// Serves `listener` until `stop` turns true; then lets open connections
/// finish their current response (up to a few seconds) and returns.
pub async fn serve(listener: TcpListener, app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::scheduler::until_true(&mut stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of fds and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let mut stop = stop.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(app, req, peer).await) }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), svc)
                // For WebSockets to exposed ports (`ports`).
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = crate::scheduler::until_true(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(CONNECTION_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}

/// A request, after routing: the route's name (for metrics) and its answer.
async fn handle(app: Arc<App>, req: Request<Incoming>, _peer: SocketAddr) -> Response<Body> {
    let method = req.method().clone();
    let (route, answer) = route(&app, req).await;
    let resp = answer.unwrap_or_else(ApiError::into_response);
    app.metrics
        .http(method.as_str(), route, resp.status().as_u16());
    resp
}

fn segments(path: &str) -> Vec<&str> {
    path.trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect()
}

type Answer = Result<Response<Body>, ApiError>;

async fn route(app: &Arc<App>, req: Request<Incoming>) -> (&'static str, Answer) {
    let path = req.uri().path().to_owned();
    let segs = segments(&path);
    let m = req.method().clone();
    let public = matches!(segs.as_slice(), ["healthz"] | ["readyz"] | ["openapi.json"]);
    if !public {
        if let Err(e) = authorize(app, &req) {
            return ("auth", Err(e));
        }
    }
    match (segs.as_slice(), &m) {
        (["healthz"], &Method::GET) => (
            "/healthz",
            Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        ),
        (["readyz"], &Method::GET) => ("/readyz", Ok(readyz(app))),
        (["metrics"], &Method::GET) => ("/metrics", Ok(metrics(app))),
        (["openapi.json"], &Method::GET) => (
            "/openapi.json",
            Ok(with_type(
                Response::new(Body::full(OPENAPI)),
                "application/json",
            )),
        ),
        (["v1", "jobs"], &Method::POST) => ("/v1/jobs", jobs::submit(app, req).await),
        (["v1", "jobs", id], &Method::GET) => ("/v1/jobs/{id}", jobs::get(app, id)),
        (["v1", "jobs", id, "events"], &Method::GET) => {
            ("/v1/jobs/{id}/events", jobs::events(app, id))
        }
        (["v1", "sandboxes"], &Method::POST) => {
            ("/v1/sandboxes", sandboxes::create(app, req).await)
        }
        (["v1", "sandboxes"], &Method::GET) => ("/v1/sandboxes", Ok(sandboxes::list(app))),
        (["v1", "sandboxes", id], &Method::GET) => ("/v1/sandboxes/{id}", sandboxes::get(app, id)),
        (["v1", "sandboxes", id], &Method::DELETE) => {
            ("/v1/sandboxes/{id}", sandboxes::delete(app, id).await)
        }
        (["v1", "sandboxes", id, "exec"], &Method::POST) => {
            let id = id.to_string();
            (
                "/v1/sandboxes/{id}/exec",
                sandboxes::exec(app, &id, req).await,
            )
        }
        (["v1", "sandboxes", id, "ports"], &Method::POST) => {
            let id = id.to_string();
            (
                "/v1/sandboxes/{id}/ports",
                ports::expose(app, &id, req).await,
            )
        }
        (["v1", "sandboxes", id, "ports"], &Method::GET) => {
            ("/v1/sandboxes/{id}/ports", ports::list(app, id))
        }
        (["v1", "sandboxes", id, "ports", port, rest @ ..], _) => {
            let (id, port, rest) = (id.to_string(), port.to_string(), rest.join("/"));
            (
                "/v1/sandboxes/{id}/ports/{port}/{path}",
                ports::proxy(app, &id, &port, &rest, req).await,
            )
        }
        (["v1", "sandboxes", id, "egress"], &Method::GET) => {
            ("/v1/sandboxes/{id}/egress", sandboxes::get_egress(app, id))
        }
        (["v1", "sandboxes", id, "egress"], &Method::PUT) => {
            let id = id.to_string();
            (
                "/v1/sandboxes/{id}/egress",
                sandboxes::put_egress(app, &id, req).await,
            )
        }
        (["v1", "sandboxes", id, "contexts"], &Method::POST) => {
            let id = id.to_string();
            (
                "/v1/sandboxes/{id}/contexts",
                contexts::create(app, &id, req).await,
            )
        }
        (["v1", "sandboxes", id, "contexts"], &Method::GET) => {
            ("/v1/sandboxes/{id}/contexts", contexts::list(app, id))
        }
        (["v1", "sandboxes", id, "contexts", cid], &Method::GET) => (
            "/v1/sandboxes/{id}/contexts/{cid}",
            contexts::get(app, id, cid),
        ),
        (["v1", "sandboxes", id, "contexts", cid], &Method::DELETE) => (
            "/v1/sandboxes/{id}/contexts/{cid}",
            contexts::delete(app, id, cid).await,
        ),
        (["v1", "sandboxes", id, "contexts", cid, "interrupt"], &Method::POST) => (
            "/v1/sandboxes/{id}/contexts/{cid}/interrupt",
            contexts::interrupt(app, id, cid).await,
        ),
        (["v1", "sandboxes", id, "contexts", cid, "restart"], &Method::POST) => (
            "/v1/sandboxes/{id}/contexts/{cid}/restart",
            contexts::restart(app, id, cid).await,
        ),
        (["v1", "sandboxes", id, "metrics"], &Method::GET) => {
            ("/v1/sandboxes/{id}/metrics", sandboxes::metrics(app, id))
        }
        (["v1", "sandboxes", id, "files", rest @ ..], &Method::PUT) if !rest.is_empty() => {
            let id = id.to_string();
            let file = rest.join("/");
            (
                "/v1/sandboxes/{id}/files/{path}",
                sandboxes::put_file(app, &id, &file, req).await,
            )
        }
        (["v1", "sandboxes", id, "files", rest @ ..], &Method::GET) if !rest.is_empty() => (
            "/v1/sandboxes/{id}/files/{path}",
            sandboxes::get_file(app, id, &rest.join("/")).await,
        ),
        (["v1", "images"], &Method::GET) => ("/v1/images", images::list(app).await),
        (["v1", "images"], &Method::POST) => ("/v1/images", images::pull(app, req).await),
        (["v1", "images", "import"], &Method::POST) => {
            ("/v1/images/import", images::import(app, req).await)
        }
        (["v1", "images", "gc"], &Method::POST) => ("/v1/images/gc", images::gc(app).await),
        (["v1", "images", rest @ ..], &Method::DELETE) if !rest.is_empty() => (
            "/v1/images/{reference}",
            images::remove(app, &rest.join("/")).await,
        ),
        (["mcp"], _) => ("/mcp", Ok(crate::mcp::McpEndpoint::handle(app, req).await)),
        (["api", "v2", "runtimes"], &Method::GET) => {
            ("/api/v2/runtimes", Ok(piston::runtimes(app)))
        }
        (["api", "v2", "execute"], &Method::POST) => {
            ("/api/v2/execute", piston::execute(app, req).await)
        }
        _ => {
            let known = known_path(&segs);
            let e = if known {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{m} is not allowed on {path}; see /openapi.json"),
                )
            } else {
                ApiError::not_found(format!("no route {m} {path}; see /openapi.json"))
            };
            ("unknown", Err(e))
        }
    }
}

fn known_path(segs: &[&str]) -> bool {
    matches!(
        segs,
        ["healthz"]
            | ["readyz"]
            | ["metrics"]
            | ["openapi.json"]
            | ["v1", "jobs"]
            | ["v1", "jobs", _]
            | ["v1", "jobs", _, "events"]
            | ["v1", "sandboxes"]
            | ["v1", "sandboxes", _]
            | ["v1", "sandboxes", _, "exec"]
            | ["v1", "sandboxes", _, "metrics"]
            | ["v1", "sandboxes", _, "egress"]
            | ["v1", "sandboxes", _, "ports"]
            | ["v1", "sandboxes", _, "contexts"]
            | ["v1", "sandboxes", _, "contexts", _]
            | ["v1", "sandboxes", _, "contexts", _, "interrupt" | "restart"]
            | ["v1", "sandboxes", _, "files", _, ..]
            | ["v1", "images", ..]
            | ["api", "v2", "runtimes"]
            | ["api", "v2", "execute"]
            | ["mcp"]
    )
}

/// Checks `Authorization: Bearer <token>` when a token is configured.
fn authorize(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    if app.token.is_empty() {
        return Ok(());
    }
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let Some(h) = req.headers().get(hyper::header::AUTHORIZATION) else {
        return Err(unauthorized(
            "missing Authorization header; send `Authorization: Bearer <token>`",
        ));
    };
    let given = h
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), app.token.as_bytes()) {
        return Err(unauthorized("the bearer token in Authorization is wrong"));
    }
    Ok(())
}

/// Compares without an early exit, so timing does not reveal the prefix
/// that matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn readyz(app: &App) -> Response<Body> {
    let s = &app.scheduler;
    if s.ready() {
        json_response(StatusCode::OK, &json!({"status": "ready"}))
    } else {
        let why = if s.is_shutting_down() {
            "shutting down"
        } else {
            "the warm pool has not reached min_idle yet"
        };
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "not_ready", "reason": why}),
        )
    }
}

fn metrics(app: &App) -> Response<Body> {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &app.registry) {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("encoding metrics: {e}"),
        )
        .into_response();
    }
    with_type(
        Response::new(Body::full(text)),
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )
}

fn with_type(mut r: Response<Body>, ct: &'static str) -> Response<Body> {
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    r
}

/// A JSON answer.
pub fn json_response<T: Serialize + ?Sized>(status: StatusCode, v: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(v).unwrap_or_else(|e| {
        format!(r#"{{"error":{{"code":"internal","message":"encoding the answer: {e}"}}}}"#)
            .into_bytes()
    });
    let mut r = with_type(Response::new(Body::full(bytes)), "application/json");
    *r.status_mut() = status;
    r
}

/// Reads a request body of at most `max` bytes; more is a 413 naming the
/// limit.
async fn read_body(req: Request<Incoming>, max: u64) -> Result<Bytes, ApiError> {
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than the limit of {max} bytes"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max {
            return Err(too_big());
        }
    }
    let limited = Limited::new(req.into_body(), usize::try_from(max).unwrap_or(usize::MAX));
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_big()),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("reading the request body: {e}"),
        )),
    }
}

/// The value of query parameter `name`, if present.
fn query<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// A boolean query parameter (`true|false|1|0`), naming it when malformed.
fn query_bool(req: &Request<Incoming>, name: &str, default: bool) -> Result<bool, ApiError> {
    match query(req, name) {
        None => Ok(default),
        Some("true" | "1" | "") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(v) => Err(ApiError::field(
            name,
            format!("{v:?} is not a boolean; use true or false"),
        )),
    }
}

/// Whether the client asked for an event stream.
fn wants_sse(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

/// An SSE response fed by `f`.
fn sse<F, Fut>(f: F) -> Response<Body>
where
    F: FnOnce(SseSender) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, body) = Body::channel();
    tokio::spawn(f(SseSender::new(tx)));
    let mut r = with_type(Response::new(body), "text/event-stream");
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    r
}

/// Decodes `%XX` escapes of a URL path segment.
fn percent_decode(s: &str) -> Result<String, ApiError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ApiError::field("path", "has a malformed %-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::field("path", "is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_escapes_decode() {
        assert_eq!(percent_decode("a%20b/c").unwrap(), "a b/c");
        assert!(percent_decode("%zz").is_err());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}

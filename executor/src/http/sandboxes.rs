//! `/v1/sandboxes`: workspaces. Create (with template, TTL, remove-on-exit,
//! network, CPU, memory, env), list, describe, exec (JSON or SSE), files in
//! and out of `/work`, delete, and a once-a-second SSE stream of live
//! figures.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use kiln_protocol::limits;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::body::SseSender;
use super::jobs::parse_spec;
use super::{
    json_response, percent_decode, query_bool, read_body, sse, wants_sse, ApiError, App, Body,
};
use crate::jobs::OutputEvent;
use crate::live::LiveSample;
use crate::workspaces::{Workspace, WorkspaceError, WorkspaceRequest, WorkspaceSettings};

fn ws_error(e: WorkspaceError) -> ApiError {
    match e {
        WorkspaceError::Unsupported { field, message } => {
            let mut a = ApiError::field(field, message);
            if matches!(field, "allow_internet" | "egress" | "network" | "rate_mbit") {
                a.status = StatusCode::UNPROCESSABLE_ENTITY;
                a.code = "unsupported";
            }
            a
        }
        WorkspaceError::TooMany(_) => {
            let mut a = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_sandboxes",
                e.to_string(),
            );
            a.retry_after = Some(10);
            a
        }
        WorkspaceError::Gone(_) => ApiError::not_found(e.to_string()),
        WorkspaceError::Refused(m) => ApiError::new(StatusCode::NOT_FOUND, "file_error", m),
        WorkspaceError::Internal(m) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    template: String,
    ttl_s: Option<f64>,
    #[serde(default)]
    remove_on_exit: bool,
    #[serde(default)]
    allow_internet: bool,
    cpus: Option<f64>,
    memory_mb: Option<i64>,
    disk_mb: Option<i64>,
    pids: Option<i64>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    image: Option<String>,
    /// Egress rules (needs `allow_internet`); default: the configured ones.
    egress: Option<kiln_sandbox::network::EgressSpec>,
    /// A private network shared with the sandboxes that name it.
    network: Option<String>,
    /// Bandwidth each way, Mbit/s (0: unlimited); default: configured.
    rate_mbit: Option<u32>,
}

/// Parses egress rules at the edge; the error names the bad rule.
fn parse_egress(
    spec: &kiln_sandbox::network::EgressSpec,
) -> Result<kiln_sandbox::network::EgressRules, ApiError> {
    if spec.allow.len() + spec.deny.len() > MAX_EGRESS_RULES {
        return Err(ApiError::field(
            "egress",
            format!("at most {MAX_EGRESS_RULES} rules"),
        ));
    }
    kiln_sandbox::network::EgressRules::parse(spec).map_err(|m| ApiError::field("egress", m))
}

/// Rules per sandbox: each is a set element or a resolver check.
const MAX_EGRESS_RULES: usize = 256;

fn range(field: &str, v: Option<i64>, (min, def, max): (u64, u64, u64)) -> Result<u64, ApiError> {
    match v {
        None => Ok(def),
        Some(v) if v >= min as i64 && v <= max as i64 => Ok(v as u64),
        Some(v) => Err(ApiError::field(
            field,
            format!("{v} is out of range; allowed {min} to {max}"),
        )),
    }
}

/// Parses a create body against the server's workspace settings (default
/// and longest TTL), naming the first wrong field.
pub fn parse_create(ws: &WorkspaceSettings, body: &[u8]) -> Result<WorkspaceRequest, ApiError> {
    let b: CreateBody = ApiError::parse_json(body, "sandbox")?;
    let max_ttl = ws.max_ttl.as_secs_f64();
    // Compared as a Duration: a float near `max_ttl` may round above it,
    // and one of 2^64 s or more does not convert at all (which panicked).
    let ttl = match b.ttl_s {
        None => ws.default_ttl,
        Some(t) => match Duration::try_from_secs_f64(t) {
            Ok(d) if !d.is_zero() && d <= ws.max_ttl => d,
            _ => {
                return Err(ApiError::field(
                    "ttl_s",
                    format!("{t} is out of range; allowed above 0 up to {max_ttl}"),
                ))
            }
        },
    };
    let (cmin, cdef, cmax) = limits::CPU_MILLIS;
    let cpu_millis = match b.cpus {
        None => cdef,
        Some(c)
            if c.is_finite()
                && (c * 1000.0).round() >= cmin as f64
                && (c * 1000.0).round() <= cmax as f64 =>
        {
            (c * 1000.0).round() as u64
        }
        Some(c) => {
            return Err(ApiError::field(
                "cpus",
                format!(
                    "{c} is out of range; allowed {} to {}",
                    cmin as f64 / 1000.0,
                    cmax as f64 / 1000.0
                ),
            ))
        }
    };
    if let Some(i) = &b.image {
        kiln_protocol::check_image_ref("image", i)
            .map_err(|e| ApiError::field("image", e.message))?;
    }
    if b.env.len() > limits::MAX_ENV {
        return Err(ApiError::field(
            "env",
            format!("at most {} variables", limits::MAX_ENV),
        ));
    }
    for k in b.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(ApiError::field(
                format!("env.{k}"),
                "a variable name must be non-empty without '=' or NUL",
            ));
        }
    }
    let egress = match &b.egress {
        Some(_) if !b.allow_internet => {
            return Err(ApiError::field(
                "egress",
                "egress rules need allow_internet: true",
            ))
        }
        Some(spec) => Some(parse_egress(spec)?),
        None => None,
    };
    if let Some(n) = &b.network {
        if !b.allow_internet {
            return Err(ApiError::field(
                "network",
                "a private network needs allow_internet: true (an interface); use egress {\"allow\": []} for no internet",
            ));
        }
        let ok = !n.is_empty()
            && n.len() <= 63
            && n.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
        if !ok {
            return Err(ApiError::field(
                "network",
                format!("{n:?} is not a network name (letters, digits, - and _, at most 63)"),
            ));
        }
    }
    if b.rate_mbit.is_some() && !b.allow_internet {
        return Err(ApiError::field(
            "rate_mbit",
            "a bandwidth limit needs allow_internet: true",
        ));
    }
    if b.rate_mbit.is_some_and(|r| r > 100_000) {
        return Err(ApiError::field("rate_mbit", "at most 100000 (Mbit/s)"));
    }
    Ok(WorkspaceRequest {
        rate_mbit: b.rate_mbit,
        network: b.network,
        egress,
        template: b.template,
        ttl,
        remove_on_exit: b.remove_on_exit,
        allow_internet: b.allow_internet,
        cpu_millis,
        memory_mb: range("memory_mb", b.memory_mb, limits::MEMORY_MB)?,
        disk_mb: range("disk_mb", b.disk_mb, limits::DISK_MB)?,
        pids: range("pids", b.pids, limits::PIDS)?,
        env: b.env,
        image: b.image,
    })
}

fn shutting_down(app: &App) -> Result<(), ApiError> {
    if app.scheduler.is_shutting_down() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down and makes no new sandboxes",
        ));
    }
    Ok(())
}

pub async fn create(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    shutting_down(app)?;
    let body = read_body(req, app.max_body_bytes).await?;
    let wreq = parse_create(app.scheduler.workspaces().settings(), &body)?;
    let info = app
        .scheduler
        .workspaces()
        .create(wreq)
        .await
        .map_err(ws_error)?;
    let mut r = json_response(StatusCode::CREATED, &info);
    if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("/v1/sandboxes/{}", info.id)) {
        r.headers_mut().insert(hyper::header::LOCATION, v);
    }
    Ok(r)
}

pub fn list(app: &Arc<App>) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({"sandboxes": app.scheduler.workspaces().list()}),
    )
}

/// The workspace `id`, or a 404.
pub(super) fn find(app: &App, id: &str) -> Result<Arc<Workspace>, ApiError> {
    app.scheduler
        .workspaces()
        .get(id)
        .ok_or_else(|| ws_error(WorkspaceError::Gone(id.to_owned())))
}

pub fn get(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    Ok(json_response(StatusCode::OK, ws.info()))
}

/// `GET /v1/sandboxes/{id}/egress`: address and rules.
pub fn get_egress(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    Ok(json_response(
        StatusCode::OK,
        &ws.network().map_err(ws_error)?,
    ))
}

/// `PUT /v1/sandboxes/{id}/egress`: new rules for a running workspace.
pub async fn put_egress(
    app: &Arc<App>,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    let body = read_body(req, app.max_body_bytes).await?;
    let spec: kiln_sandbox::network::EgressSpec = ApiError::parse_json(&body, "egress")?;
    let rules = parse_egress(&spec)?;
    let view = ws.set_egress(rules).await.map_err(|e| {
        let mut a = ws_error(e);
        if a.field.as_deref() == Some("egress") {
            a.status = StatusCode::UNPROCESSABLE_ENTITY;
            a.code = "unsupported";
        }
        a
    })?;
    Ok(json_response(StatusCode::OK, &view))
}

pub async fn delete(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    if !app
        .scheduler
        .workspaces()
        .end(id, crate::workspaces::EndReason::Deleted)
        .await
    {
        return Err(ws_error(WorkspaceError::Gone(id.to_owned())));
    }
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

/// An exec body is a job without `runtime` (the workspace's template is
/// the default).
fn parse_exec(ws: &Workspace, body: &[u8]) -> Result<kiln_protocol::JobSpec, ApiError> {
    let mut v: serde_json::Value =
        serde_json::from_slice(body).map_err(ApiError::malformed_json)?;
    let Some(o) = v.as_object_mut() else {
        return Err(ApiError::field("body", "must be a JSON object"));
    };
    o.entry("runtime")
        .or_insert_with(|| json!(ws.info().template));
    parse_spec(v.to_string().as_bytes())
}

pub async fn exec(
    app: &Arc<App>,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    let stream = wants_sse(&req) || query_bool(&req, "stream", false)?;
    let body = read_body(req, app.max_body_bytes).await?;
    if let Some(cid) = super::contexts::named_context(&body) {
        return super::contexts::exec(ws, cid, &body, stream).await;
    }
    let spec = parse_exec(&ws, &body)?;
    let workspaces = app.scheduler.workspaces().clone();
    if !stream {
        let r = workspaces
            .exec(&ws, spec, &mut ())
            .await
            .map_err(ws_error)?;
        return Ok(json_response(StatusCode::OK, &r));
    }
    // The exec runs in its own task: a client that leaves the stream does
    // not cut the exec short.
    let (etx, mut erx) = mpsc::unbounded_channel::<OutputEvent>();
    tokio::spawn(async move {
        let out = etx.clone();
        let mut sink = move |s: kiln_sandbox::Stream, d: &[u8]| {
            let b = bytes::Bytes::copy_from_slice(d);
            let _ = out.send(match s {
                kiln_sandbox::Stream::Stdout => OutputEvent::Stdout(b),
                kiln_sandbox::Stream::Stderr => OutputEvent::Stderr(b),
            });
        };
        let r = match workspaces.exec(&ws, spec, &mut sink).await {
            Ok(r) => r,
            Err(e) => {
                kiln_protocol::JobResult::internal(kiln_protocol::JobId::random(), e.to_string())
            }
        };
        let _ = etx.send(OutputEvent::Exit(Box::new(r)));
    });
    Ok(sse(move |tx: SseSender| async move {
        while let Some(e) = erx.recv().await {
            let (name, data, last) = match e {
                OutputEvent::Stdout(b) => (
                    "stdout",
                    json!({"data": String::from_utf8_lossy(&b)}),
                    false,
                ),
                OutputEvent::Stderr(b) => (
                    "stderr",
                    json!({"data": String::from_utf8_lossy(&b)}),
                    false,
                ),
                OutputEvent::Exit(r) => {
                    ("exit", serde_json::to_value(&*r).unwrap_or_default(), true)
                }
            };
            if !tx.send(name, &data).await || last {
                return;
            }
        }
    }))
}

pub async fn put_file(
    app: &Arc<App>,
    id: &str,
    path: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    let path = percent_decode(path)?;
    let max = (limits::MAX_FILE_BYTES as u64).min(app.max_body_bytes);
    let body = read_body(req, max).await?;
    app.scheduler
        .workspaces()
        .put_file(&ws, &path, body.to_vec())
        .await
        .map_err(ws_error)?;
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

pub async fn get_file(app: &Arc<App>, id: &str, path: &str) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    let path = percent_decode(path)?;
    let data = app
        .scheduler
        .workspaces()
        .get_file(&ws, &path)
        .await
        .map_err(ws_error)?;
    let mut r = Response::new(Body::full(data));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/octet-stream"),
    );
    Ok(r)
}

/// Live figures once a second (`metrics` events), then `end` with the
/// reason when the sandbox goes away.
pub fn metrics(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    Ok(sse(move |tx: SseSender| async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut prev: Option<LiveSample> = None;
        loop {
            tokio::select! {
                why = ws.ended() => {
                    tx.send("end", &json!({"reason": why})).await;
                    return;
                }
                _ = tx.closed() => return,
                _ = tick.tick() => {
                    let Some(s) = ws.sample() else { continue };
                    let cpu_percent = match (&prev, s.cpu_usage_us) {
                        (Some(p), Some(now)) => p.cpu_usage_us.map(|before| {
                            let dt = (s.ts - p.ts).max(1e-3);
                            now.saturating_sub(before) as f64 / 1e6 / dt * 100.0
                        }),
                        _ => None,
                    };
                    let mut v = serde_json::to_value(&s).unwrap_or_default();
                    v["cpu_percent"] = json!(cpu_percent);
                    if !tx.send("metrics", &v).await {
                        return;
                    }
                    prev = Some(s);
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_ttl_s: u64) -> WorkspaceSettings {
        WorkspaceSettings {
            max: 1,
            default_ttl: Duration::from_secs(600.min(max_ttl_s)),
            max_ttl: Duration::from_secs(max_ttl_s),
        }
    }

    fn ttl_field(ws: &WorkspaceSettings, ttl_s: &str) -> Option<String> {
        let body = format!(r#"{{"template":"python","ttl_s":{ttl_s}}}"#);
        parse_create(ws, body.as_bytes()).err()?.field
    }

    /// Found writing the sandbox_create fuzz target (an input made for it
    /// crashed it): with `sandboxes.max_ttl_s` at its largest, a TTL of
    /// 2^64 s passed the range check as a float and then panicked
    /// converting to a Duration.
    #[test]
    fn a_ttl_past_what_a_duration_holds_is_refused_not_a_panic() {
        let ws = settings(u64::MAX);
        assert_eq!(
            ttl_field(&ws, "1.8446744073709552e19"),
            Some("ttl_s".into())
        );
        assert_eq!(ttl_field(&ws, "1e300"), Some("ttl_s".into()));
        assert_eq!(ttl_field(&ws, "1e19"), None);
    }

    #[test]
    fn a_ttl_is_above_zero_and_at_most_the_longest() {
        let ws = settings(3600);
        assert_eq!(
            ttl_field(&ws, "1e-300"),
            Some("ttl_s".into()),
            "rounds to 0 s"
        );
        assert_eq!(ttl_field(&ws, "0"), Some("ttl_s".into()));
        assert_eq!(ttl_field(&ws, "3600.000001"), Some("ttl_s".into()));
        assert_eq!(ttl_field(&ws, "3600"), None);
        let req = parse_create(&ws, br#"{"template":"python","ttl_s":0.5}"#).unwrap();
        assert_eq!(req.ttl, Duration::from_millis(500));
    }
}

//! `/v1/jobs`: submit (sync, or `?wait=false` for 202 and an id), look up,
//! and follow a job's output as Server-Sent Events.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use kiln_protocol::{JobId, JobResult, JobSpec};
use serde_json::json;

use super::body::SseSender;
use super::{json_response, query_bool, read_body, sse, wants_sse, ApiError, App, Body};
use crate::scheduler::{AdmitError, EventStream, OutputEvent, Phase, SubmitOptions};

/// Maps a refused admission to its answer.
pub fn admit_error(e: AdmitError) -> ApiError {
    match e {
        AdmitError::Rejected(r) => rejected(&r),
        AdmitError::Busy { retry_after } => {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            let mut a = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "busy",
                format!("every run and queue slot is taken; retry after {secs} s"),
            );
            a.retry_after = Some(secs);
            a
        }
        AdmitError::ShuttingDown => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down and admits no new jobs",
        ),
    }
}

/// A `rejected` result as an error naming the field its message starts with.
fn rejected(r: &JobResult) -> ApiError {
    let msg = r.message.clone().unwrap_or_else(|| "rejected".into());
    let field = msg.split_once(':').map(|(f, _)| f.to_owned());
    let (status, code) = match field.as_deref() {
        Some("runtime") => (StatusCode::BAD_REQUEST, "unknown_runtime"),
        Some("id") => (StatusCode::CONFLICT, "duplicate_id"),
        _ => (StatusCode::BAD_REQUEST, "rejected"),
    };
    let mut e = ApiError::new(status, code, msg);
    e.field = field;
    e
}

/// Parses a job body, naming the first wrong field.
pub fn parse_spec(body: &[u8]) -> Result<JobSpec, ApiError> {
    JobSpec::from_json(body).map_err(|e| {
        if e.field == "body" {
            ApiError::malformed_json(e.message)
        } else {
            ApiError::field(e.field, e.message)
        }
    })
}

pub async fn submit(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let wait = query_bool(&req, "wait", true)?;
    let remove_on_exit = query_bool(&req, "remove_on_exit", true)?;
    let stream = wants_sse(&req);
    let body = read_body(req, app.max_body_bytes).await?;
    let spec = parse_spec(&body)?;
    let handle = app
        .scheduler
        .submit(
            spec,
            SubmitOptions {
                remove_on_exit,
                ..SubmitOptions::default()
            },
        )
        .map_err(admit_error)?;
    let id = handle.id.clone();
    if stream {
        let events = handle.events();
        return Ok(sse(move |tx| forward(events, tx)));
    }
    if !wait {
        let mut r = json_response(
            StatusCode::ACCEPTED,
            &json!({"id": id, "state": Phase::Queued, "links": links(&id)}),
        );
        if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("/v1/jobs/{id}")) {
            r.headers_mut().insert(hyper::header::LOCATION, v);
        }
        return Ok(r);
    }
    let sandbox = handle.sandbox_watch();
    let result = handle.result().await;
    let mut r = json_response(StatusCode::OK, &result);
    if let Some(ws) = sandbox.borrow().as_deref() {
        if let Ok(v) = hyper::header::HeaderValue::from_str(ws) {
            r.headers_mut().insert("kiln-sandbox", v);
        }
    }
    Ok(r)
}

fn links(id: &JobId) -> serde_json::Value {
    json!({"self": format!("/v1/jobs/{id}"), "events": format!("/v1/jobs/{id}/events")})
}

fn job_id(id: &str) -> Result<JobId, ApiError> {
    JobId::parse(id).map_err(|e| {
        let mut a = ApiError::not_found(format!("no job {id:?}: {}", e.message));
        a.field = Some("id".into());
        a
    })
}

pub fn get(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let id = job_id(id)?;
    let rec = app.scheduler.job(&id).ok_or_else(|| {
        ApiError::not_found(format!(
            "no job {id}: never submitted here, or its result expired"
        ))
    })?;
    let mut v = json!({"id": id, "state": rec.phase(), "links": links(&id)});
    if let Some(r) = rec.result() {
        v["result"] = serde_json::to_value(r).unwrap_or_default();
    }
    Ok(json_response(StatusCode::OK, &v))
}

pub fn events(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let id = job_id(id)?;
    let rec = app.scheduler.job(&id).ok_or_else(|| {
        ApiError::not_found(format!(
            "no job {id}: never submitted here, or its result expired"
        ))
    })?;
    let events = rec.events();
    Ok(sse(move |tx| forward(events, tx)))
}

/// How often a silent event stream gets a comment line, so that proxies
/// and clients with idle timeouts keep it open.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// Streams a job's events: `stdout` and `stderr` (`{"data": "..."}`) as
/// they happen, then `exit` with the whole result.
async fn forward(mut events: EventStream, tx: SseSender) {
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.tick().await;
    loop {
        let e = tokio::select! {
            e = events.next() => e,
            _ = tx.closed() => return,
            _ = keepalive.tick() => {
                if !tx.keepalive().await {
                    return;
                }
                continue;
            }
        };
        let Some(e) = e else { return };
        let ok = match e {
            OutputEvent::Stdout(b) => {
                tx.send("stdout", &json!({"data": String::from_utf8_lossy(&b)}))
                    .await
            }
            OutputEvent::Stderr(b) => {
                tx.send("stderr", &json!({"data": String::from_utf8_lossy(&b)}))
                    .await
            }
            OutputEvent::Exit(r) => {
                tx.send("exit", &serde_json::to_value(&*r).unwrap_or_default())
                    .await;
                return;
            }
        };
        if !ok {
            return;
        }
    }
}

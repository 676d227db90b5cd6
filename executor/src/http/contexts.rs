//! `/v1/sandboxes/{id}/contexts`: code contexts (long-lived interpreters)
//! in a workspace. Create, list, describe, interrupt, restart, delete; an
//! exec names a context with `"context": "<id>"` in its body (JSON or SSE,
//! like any exec).

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use kiln_protocol::JobSpec;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::body::SseSender;
use super::jobs::parse_spec;
use super::sandboxes::find;
use super::{json_response, read_body, sse, ApiError, App, Body};
use crate::contexts::{self, CellRequest, CellSink, ContextError, ContextExecResult, DisplayData};
use crate::workspaces::{EndReason, Workspace};

pub fn context_error(e: ContextError) -> ApiError {
    match e {
        ContextError::Invalid { field, message } => ApiError::field(field, message),
        ContextError::Gone(_) => ApiError::not_found(e.to_string()),
        ContextError::Busy(_) => ApiError::new(StatusCode::CONFLICT, "context_busy", e.to_string()),
        ContextError::Dead { .. } => {
            ApiError::new(StatusCode::CONFLICT, "context_dead", e.to_string())
        }
        ContextError::TooMany => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_contexts",
            e.to_string(),
        ),
        ContextError::Internal(m) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
        }
    }
}

fn held(ws: &Workspace) -> Result<Arc<crate::sandboxes::Held>, ApiError> {
    ws.held().map_err(|e| ApiError::not_found(e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    language: Option<String>,
    cwd: Option<String>,
}

pub async fn create(
    app: &Arc<App>,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    let body = read_body(req, app.max_body_bytes).await?;
    let b: CreateBody = if body.iter().all(u8::is_ascii_whitespace) {
        CreateBody {
            language: None,
            cwd: None,
        }
    } else {
        ApiError::parse_json(&body, "context")?
    };
    let info = create_in(app, &ws, b.language.as_deref(), b.cwd).await?;
    let mut r = json_response(StatusCode::CREATED, &info);
    if let Ok(v) = hyper::header::HeaderValue::from_str(&format!(
        "/v1/sandboxes/{}/contexts/{}",
        ws.info().id,
        info.id
    )) {
        r.headers_mut().insert(hyper::header::LOCATION, v);
    }
    Ok(r)
}

/// Starts a context (the workspace's template language by default).
pub async fn create_in(
    app: &App,
    ws: &Workspace,
    language: Option<&str>,
    cwd: Option<String>,
) -> Result<contexts::ContextInfo, ApiError> {
    let held = held(ws)?;
    let template = ws.info().template.clone();
    ws.contexts
        .create(
            &held,
            app.scheduler.workspaces().runtimes(),
            &template,
            language.unwrap_or(&template),
            cwd,
        )
        .await
        .map_err(context_error)
}

pub fn list(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"contexts": ws.contexts.list()}),
    ))
}

pub fn get(app: &Arc<App>, id: &str, cid: &str) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    let c = ws.contexts.get(cid).map_err(context_error)?;
    Ok(json_response(StatusCode::OK, &c.info()))
}

pub async fn delete(app: &Arc<App>, id: &str, cid: &str) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    ws.contexts.delete(cid).await.map_err(context_error)?;
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

pub async fn interrupt(app: &Arc<App>, id: &str, cid: &str) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    let c = ws.contexts.get(cid).map_err(context_error)?;
    let sent = c.interrupt().await;
    Ok(json_response(StatusCode::OK, &json!({"interrupted": sent})))
}

pub async fn restart(app: &Arc<App>, id: &str, cid: &str) -> Result<Response<Body>, ApiError> {
    let ws = find(app, id)?;
    let held = held(&ws)?;
    let info = ws
        .contexts
        .restart(&held, cid, &ws.info().template)
        .await
        .map_err(context_error)?;
    Ok(json_response(StatusCode::OK, &info))
}

/// The context an exec body names, if any (the body is then a cell).
pub fn named_context(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("context")?.as_str().map(str::to_owned)
}

/// Parses a context exec body: a job body with `context` and `code`, whose
/// `runtime` (if given) must be the context's language; `stdin`, `args`
/// and `entrypoint` do not apply to a cell.
pub fn parse_cell(body: &[u8], language: &str) -> Result<CellRequest, ApiError> {
    let mut v: Value = ApiError::parse_json(body, "context")?;
    let Some(o) = v.as_object_mut() else {
        return Err(ApiError::field("body", "must be a JSON object"));
    };
    o.remove("context");
    o.entry("runtime").or_insert_with(|| json!(language));
    let spec: JobSpec = parse_spec(v.to_string().as_bytes())?;
    cell_from_spec(spec)
}

/// A cell from a validated job spec.
pub fn cell_from_spec(spec: JobSpec) -> Result<CellRequest, ApiError> {
    let Some(code) = spec.code else {
        return Err(ApiError::field(
            "code",
            "a context exec needs `code` (the cell to run)",
        ));
    };
    if !spec.stdin.is_empty() {
        return Err(ApiError::field("stdin", "does not apply to a context exec"));
    }
    if !spec.args.is_empty() {
        return Err(ApiError::field("args", "does not apply to a context exec"));
    }
    if spec.entrypoint.is_some() {
        return Err(ApiError::field(
            "entrypoint",
            "does not apply to a context exec",
        ));
    }
    Ok(CellRequest {
        code,
        files: spec.files,
        timeout_ms: spec.limits.timeout_ms,
        output_bytes: spec.limits.output_bytes,
    })
}

/// Runs a cell in a context of `ws`, ending early (outcome `killed`) if the
/// workspace ends.
pub async fn run_cell(
    ws: &Workspace,
    cid: &str,
    cell: CellRequest,
    sink: &mut dyn CellSink,
) -> Result<ContextExecResult, ApiError> {
    let ctx = ws.contexts.get(cid).map_err(context_error)?;
    let held = held(ws)?;
    tokio::select! {
        biased;
        why = ws.ended() => {
            let what = match why {
                EndReason::Ttl => "the sandbox's TTL ended during the exec; the sandbox is gone",
                EndReason::Shutdown => "the server shut down during the exec",
                _ => "the sandbox was deleted during the exec",
            };
            Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", what))
        }
        r = contexts::exec(&held, &ctx, cell, sink) => {
            let mut r = r.map_err(context_error)?;
            r.result.image = ws.info().image.clone();
            Ok(r)
        }
    }
}

/// `POST /v1/sandboxes/{id}/exec` with a `context`: JSON or SSE.
pub async fn exec(
    ws: Arc<Workspace>,
    cid: String,
    body: &[u8],
    stream: bool,
) -> Result<Response<Body>, ApiError> {
    let ctx = ws.contexts.get(&cid).map_err(context_error)?;
    let language = ctx.info().language;
    let cell = parse_cell(body, &language)?;
    if !stream {
        let r = run_cell(&ws, &cid, cell, &mut ()).await?;
        return Ok(json_response(StatusCode::OK, &r));
    }
    // Refusals (busy, dead) are answered as errors before the stream opens.
    if let Err(e) = ctx.check_ready() {
        return Err(context_error(e));
    }
    // The cell runs in its own task: a client that leaves the stream does
    // not cut it short. Events: stdout, stderr, display, then exit (or
    // error when the context refused the cell after all).
    let (etx, mut erx) = mpsc::unbounded_channel::<(&'static str, Value)>();
    tokio::spawn(async move {
        let mut sink = SseCell(etx.clone());
        let last = match run_cell(&ws, &cid, cell, &mut sink).await {
            Ok(r) => ("exit", serde_json::to_value(&r).unwrap_or_default()),
            Err(e) => (
                "error",
                json!({"error": {"code": e.code, "message": e.message}}),
            ),
        };
        let _ = etx.send(last);
    });
    Ok(sse(move |tx: SseSender| async move {
        while let Some((name, data)) = erx.recv().await {
            if !tx.send(name, &data).await || matches!(name, "exit" | "error") {
                return;
            }
        }
    }))
}

/// A cell's events for its SSE stream.
struct SseCell(mpsc::UnboundedSender<(&'static str, Value)>);

impl CellSink for SseCell {
    fn output(&mut self, stream: kiln_sandbox::Stream, data: &[u8]) {
        let name = match stream {
            kiln_sandbox::Stream::Stdout => "stdout",
            kiln_sandbox::Stream::Stderr => "stderr",
        };
        let _ = self
            .0
            .send((name, json!({"data": String::from_utf8_lossy(data)})));
    }

    fn display(&mut self, data: &DisplayData) {
        let _ = self
            .0
            .send(("display", serde_json::to_value(data).unwrap_or_default()));
    }
}

//! Piston compatibility (`/api/v2/runtimes`, `/api/v2/execute`), so that
//! existing Piston clients can point at Kiln unchanged: Piston's request
//! and response shapes and its `{"message": ...}` errors. Only the run
//! stage exists (no compiled languages), so `compile` is never answered.

use std::sync::Arc;

use base64::Engine as _;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use kiln_protocol::{JobResult, JobSpec, Outcome, Runtime, RuntimeTable};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{json_response, read_body, ApiError, App, Body};
use crate::scheduler::{AdmitError, JobSource, OutputEvent, SubmitOptions};

/// Piston's error shape.
fn message(status: StatusCode, m: impl Into<String>) -> Response<Body> {
    json_response(status, &json!({"message": m.into()}))
}

pub fn runtimes(app: &Arc<App>) -> Response<Body> {
    let v: Vec<Value> = app
        .scheduler
        .runtimes()
        .iter()
        .map(|r| json!({"language": r.name, "version": r.version, "aliases": r.aliases, "runtime": r.name}))
        .collect();
    json_response(StatusCode::OK, &v)
}

#[derive(Deserialize)]
struct PistonFile {
    name: Option<String>,
    content: String,
    encoding: Option<String>,
}

#[derive(Deserialize)]
struct PistonRequest {
    language: String,
    version: Option<String>,
    files: Vec<PistonFile>,
    stdin: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    run_timeout: Option<i64>,
    run_memory_limit: Option<i64>,
}

/// Whether a requested version selects ours: `*`, or either is a
/// dot-boundary prefix of the other (our `3` serves `3.11.2`; `3` asks for
/// our `3.x`).
fn version_matches(asked: &str, ours: &str) -> bool {
    let prefix = |a: &str, b: &str| b == a || b.starts_with(&format!("{a}."));
    asked == "*" || asked.is_empty() || prefix(asked, ours) || prefix(ours, asked)
}

/// Why a Piston execute body was refused: the request field at fault
/// (`body` when it is not a Piston request at all) and the whole message,
/// which starts with or names that field, as Piston clients get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub field: String,
    pub message: String,
}

impl Refusal {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Parses a Piston execute body into the runtime it selects from
/// `runtimes` and a validated Kiln job, or the refusal naming the field.
pub fn parse_execute(body: &[u8], runtimes: &RuntimeTable) -> Result<(Runtime, JobSpec), Refusal> {
    let preq: PistonRequest = serde_json::from_slice(body)
        .map_err(|e| Refusal::new("body", format!("invalid request: {e}")))?;
    let version = preq.version.clone().unwrap_or_else(|| "*".into());
    let rt = match runtimes.resolve(&preq.language) {
        Ok(rt) if version_matches(&version, &rt.version) => rt.clone(),
        Ok(_) => {
            return Err(Refusal::new(
                "version",
                format!("{}-{version} runtime is unknown", preq.language),
            ))
        }
        Err(_) => {
            return Err(Refusal::new(
                "language",
                format!("{}-{version} runtime is unknown", preq.language),
            ))
        }
    };
    let job = to_job(preq, &rt)?;
    let spec = JobSpec::from_json(job.to_string().as_bytes()).map_err(|e| {
        let field = match e.field.as_str() {
            "limits.timeout_ms" => "run_timeout".to_owned(),
            "limits.memory_mb" => "run_memory_limit".to_owned(),
            f => f.to_owned(),
        };
        Refusal::new(field.clone(), format!("{field}: {}", e.message))
    })?;
    Ok((rt, spec))
}

/// Turns a Piston request into a Kiln job (as JSON, so the job's own
/// validation and messages apply).
fn to_job(req: PistonRequest, rt: &Runtime) -> Result<Value, Refusal> {
    if req.files.is_empty() {
        return Err(Refusal::new(
            "files",
            "files: at least one file is required",
        ));
    }
    let mut files = Vec::new();
    for (i, f) in req.files.into_iter().enumerate() {
        let path = match f.name {
            Some(n) if !n.is_empty() => n,
            _ if i == 0 => rt.file.clone(),
            _ => format!("file{i}"),
        };
        let (content, encoding) = match f.encoding.as_deref() {
            None | Some("utf8") | Some("utf-8") => (f.content, "utf8"),
            Some("base64") => (f.content, "base64"),
            Some("hex") => {
                let bytes = decode_hex(&f.content).ok_or_else(|| {
                    Refusal::new(
                        format!("files[{i}].content"),
                        format!("files[{i}].content is not valid hex"),
                    )
                })?;
                (
                    base64::engine::general_purpose::STANDARD.encode(bytes),
                    "base64",
                )
            }
            Some(other) => {
                return Err(Refusal::new(
                    format!("files[{i}].encoding"),
                    format!("files[{i}].encoding {other:?} is not one of utf8, base64, hex"),
                ))
            }
        };
        files.push(json!({"path": path, "content": content, "encoding": encoding}));
    }
    let entry = files[0]["path"].clone();
    let mut limits = serde_json::Map::new();
    if let Some(t) = req.run_timeout {
        limits.insert("timeout_ms".into(), json!(t));
    }
    if let Some(m) = req.run_memory_limit {
        if m >= 0 {
            // Bytes to MiB, rounded up; `m + 2^20 - 1` overflowed near i64::MAX.
            let mb = (m as u64).div_ceil(1 << 20);
            limits.insert("memory_mb".into(), json!(mb));
        } else if m != -1 {
            return Err(Refusal::new(
                "run_memory_limit",
                format!("run_memory_limit {m} is negative; use -1 for no limit"),
            ));
        }
    }
    Ok(json!({
        "runtime": rt.name,
        "files": files,
        "entrypoint": entry,
        "args": req.args,
        "stdin": req.stdin.unwrap_or_default(),
        "limits": limits,
    }))
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    // from_str_radix alone would take a sign: "+f" as 0x0f.
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// `SIGKILL` for 9 and so on; Piston reports signal names.
fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        _ => return format!("SIG{sig}"),
    };
    name.into()
}

fn run_stage(r: &JobResult, output: String) -> Value {
    let killed = matches!(r.outcome, Outcome::Timeout | Outcome::Oom | Outcome::Killed);
    let signal = match (r.signal, killed) {
        (Some(s), _) => Some(signal_name(s)),
        (None, true) => Some("SIGKILL".to_owned()),
        (None, false) => None,
    };
    let status = match r.outcome {
        Outcome::Ok => None,
        Outcome::Timeout => Some("TO"),
        Outcome::Error if r.signal.is_some() => Some("SG"),
        Outcome::Error => Some("RE"),
        Outcome::Oom | Outcome::Killed => Some("SG"),
        Outcome::Rejected | Outcome::Internal => Some("XX"),
    };
    json!({
        "stdout": r.stdout,
        "stderr": r.stderr,
        "output": output,
        "code": if killed { None } else { r.exit_code },
        "signal": signal,
        "message": r.message,
        "status": status,
        "cpu_time": r.usage.cpu_user_ms + r.usage.cpu_system_ms,
        "wall_time": r.timings.run_ms.round() as u64,
        "memory": r.usage.memory_peak_bytes.unwrap_or(r.usage.max_rss_kb * 1024),
    })
}

pub async fn execute(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body = match read_body(req, app.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return Ok(message(e.status, e.message)),
    };
    let (rt, spec) = match parse_execute(&body, app.scheduler.runtimes()) {
        Ok(parsed) => parsed,
        Err(r) => return Ok(message(StatusCode::BAD_REQUEST, r.message)),
    };
    let handle = match app.scheduler.submit(
        spec,
        SubmitOptions {
            source: JobSource::Http,
            ..SubmitOptions::default()
        },
    ) {
        Ok(h) => h,
        Err(e) => {
            let busy = matches!(e, AdmitError::Busy { .. });
            let a = super::jobs::admit_error(e);
            let mut r = message(a.status, a.message);
            if busy {
                if let Some(s) = a.retry_after {
                    r.headers_mut().insert(
                        hyper::header::RETRY_AFTER,
                        hyper::header::HeaderValue::from(s),
                    );
                }
            }
            return Ok(r);
        }
    };
    let mut events = handle.events();
    let mut output = String::new();
    let mut result = None;
    while let Some(e) = events.next().await {
        match e {
            OutputEvent::Stdout(b) | OutputEvent::Stderr(b) => {
                output.push_str(&String::from_utf8_lossy(&b))
            }
            OutputEvent::Exit(r) => result = Some(*r),
        }
    }
    let r = match result {
        Some(r) => r,
        None => handle.result().await,
    };
    if r.outcome == Outcome::Internal {
        return Ok(message(
            StatusCode::INTERNAL_SERVER_ERROR,
            r.message.unwrap_or_else(|| "internal error".into()),
        ));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"language": rt.name, "version": rt.version, "run": run_stage(&r, output)}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_match_like_piston_clients_expect() {
        assert!(version_matches("*", "3"));
        assert!(version_matches("3", "3"));
        assert!(version_matches("3.11.2", "3"));
        assert!(!version_matches("2", "3"));
        assert!(!version_matches("31", "3"));
    }

    #[test]
    fn a_refused_body_names_the_request_field() {
        let table = RuntimeTable::default();
        let field = |body: &str| parse_execute(body.as_bytes(), &table).unwrap_err().field;
        assert_eq!(field("{"), "body");
        assert_eq!(field(r#"{"language":"cobol","files":[]}"#), "language");
        assert_eq!(
            field(r#"{"language":"python","version":"2","files":[]}"#),
            "version"
        );
        assert_eq!(field(r#"{"language":"python","files":[]}"#), "files");
        let bad_hex = r#"{"language":"python","files":[{"content":"zz","encoding":"hex"}]}"#;
        assert_eq!(field(bad_hex), "files[0].content");
        let timeout = r#"{"language":"python","files":[{"content":"1"}],"run_timeout":0}"#;
        assert_eq!(field(timeout), "run_timeout");
        let (rt, spec) = parse_execute(
            br#"{"language":"py","files":[{"content":"print(1)"}]}"#,
            &table,
        )
        .unwrap();
        assert_eq!(spec.runtime, rt.name);
        assert_eq!(spec.entrypoint.as_deref(), Some(rt.file.as_str()));
    }

    /// Found writing the piston_body fuzz target (and crashing it): bytes
    /// to MiB added 2^20 - 1 first, which overflowed for a limit near
    /// i64::MAX (a panic in a debug build, a negative limit in a release one).
    #[test]
    fn the_largest_memory_limit_is_refused_by_range_not_overflow() {
        let body = format!(
            r#"{{"language":"python","files":[{{"content":"1"}}],"run_memory_limit":{}}}"#,
            i64::MAX
        );
        let r = parse_execute(body.as_bytes(), &RuntimeTable::default()).unwrap_err();
        assert_eq!(r.field, "run_memory_limit");
        assert!(r.message.contains("8796093022208 is out of range"), "{r:?}");
    }

    #[test]
    fn hex_decodes() {
        assert_eq!(decode_hex("6869").unwrap(), b"hi");
        assert_eq!(decode_hex(" 6A6b ").unwrap(), b"jk");
        assert!(decode_hex("6").is_none());
    }

    /// Found by the piston_body fuzz target: u8::from_str_radix accepts a
    /// leading '+', so "+f" passed as the byte 0x0f.
    #[test]
    fn a_sign_is_not_a_hex_digit() {
        assert!(decode_hex("+f").is_none());
        assert!(decode_hex("8545358e742831+90a").is_none());
        assert!(decode_hex("-1").is_none());
    }
}

//! One cell in a context: the request line to the driver, the driver's
//! answer lines back into output, display data and a result, and the
//! limits (deadline, output cap) enforced on the host while it runs.

use std::time::{Duration, Instant};

use kiln_protocol::{ExitStatus, File, Frame, JobId, JobResult, Outcome, Timings, Usage};
use kiln_sandbox::{OutputCapture, Sandbox, Stream, KILL_GRACE};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::timeout_at;

use super::{Driver, INTERRUPT_GRACE};
use crate::sandboxes::Held;

/// Most bytes of display data (PNGs and the like) one cell may return;
/// past it further displays are dropped with a note.
const MAX_RESULT_BYTES: usize = 32 * 1024 * 1024;

/// Longest line the driver may send (a display of [`MAX_RESULT_BYTES`]
/// plus its JSON); past it the driver counts as broken and is killed.
const MAX_LINE_BYTES: usize = MAX_RESULT_BYTES + 1024 * 1024;

/// A cell to run, already validated by the API.
#[derive(Debug, Clone)]
pub struct CellRequest {
    pub code: String,
    /// Put under the work directory before the cell runs.
    pub files: Vec<File>,
    pub timeout_ms: u64,
    /// Cap on stdout and stderr each.
    pub output_bytes: u64,
}

/// Rich output of a cell: a MIME bundle (`text/plain` always; binary
/// types such as `image/png` base64-encoded).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DisplayData {
    /// `result` for the value of the cell's trailing expression, `display`
    /// for what the cell displayed (`display(x)`, open matplotlib figures).
    pub kind: String,
    pub data: serde_json::Map<String, Value>,
}

/// The exception a cell raised.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CellError {
    pub name: String,
    pub value: String,
    pub traceback: String,
}

/// A context exec's answer: an exec result plus what only a context has.
#[derive(Debug, Clone, Serialize)]
pub struct ContextExecResult {
    #[serde(flatten)]
    pub result: JobResult,
    pub context: String,
    /// Display data, in the order the cell produced it; the trailing
    /// expression's value (kind `result`) comes last.
    pub results: Vec<DisplayData>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<CellError>,
    /// Whether the context survived the exec (false: it died, see
    /// `message`; restart it to go on).
    pub context_alive: bool,
}

/// Receives a cell's output and display data as they happen (SSE).
pub trait CellSink: Send {
    fn output(&mut self, stream: Stream, data: &[u8]);
    fn display(&mut self, _data: &DisplayData) {}
}

impl CellSink for () {
    fn output(&mut self, _: Stream, _: &[u8]) {}
}

/// What [`run`] found.
pub(super) struct CellOutcome {
    pub result: ContextExecResult,
    /// Set when the driver is gone: why, in words for the next exec.
    pub died: Option<String>,
}

/// Takes one complete line (without its newline) off the front of `buf`.
pub(super) fn take_line(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let i = buf.iter().position(|&b| b == b'\n')?;
    let mut line: Vec<u8> = buf.drain(..=i).collect();
    line.pop();
    Some(line)
}

/// Why the host stopped a cell.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    Deadline,
    OutputCap,
}

/// Where the host is in stopping a cell.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Running,
    /// SIGINT sent; waiting for the driver's `done`.
    Interrupted,
    /// SIGKILL sent; waiting for the exit report.
    Killed,
}

#[derive(Deserialize)]
struct Done {
    status: String,
    result: Option<serde_json::Map<String, Value>>,
    error: Option<CellError>,
}

/// Runs one cell on `driver`; every failure is a result, and `died` says
/// whether the driver is gone afterwards.
pub(super) async fn run(
    held: &Held,
    driver: &mut Driver,
    req: &CellRequest,
    n: u64,
    started: &std::sync::atomic::AtomicBool,
    sink: &mut dyn CellSink,
) -> CellOutcome {
    let start = Instant::now();
    let oom_before = held.oom_kills();
    let handle = driver.handle();
    let mut line = serde_json::to_vec(&json!({"code": req.code, "n": n})).unwrap_or_default();
    line.push(b'\n');
    let mut out = OutputCapture::new(req.output_bytes);
    let mut err = OutputCapture::new(req.output_bytes);
    let mut results = Vec::new();
    let mut result_bytes = 0usize;
    let mut dropped_results = 0usize;
    let mut done: Option<Done> = None;
    let mut exit: Option<ExitStatus> = None;
    let mut lost: Option<String> = None;
    let mut stop: Option<Stop> = None;
    let mut phase = Phase::Running;
    let mut wait_until = start + Duration::from_millis(req.timeout_ms);

    if let Err(e) = handle.stdin(&line).await {
        lost = Some(format!("sending the cell to the interpreter failed: {e}"));
    }
    while lost.is_none() {
        let frame = match timeout_at(wait_until.into(), driver.next()).await {
            Ok(f) => f,
            Err(_) => {
                match phase {
                    Phase::Running => {
                        stop.get_or_insert(Stop::Deadline);
                        let _ = handle.kill(libc::SIGINT).await;
                        phase = Phase::Interrupted;
                        wait_until = Instant::now() + INTERRUPT_GRACE;
                    }
                    Phase::Interrupted => {
                        let _ = handle.kill(libc::SIGKILL).await;
                        phase = Phase::Killed;
                        wait_until = Instant::now() + KILL_GRACE;
                    }
                    Phase::Killed => {
                        lost = Some("the interpreter did not end after SIGKILL".into());
                    }
                }
                continue;
            }
        };
        match frame {
            Some(Frame::Stdout { data, .. }) => {
                driver.pending.extend_from_slice(&data);
                while let Some(l) = take_line(&mut driver.pending) {
                    // A line that is not the driver's is output a child
                    // process wrote to the driver's stdout itself.
                    let msg = match serde_json::from_slice::<Value>(&l) {
                        Ok(m @ Value::Object(_)) => m,
                        _ => {
                            let mut text = String::from_utf8_lossy(&l).into_owned();
                            text.push('\n');
                            json!({"stream": "stdout", "data": text})
                        }
                    };
                    if let Some(s) = msg.get("stream") {
                        let text = msg["data"].as_str().unwrap_or("").as_bytes();
                        let (cap, which) = if s == "stderr" {
                            (&mut err, Stream::Stderr)
                        } else {
                            (&mut out, Stream::Stdout)
                        };
                        let kept = cap.push(text);
                        if !kept.is_empty() {
                            sink.output(which, kept);
                        }
                        if cap.truncated && phase == Phase::Running {
                            stop.get_or_insert(Stop::OutputCap);
                            let _ = handle.kill(libc::SIGINT).await;
                            phase = Phase::Interrupted;
                            wait_until = Instant::now() + INTERRUPT_GRACE;
                        }
                    } else if let Some(Value::Object(d)) = msg.get("display") {
                        if result_bytes + l.len() <= MAX_RESULT_BYTES {
                            result_bytes += l.len();
                            let d = DisplayData {
                                kind: "display".into(),
                                data: d.clone(),
                            };
                            sink.display(&d);
                            results.push(d);
                        } else {
                            dropped_results += 1;
                        }
                    } else if msg.get("started").is_some() {
                        started.store(true, std::sync::atomic::Ordering::SeqCst);
                    } else if let Some(d) = msg.get("done") {
                        match serde_json::from_value::<Done>(d.clone()) {
                            Ok(d) => done = Some(d),
                            Err(e) => lost = Some(format!("malformed done record: {e}")),
                        }
                    }
                }
                if done.is_some() {
                    break;
                }
                if driver.pending.len() > MAX_LINE_BYTES {
                    lost = Some(format!(
                        "the interpreter's driver sent a line longer than {MAX_LINE_BYTES} bytes"
                    ));
                }
            }
            Some(Frame::Stderr { data, .. }) => {
                // The driver's own stderr (before it took fd 2 over, or
                // a crash of the driver itself).
                let kept = err.push(&data);
                if !kept.is_empty() {
                    sink.output(Stream::Stderr, kept);
                }
            }
            Some(Frame::Started(_)) => {}
            Some(Frame::Exit(x)) => {
                exit = Some(x.status);
                break;
            }
            Some(Frame::Error(e)) => lost = Some(e.message),
            Some(f) => lost = Some(format!("unexpected {} frame", f.name())),
            None => {
                lost = Some(format!(
                    "the sandbox's agent went away: {}",
                    driver.closed_reason()
                ))
            }
        }
    }
    if lost.is_some() {
        let _ = handle.kill(libc::SIGKILL).await;
    }
    let oom = held.oom_kills() > oom_before;
    let mut result = JobResult {
        id: JobId::random(),
        outcome: Outcome::Internal,
        exit_code: None,
        signal: None,
        stdout: String::from_utf8_lossy(&out.buf).into_owned(),
        stderr: String::from_utf8_lossy(&err.buf).into_owned(),
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        message: None,
        timings: Timings::default(),
        usage: Usage {
            memory_peak_bytes: held.memory_peak_bytes(),
            ..Usage::default()
        },
        // Set by the caller, which knows the workspace's image.
        image: None,
    };
    let mut error = None;
    let mut value = None;
    let mut died = None;
    let timeout_ms = req.timeout_ms;
    let cap = req.output_bytes;
    match (done, exit, lost) {
        (Some(d), _, _) => {
            error = d.error;
            value = d.result;
            let (outcome, code, message) = match (d.status.as_str(), stop) {
                (_, _) if oom => (
                    Outcome::Oom,
                    Some(1),
                    Some("a process of the cell ran out of memory and was killed; the context is alive".to_owned()),
                ),
                (_, Some(Stop::Deadline)) => (
                    Outcome::Timeout,
                    None,
                    Some(format!("interrupted at the time limit of {timeout_ms} ms; the context keeps its state")),
                ),
                (_, Some(Stop::OutputCap)) => (
                    Outcome::Killed,
                    None,
                    Some(format!("interrupted: the output passed the cap of {cap} bytes; the context keeps its state")),
                ),
                ("ok", None) => (Outcome::Ok, Some(0), None),
                ("interrupted", None) => (
                    Outcome::Killed,
                    None,
                    Some("interrupted (KeyboardInterrupt); the context keeps its state".to_owned()),
                ),
                _ => (Outcome::Error, Some(1), None),
            };
            result.outcome = outcome;
            result.exit_code = code;
            if stop.is_some() || d.status == "interrupted" {
                result.signal = Some(libc::SIGINT);
            }
            result.message = message;
        }
        (None, Some(status), _) => {
            match status {
                ExitStatus::Code(c) => result.exit_code = Some(c),
                ExitStatus::Signal(s) => result.signal = Some(s),
            }
            let (outcome, why) = if oom {
                (
                    Outcome::Oom,
                    "its interpreter ran out of memory and was killed".to_owned(),
                )
            } else if phase == Phase::Killed && stop == Some(Stop::Deadline) {
                (
                    Outcome::Timeout,
                    format!("its interpreter ignored the interrupt at the time limit of {timeout_ms} ms and was killed"),
                )
            } else if phase == Phase::Killed {
                (
                    Outcome::Killed,
                    "its interpreter ignored the interrupt at the output cap and was killed"
                        .to_owned(),
                )
            } else {
                (
                    Outcome::Error,
                    format!("its interpreter ended ({})", super::describe_exit(status)),
                )
            };
            result.outcome = outcome;
            result.message = Some(format!(
                "the context died: {why}; its state is lost, restart it to go on"
            ));
            died = Some(why);
        }
        (None, None, lost) => {
            let why = lost.unwrap_or_else(|| "the interpreter stopped answering".into());
            result.message = Some(format!("the context died: {why}"));
            died = Some(why);
        }
    }
    if dropped_results > 0 {
        let note = format!(
            "{dropped_results} display result(s) dropped: more than {MAX_RESULT_BYTES} bytes of display data"
        );
        result.message = Some(match result.message.take() {
            Some(m) => format!("{m}; {note}"),
            None => note,
        });
    }
    if let Some(v) = value {
        results.push(DisplayData {
            kind: "result".into(),
            data: v,
        });
    }
    CellOutcome {
        result: ContextExecResult {
            result,
            context: String::new(),
            results,
            error,
            context_alive: died.is_none(),
        },
        died,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_off_whole_and_partial_lines_wait() {
        let mut b = b"{\"a\":1}\n{\"b\"".to_vec();
        assert_eq!(take_line(&mut b).unwrap(), b"{\"a\":1}");
        assert!(take_line(&mut b).is_none());
        b.extend_from_slice(b":2}\n");
        assert_eq!(take_line(&mut b).unwrap(), b"{\"b\":2}");
        assert!(b.is_empty());
    }

    #[test]
    fn a_capture_keeps_what_fits_and_says_it_cut() {
        let mut c = OutputCapture::new(4);
        assert_eq!(c.push(b"abc"), b"abc");
        assert_eq!(c.push(b"def"), b"d");
        assert!(c.truncated);
        assert_eq!(c.buf, b"abcd");
    }
}

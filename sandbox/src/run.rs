//! Running one job in a ready sandbox, the same way for every backend: put
//! its files, exec it, feed stdin, collect output up to the cap, enforce the
//! deadline on the host (the agent is asked to kill, but never trusted to),
//! and classify the ending into an [`Outcome`].

use std::time::{Duration, Instant};

use kiln_protocol::{
    ExecRequest, ExitReport, ExitStatus, Frame, JobId, JobResult, JobSpec, Outcome, PutFile,
    Runtime, Timings, Usage,
};
use tokio::time::timeout_at;

use crate::Sandbox;

/// Time the agent gets to report an exec's end after the host killed it at
/// its deadline; past it the sandbox counts as unresponsive.
pub const KILL_GRACE: Duration = Duration::from_millis(1000);

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Receives output as it happens (SSE streams, `--follow`).
pub trait OutputSink: Send {
    fn output(&mut self, stream: Stream, data: &[u8]);
}

impl OutputSink for () {
    fn output(&mut self, _: Stream, _: &[u8]) {}
}

impl<F: FnMut(Stream, &[u8]) + Send> OutputSink for F {
    fn output(&mut self, stream: Stream, data: &[u8]) {
        self(stream, data)
    }
}

/// The result of running a job, and whether the sandbox is still usable.
#[derive(Debug)]
#[must_use]
pub struct RunOutcome {
    /// Timings other than `run_ms` are left for the scheduler to fill.
    pub result: JobResult,
    /// Whether a pre-warmed interpreter ran the job.
    pub warm: bool,
    /// The sandbox must be destroyed (agent unresponsive or gone).
    pub poisoned: bool,
}

/// A job's (or a code cell's) stdout or stderr as kept by the host: at
/// most `cap` bytes, the rest dropped and `truncated` set.
#[derive(Debug)]
pub struct OutputCapture {
    pub buf: Vec<u8>,
    cap: usize,
    pub truncated: bool,
}

impl OutputCapture {
    pub fn new(cap: u64) -> Self {
        Self {
            buf: Vec::new(),
            cap: usize::try_from(cap).unwrap_or(usize::MAX),
            truncated: false,
        }
    }

    /// Keeps what fits; returns the part kept (for streaming).
    pub fn push<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        let room = self.cap.saturating_sub(self.buf.len());
        if data.len() > room {
            self.truncated = true;
        }
        let kept = &data[..data.len().min(room)];
        self.buf.extend_from_slice(kept);
        kept
    }
}

/// Runs `spec` with `runtime` in `sandbox`; never fails: every failure is a
/// [`JobResult`] with outcome `internal` (and `poisoned` set when the
/// sandbox cannot be trusted any more).
pub async fn run_job<S: Sandbox>(
    sandbox: &S,
    id: JobId,
    runtime: &Runtime,
    spec: &JobSpec,
    warm_next: bool,
    sink: &mut dyn OutputSink,
) -> RunOutcome {
    let start = Instant::now();
    let deadline = start + Duration::from_millis(spec.limits.timeout_ms);
    let agent = sandbox.agent();
    let oom_before = sandbox.oom_kills_seen();
    let internal = |msg: String, poisoned: bool| RunOutcome {
        result: JobResult::internal(id.clone(), msg),
        warm: false,
        poisoned,
    };

    let claim = agent.claim_inline();
    let (files, entry) = spec.materialize(&claim.file_name(&runtime.file));
    let files: Vec<PutFile> = files
        .into_iter()
        .map(|f| PutFile {
            tag: 0,
            mode: if f.executable { 0o755 } else { 0o644 },
            path: f.path,
            data: f.content,
        })
        .collect();
    let paths: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
    let req = ExecRequest {
        tag: 0,
        runtime: runtime.name.clone(),
        entrypoint: entry,
        args: spec.args.clone(),
        env: spec.env.clone(),
        output_limit: spec.limits.output_bytes,
        warm_next,
    };
    let time_out = |what: &str| {
        let mut r = internal(String::new(), true);
        r.result.outcome = Outcome::Timeout;
        r.result.message = Some(format!(
            "the time limit of {} ms passed while {what}",
            spec.limits.timeout_ms
        ));
        r
    };
    // Files, exec and stdin go out in one write; the files' acks arrive
    // before the exec's first frame because the agent works in order.
    let (acks, mut exec) =
        match timeout_at(deadline.into(), agent.start_job(files, req, &spec.stdin)).await {
            Ok(Ok(started)) => started,
            Ok(Err(e)) => return internal(format!("starting the job: {e}"), true),
            Err(_) => return time_out("sending the job to the sandbox"),
        };
    for (ack, path) in acks.into_iter().zip(paths) {
        let failed = match timeout_at(deadline.into(), ack.ack()).await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => format!("placing {path}: {e}"),
            Err(_) => return time_out("placing the job's files"),
        };
        // The exec started without its file: stop it before reporting.
        let _ = exec.kill(libc::SIGKILL).await;
        let _ = timeout_at(deadline.into(), async {
            while !matches!(
                exec.next().await,
                None | Some(Frame::Exit(_) | Frame::Error(_))
            ) {}
        })
        .await;
        return internal(failed, !agent.is_connected());
    }

    let mut out = OutputCapture::new(spec.limits.output_bytes);
    let mut err = OutputCapture::new(spec.limits.output_bytes);
    let mut warm = false;
    let mut timed_out = false;
    let mut poisoned = false;
    let mut agent_error = None;
    let mut report: Option<ExitReport> = None;
    let mut wait_until = deadline;
    loop {
        let frame = match timeout_at(wait_until.into(), exec.next()).await {
            Ok(f) => f,
            Err(_) if !timed_out => {
                timed_out = true;
                // The host's deadline: ask the agent to kill the whole group
                // and give it a short grace to report; the caller destroys
                // the sandbox if it does not.
                let _ = exec.kill(libc::SIGKILL).await;
                wait_until = Instant::now() + KILL_GRACE;
                continue;
            }
            Err(_) => {
                poisoned = true;
                break;
            }
        };
        match frame {
            Some(Frame::Started(s)) => warm = s.warm,
            Some(Frame::Stdout { data, .. }) => {
                let kept = out.push(&data);
                if !kept.is_empty() {
                    sink.output(Stream::Stdout, kept);
                }
            }
            Some(Frame::Stderr { data, .. }) => {
                let kept = err.push(&data);
                if !kept.is_empty() {
                    sink.output(Stream::Stderr, kept);
                }
            }
            Some(Frame::Exit(x)) => {
                report = Some(x);
                break;
            }
            Some(Frame::Error(e)) => {
                agent_error = Some(e.message);
                break;
            }
            Some(other) => {
                agent_error = Some(format!("unexpected {} frame during exec", other.name()));
                poisoned = true;
                break;
            }
            None => {
                agent_error = Some(format!(
                    "the sandbox's agent went away during the job (killed, or its sandbox died): {}",
                    exec.closed_reason()
                ));
                poisoned = true;
                break;
            }
        }
    }
    let run = start.elapsed();
    let oom = sandbox.oom_kills() > oom_before;
    let peak = sandbox.memory_peak_bytes();

    let mut result = JobResult {
        id,
        outcome: Outcome::Internal,
        exit_code: None,
        signal: None,
        stdout: String::from_utf8_lossy(&out.buf).into_owned(),
        stderr: String::from_utf8_lossy(&err.buf).into_owned(),
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        message: None,
        timings: Timings {
            run_ms: run.as_secs_f64() * 1000.0,
            ..Timings::default()
        },
        usage: Usage {
            memory_peak_bytes: peak,
            ..Usage::default()
        },
        image: None,
    };
    if let Some(x) = &report {
        match x.status {
            ExitStatus::Code(c) => result.exit_code = Some(c),
            ExitStatus::Signal(s) => result.signal = Some(s),
        }
        result.stdout_truncated |= x.stdout_truncated;
        result.stderr_truncated |= x.stderr_truncated;
        result.usage.cpu_user_ms = x.cpu_user_us / 1000;
        result.usage.cpu_system_ms = x.cpu_system_us / 1000;
        result.usage.max_rss_kb = x.max_rss_kb;
    }
    let (outcome, message) = classify(timed_out, oom, report.as_ref(), agent_error, spec);
    result.outcome = outcome;
    result.message = message;
    RunOutcome {
        result,
        warm,
        poisoned: poisoned || (timed_out && report.is_none()),
    }
}

/// Decides the outcome. Order matters: the host's own observations (deadline,
/// the cgroup's OOM counter) outrank what the agent reports.
fn classify(
    timed_out: bool,
    oom: bool,
    report: Option<&ExitReport>,
    agent_error: Option<String>,
    spec: &JobSpec,
) -> (Outcome, Option<String>) {
    if timed_out {
        return (
            Outcome::Timeout,
            Some(format!(
                "killed at the time limit of {} ms",
                spec.limits.timeout_ms
            )),
        );
    }
    if oom {
        return (
            Outcome::Oom,
            Some(format!(
                "out of memory: the sandbox's limit is {} MiB",
                spec.limits.memory_mb
            )),
        );
    }
    let Some(x) = report else {
        return (
            Outcome::Internal,
            Some(agent_error.unwrap_or_else(|| "the job ended without an exit report".into())),
        );
    };
    match x.reason.as_deref() {
        Some("output_limit") => {
            return (
                Outcome::Killed,
                Some(format!(
                    "output exceeded the limit of {} bytes per stream",
                    spec.limits.output_bytes
                )),
            )
        }
        Some("killed") => return (Outcome::Killed, Some("cancelled".into())),
        _ => {}
    }
    match x.status {
        ExitStatus::Code(0) => (Outcome::Ok, None),
        ExitStatus::Code(_) => (Outcome::Error, None),
        ExitStatus::Signal(s) => (Outcome::Error, Some(format!("terminated by signal {s}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_the_cap_and_flags_the_rest() {
        let mut c = OutputCapture::new(5);
        assert_eq!(c.push(b"abc"), b"abc");
        assert_eq!(c.push(b"defg"), b"de");
        assert!(c.truncated);
        assert_eq!(c.buf, b"abcde");
        assert_eq!(c.push(b"x"), b"");
    }

    fn report(status: ExitStatus, reason: Option<&str>) -> ExitReport {
        ExitReport {
            tag: 1,
            status,
            reason: reason.map(str::to_owned),
            stdout_bytes: 0,
            stderr_bytes: 0,
            stdout_truncated: false,
            stderr_truncated: false,
            cpu_user_us: 0,
            cpu_system_us: 0,
            max_rss_kb: 0,
            wall_us: 0,
        }
    }

    #[test]
    fn host_observations_outrank_the_agent() {
        let spec = JobSpec::inline("python", "");
        let ok = report(ExitStatus::Code(0), None);
        assert_eq!(
            classify(true, true, Some(&ok), None, &spec).0,
            Outcome::Timeout
        );
        let killed = report(ExitStatus::Signal(9), None);
        assert_eq!(
            classify(false, true, Some(&killed), None, &spec).0,
            Outcome::Oom
        );
        assert_eq!(
            classify(false, false, Some(&ok), None, &spec).0,
            Outcome::Ok
        );
        let code = report(ExitStatus::Code(3), None);
        assert_eq!(
            classify(false, false, Some(&code), None, &spec).0,
            Outcome::Error
        );
        let flood = report(ExitStatus::Signal(9), Some("output_limit"));
        assert_eq!(
            classify(false, false, Some(&flood), None, &spec).0,
            Outcome::Killed
        );
        assert_eq!(
            classify(false, false, None, Some("x".into()), &spec).0,
            Outcome::Internal
        );
    }
}

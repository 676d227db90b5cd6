//! `kiln run`: one job, locally, in a fresh sandbox that is destroyed
//! afterwards. Output streams to the terminal as it happens (or comes back
//! as one `JobResult` with `--json`), and kiln's exit status mirrors the
//! job's, so that `kiln run` can stand in for the interpreter in scripts.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use kiln_protocol::{limits, Acquire, JobId, JobResult, JobSpec, Outcome};
use kiln_sandbox::{run_job, Backend, Sandbox, SandboxSpec, Stream};

use super::job::{job_bytes, read_bounded, JobArgs};
use kiln_sandbox::BackendFlags;

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  kiln run --runtime python -c 'print(1)'
  kiln run script.py -- arg1 arg2
  echo 'console.log(2)' | kiln run --runtime node
  kiln run --job job.json --json
  kiln run --job job.json --timeout 1s --runtime python3   # flags override the file

Limits: sizes and durations need their unit; a bare number is refused.
Sizes are binary, any case: 100B, 512K, 64M, 1G (64MB = 64MiB = 64M).
Durations: 500ms, 1.5s, 2m, 1h. --pids is a whole number, --cpus a
number of CPUs (0.5). Out of range values are refused with the range.

With --job, the other job flags override the document's fields (--runtime,
ARGS and limits replace, --env and --file add); the job's stdin is the
document's `stdin`, kiln's own stdin is not read.

Exit status: the job's own (128+N if killed by signal N); 124 on timeout,
137 when out of memory or killed at the output cap, 2 when the job was
rejected (a wrong flag included), 70 when Kiln itself failed.")]
pub struct RunArgs {
    #[command(flatten)]
    pub job_args: JobArgs,
    /// Do not pass kiln's stdin to the job.
    #[arg(long)]
    no_stdin: bool,
    /// Print the JobResult as JSON instead of streaming the output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    backend: BackendFlags,
}

/// Exit status for a result (see the command's help).
pub fn exit_status(r: &JobResult) -> u8 {
    match r.outcome {
        Outcome::Ok => 0,
        Outcome::Error => match (r.exit_code, r.signal) {
            (Some(c), _) => (c & 0xff) as u8,
            (None, Some(s)) => (128 + s).min(255) as u8,
            (None, None) => 1,
        },
        Outcome::Timeout => 124,
        Outcome::Oom | Outcome::Killed => 137,
        Outcome::Rejected => 2,
        Outcome::Internal => 70,
    }
}

/// Parses the job from the flags, or from `--job` with the flags laid over
/// it; `Err` carries the message of a ready `rejected` result.
fn parse_job(a: &RunArgs, table: &kiln_protocol::RuntimeTable) -> Result<(JobSpec, bool), String> {
    let (bytes, used_stdin) = job_bytes(&a.job_args, table).map_err(|e| format!("{e:#}"))?;
    let spec = JobSpec::from_json(&bytes).map_err(|e| e.to_string())?;
    Ok((spec, used_stdin))
}

pub async fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let settings = a.backend.settings();
    let table = settings.runtime_table()?;
    let reject = |msg: String| {
        let r = JobResult::rejected(JobId::random(), msg);
        report(&r, a.json);
        Ok(ExitCode::from(exit_status(&r)))
    };
    let (mut spec, used_stdin) = match parse_job(&a, &table) {
        Ok(x) => x,
        Err(msg) => return reject(msg),
    };
    let runtime = match table.resolve(&spec.runtime) {
        Ok(r) => r.clone(),
        Err(e) => return reject(format!("runtime: {e}")),
    };
    if a.job_args.job.is_none() && !used_stdin && !a.no_stdin && !std::io::stdin().is_terminal() {
        match read_bounded(std::io::stdin(), limits::MAX_STDIN_BYTES, "stdin") {
            Ok(b) => spec.stdin = b,
            Err(e) => return reject(format!("stdin: {e:#}")),
        }
    }
    let id = spec.id.clone().unwrap_or_else(JobId::random);
    let mut sandbox_spec = SandboxSpec::for_job(&spec.limits, &runtime.name);
    let images = crate::images::Images::new(&settings.images, &table);
    if spec.image.is_none() {
        spec.image = images.default_for(&runtime.name);
    }
    if let Some(reference) = spec.image.clone() {
        match images.ready(&reference, &runtime).await {
            Ok(ready) => {
                crate::images::merge_env(&mut spec.env, &ready.env);
                sandbox_spec.image = Some(ready.root);
            }
            Err(e) if e.is_callers() => return reject(e.to_string()),
            Err(e) => return Err(e.into()),
        }
    }
    let backend = settings.open(table)?;
    if backend.capabilities().templates {
        // The first run of a runtime and size builds its template (seconds);
        // later ones find it at once and restore from it. A failed build
        // costs the job only a boot.
        let progress = |line: &str| eprintln!("kiln: template: {line}");
        if let Err(e) = backend.prepare_template(&sandbox_spec, &progress).await {
            eprintln!("kiln: no template ({e}); booting the sandbox instead");
        }
    }
    let acquire_start = Instant::now();
    let sandbox = match backend.create(&sandbox_spec).await {
        Ok(s) => s,
        Err(e) => {
            let r = JobResult::internal(id, format!("creating the sandbox: {e}"));
            report(&r, a.json);
            return Ok(ExitCode::from(exit_status(&r)));
        }
    };
    let acquire_ms = acquire_start.elapsed().as_secs_f64() * 1000.0;
    tracing::debug!(sandbox = %sandbox.id(), acquire_ms, "sandbox ready");
    let json = a.json;
    let mut sink = move |s: Stream, d: &[u8]| {
        if json {
            return;
        }
        // A closed terminal must not kill the job; its output is still
        // counted, only not shown.
        let _ = match s {
            Stream::Stdout => std::io::stdout().lock().write_all(d),
            Stream::Stderr => std::io::stderr().lock().write_all(d),
        };
    };
    let outcome = run_job(&sandbox, id, &runtime, &spec, false, &mut sink).await;
    sandbox.destroy().await;
    let mut r = outcome.result;
    r.image = sandbox_spec.image.map(|i| i.digest);
    r.timings.acquire_ms = acquire_ms;
    r.timings.acquire = Some(Acquire::Cold);
    r.timings.total_ms = start.elapsed().as_secs_f64() * 1000.0;
    report(&r, a.json);
    Ok(ExitCode::from(exit_status(&r)))
}

/// Prints the result: the JSON document, or a one-line reason on stderr
/// for outcomes that are not the program's own doing.
fn report(r: &JobResult, json: bool) {
    if json {
        let mut out = std::io::stdout().lock();
        let _ = serde_json::to_writer_pretty(&mut out, r);
        let _ = writeln!(out);
        return;
    }
    let _ = std::io::stdout().flush();
    if let Some(m) = &r.message {
        if r.outcome != Outcome::Ok {
            eprintln!("kiln: {}: {m}", r.outcome);
        }
    }
    if r.stdout_truncated || r.stderr_truncated {
        eprintln!("kiln: output truncated at the limit");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_mirrors_the_job() {
        let mut r = JobResult::rejected(JobId::random(), "x");
        assert_eq!(exit_status(&r), 2);
        r.outcome = Outcome::Error;
        r.exit_code = Some(3);
        assert_eq!(exit_status(&r), 3);
        r.exit_code = None;
        r.signal = Some(9);
        assert_eq!(exit_status(&r), 137);
        r.outcome = Outcome::Timeout;
        assert_eq!(exit_status(&r), 124);
    }
}

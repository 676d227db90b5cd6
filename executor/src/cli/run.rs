//! `kiln run`: one job, locally, in a fresh sandbox that is destroyed
//! afterwards. Output streams to the terminal as it happens (or comes back
//! as one `JobResult` with `--json`), and kiln's exit status mirrors the
//! job's, so that `kiln run` can stand in for the interpreter in scripts.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use base64::Engine as _;
use clap::Args;
use kiln_protocol::{limits, Acquire, JobId, JobResult, JobSpec, Outcome};
use kiln_sandbox::{run_job, Backend, Sandbox, SandboxSpec, Stream};
use serde_json::{json, Map, Value};

use crate::backend::{self, BackendArgs, BackendKind, QemuArgs};
use crate::units::{parse_duration_ms, parse_size_bytes};

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  kiln run --runtime python -c 'print(1)'
  kiln run script.py -- arg1 arg2
  echo 'console.log(2)' | kiln run --runtime node
  kiln run --job job.json --json

Exit status: the job's own (128+N if killed by signal N); 124 on timeout,
137 when out of memory or killed at the output cap, 2 when the job was
rejected, 70 when Kiln itself failed.")]
pub struct RunArgs {
    /// File to run; its extension picks the runtime unless --runtime is given.
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
    /// Arguments passed to the program (after `--`).
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
    /// Runtime name or alias (python, node, bash, ...).
    #[arg(short, long)]
    runtime: Option<String>,
    /// Code to run instead of a file.
    #[arg(short = 'c', long, value_name = "CODE", conflicts_with = "file")]
    code: Option<String>,
    /// A whole job as JSON (the API's JobSpec); `-` reads it from stdin.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["file", "code"])]
    job: Option<PathBuf>,
    /// Extra file for the job's work directory, as PATH or NAME=PATH.
    #[arg(long = "file", value_name = "[NAME=]PATH")]
    files: Vec<String>,
    /// Environment variable for the job.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Wall-clock limit, e.g. 500ms, 10s, 2m.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Memory limit of the sandbox, e.g. 64M, 1G.
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Most processes and threads at once.
    #[arg(long)]
    pids: Option<u64>,
    /// CPU quota in CPUs, e.g. 0.5.
    #[arg(long)]
    cpus: Option<f64>,
    /// Size of the writable work directory, e.g. 64M.
    #[arg(long, value_name = "SIZE")]
    disk: Option<String>,
    /// Cap on stdout and on stderr, each, e.g. 1M.
    #[arg(long, value_name = "SIZE")]
    output_limit: Option<String>,
    /// Do not pass kiln's stdin to the job.
    #[arg(long)]
    no_stdin: bool,
    /// Print the JobResult as JSON instead of streaming the output.
    #[arg(long)]
    json: bool,
    /// Sandbox backend: jail, or qemu (a microVM).
    #[arg(
        long = "backend",
        env = "KILN_BACKEND",
        value_enum,
        default_value = "jail"
    )]
    kind: BackendKind,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    qemu: QemuArgs,
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

/// Reads at most `max` bytes; more is an error naming `what`.
fn read_bounded(mut r: impl Read, max: usize, what: &str) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.by_ref()
        .take(max as u64 + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {what}"))?;
    if buf.len() > max {
        anyhow::bail!("{what} is larger than the limit of {max} bytes");
    }
    Ok(buf)
}

/// Turns flags into the API's JSON form, so that validation (and its error
/// messages) is exactly the API's.
fn spec_json(a: &RunArgs, table: &kiln_protocol::RuntimeTable) -> anyhow::Result<(Value, bool)> {
    let mut used_stdin = false;
    let mut o = Map::new();
    let mut runtime = a.runtime.clone();
    if let Some(code) = &a.code {
        o.insert("code".into(), json!(code));
    } else if let Some(path) = &a.file {
        let bytes = read_bounded(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
            limits::MAX_JOB_CODE_BYTES,
            &path.display().to_string(),
        )?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "main".into());
        if runtime.is_none() {
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default();
            runtime = Some(
                table
                    .by_extension(&ext)
                    .map(|r| r.name.clone())
                    .with_context(|| {
                        format!(
                            "cannot tell the runtime of {} from its extension {ext:?}; pass --runtime (one of {})",
                            path.display(),
                            table.names().join(", ")
                        )
                    })?,
            );
        }
        o.insert("code".into(), json!(String::from_utf8_lossy(&bytes)));
        o.insert("entrypoint".into(), json!(name));
    } else {
        if std::io::stdin().is_terminal() {
            anyhow::bail!("no code given: pass FILE, -c CODE, --job FILE, or pipe code on stdin");
        }
        let bytes = read_bounded(
            std::io::stdin(),
            limits::MAX_JOB_CODE_BYTES,
            "code on stdin",
        )?;
        o.insert("code".into(), json!(String::from_utf8_lossy(&bytes)));
        used_stdin = true;
    }
    let runtime = runtime.context("--runtime is required with -c or code on stdin")?;
    o.insert("runtime".into(), json!(runtime));
    if !a.args.is_empty() {
        o.insert("args".into(), json!(a.args));
    }
    let mut files = Vec::new();
    for f in &a.files {
        let (name, path) = match f.split_once('=') {
            Some((n, p)) => (n.to_owned(), PathBuf::from(p)),
            None => {
                let p = PathBuf::from(f);
                let n = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .with_context(|| format!("--file {f}: no file name"))?;
                (n, p)
            }
        };
        let bytes = read_bounded(
            std::fs::File::open(&path)
                .with_context(|| format!("--file: opening {}", path.display()))?,
            limits::MAX_FILE_BYTES,
            &path.display().to_string(),
        )?;
        files.push(json!({"path": name, "content": base64::engine::general_purpose::STANDARD.encode(&bytes), "encoding": "base64"}));
    }
    if !files.is_empty() {
        o.insert("files".into(), Value::Array(files));
    }
    let mut env = Map::new();
    for kv in &a.env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env {kv:?}: expected KEY=VALUE"))?;
        env.insert(k.into(), json!(v));
    }
    if !env.is_empty() {
        o.insert("env".into(), Value::Object(env));
    }
    let mut l = Map::new();
    let flag = |name: &str, e: String| anyhow::anyhow!("--{name}: {e}");
    if let Some(t) = &a.timeout {
        l.insert(
            "timeout_ms".into(),
            json!(parse_duration_ms(t).map_err(|e| flag("timeout", e))?),
        );
    }
    if let Some(m) = &a.memory {
        l.insert(
            "memory_mb".into(),
            json!(parse_size_bytes(m).map_err(|e| flag("memory", e))? >> 20),
        );
    }
    if let Some(d) = &a.disk {
        l.insert(
            "disk_mb".into(),
            json!(parse_size_bytes(d).map_err(|e| flag("disk", e))? >> 20),
        );
    }
    if let Some(o) = &a.output_limit {
        l.insert(
            "output_bytes".into(),
            json!(parse_size_bytes(o).map_err(|e| flag("output-limit", e))?),
        );
    }
    if let Some(p) = a.pids {
        l.insert("pids".into(), json!(p));
    }
    if let Some(c) = a.cpus {
        l.insert("cpus".into(), json!(c));
    }
    if !l.is_empty() {
        o.insert("limits".into(), Value::Object(l));
    }
    Ok((Value::Object(o), used_stdin))
}

/// Parses the job from the flags; `Err` carries a ready `rejected` result.
fn parse_job(a: &RunArgs, table: &kiln_protocol::RuntimeTable) -> Result<(JobSpec, bool), String> {
    let (spec, used_stdin) = match &a.job {
        Some(p) => {
            let bytes = if p.as_os_str() == "-" {
                read_bounded(std::io::stdin(), 16 << 20, "the job on stdin")
            } else {
                std::fs::File::open(p)
                    .with_context(|| format!("opening {}", p.display()))
                    .and_then(|f| read_bounded(f, 16 << 20, &p.display().to_string()))
            }
            .map_err(|e| format!("{e:#}"))?;
            let spec = JobSpec::from_json(&bytes).map_err(|e| e.to_string())?;
            (spec, p.as_os_str() == "-")
        }
        None => {
            let (v, used) = spec_json(a, table).map_err(|e| format!("{e:#}"))?;
            let spec = JobSpec::from_json(v.to_string().as_bytes()).map_err(|e| e.to_string())?;
            (spec, used)
        }
    };
    Ok((spec, used_stdin))
}

pub async fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let table = backend::runtime_table(&a.backend)?;
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
    if a.job.is_none() && !used_stdin && !a.no_stdin && !std::io::stdin().is_terminal() {
        match read_bounded(std::io::stdin(), limits::MAX_STDIN_BYTES, "stdin") {
            Ok(b) => spec.stdin = b,
            Err(e) => return reject(format!("stdin: {e:#}")),
        }
    }
    let id = spec.id.clone().unwrap_or_else(JobId::random);
    let backend = backend::any(a.kind, &a.backend, &a.qemu, table)?;
    let acquire_start = Instant::now();
    let sandbox = match backend
        .create(&SandboxSpec::for_job(&spec.limits, &runtime.name))
        .await
    {
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

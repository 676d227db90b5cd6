//! The job a command line describes, shared by `kiln run` and `kiln
//! submit`: the flags (a file, `-c`, code on stdin, or a whole `--job`
//! document; extra files, env, limits) and their translation into the API's
//! JSON, so that both commands accept the same job and validation (with its
//! error messages) is exactly the API's. Limit flags are read and checked
//! here, in the flag's terms ([`limit_flags`]), so that a mistake never
//! comes back as an API field the user did not type.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use clap::Args;
use kiln_protocol::{limits, RuntimeTable};
use serde_json::{json, Map, Value};

mod limit_flags;

/// Largest `--job` document read.
const MAX_JOB_DOCUMENT_BYTES: usize = 16 << 20;

/// The flags that describe a job.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// File to run; its extension picks the runtime unless --runtime is given.
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Arguments passed to the program (after `--`).
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
    /// Runtime name or alias (python, node, bash, ...).
    #[arg(short, long)]
    pub runtime: Option<String>,
    /// Code to run instead of a file.
    #[arg(short = 'c', long, value_name = "CODE", conflicts_with = "file")]
    pub code: Option<String>,
    /// A whole job as JSON (the API's JobSpec); `-` reads it from stdin.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["file", "code"])]
    pub job: Option<PathBuf>,
    /// Extra file for the job's work directory, as PATH or NAME=PATH.
    #[arg(long = "file", value_name = "[NAME=]PATH")]
    pub files: Vec<String>,
    /// Environment variable for the job.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Wall-clock limit, with its unit (ms, s, m, h): 500ms, 10s, 2m.
    /// 1ms to 15m; default 10s.
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub timeout: Option<String>,
    /// Memory limit of the sandbox, with its unit (B, K, M, G; binary):
    /// 64M, 1G. 16M to 16G; default 256M.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub memory: Option<String>,
    /// Most processes and threads at once. 4 to 4096; default 64.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub pids: Option<String>,
    /// CPU quota in CPUs: 0.5, 2. 0.01 to 64; default 1.
    #[arg(long, value_name = "CPUS", allow_hyphen_values = true)]
    pub cpus: Option<String>,
    /// Size of the writable work directory, with its unit: 64M, 1G.
    /// 1M to 16G; default 64M.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub disk: Option<String>,
    /// Cap on stdout and on stderr, each, with its unit: 100B, 64K, 1M.
    /// 1B to 64M; default 1M.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub output_limit: Option<String>,
}

/// Reads at most `max` bytes; more is an error naming `what`.
pub fn read_bounded(mut r: impl Read, max: usize, what: &str) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.by_ref()
        .take(max as u64 + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {what}"))?;
    if buf.len() > max {
        bail!("{what} is larger than the limit of {max} bytes");
    }
    Ok(buf)
}

/// Turns flags into the API's JSON form, so that validation (and its error
/// messages) is exactly the API's.
fn spec_json(a: &JobArgs, table: &RuntimeTable) -> anyhow::Result<(Value, bool)> {
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
            bail!("no code given: pass FILE, -c CODE, --job FILE, or pipe code on stdin");
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
    for (flag, typed) in [
        (&limit_flags::TIMEOUT, &a.timeout),
        (&limit_flags::MEMORY, &a.memory),
        (&limit_flags::PIDS, &a.pids),
        (&limit_flags::CPUS, &a.cpus),
        (&limit_flags::DISK, &a.disk),
        (&limit_flags::OUTPUT_LIMIT, &a.output_limit),
    ] {
        if let Some(typed) = typed {
            l.insert(flag.field.into(), flag.json(flag.parse(typed)?));
        }
    }
    if !l.is_empty() {
        o.insert("limits".into(), Value::Object(l));
    }
    Ok((Value::Object(o), used_stdin))
}

/// The job as the API's JSON bytes: a `--job` document as given (so that a
/// malformed one is reported by the same parser as over HTTP), or the flags
/// translated. Also says whether the code came from stdin (which then
/// cannot be the job's stdin as well).
pub fn job_bytes(a: &JobArgs, table: &RuntimeTable) -> anyhow::Result<(Vec<u8>, bool)> {
    match &a.job {
        Some(p) if p.as_os_str() == "-" => Ok((
            read_bounded(std::io::stdin(), MAX_JOB_DOCUMENT_BYTES, "the job on stdin")?,
            true,
        )),
        Some(p) => {
            let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            Ok((
                read_bounded(f, MAX_JOB_DOCUMENT_BYTES, &p.display().to_string())?,
                false,
            ))
        }
        None => {
            let (v, used_stdin) = spec_json(a, table)?;
            Ok((v.to_string().into_bytes(), used_stdin))
        }
    }
}

//! The job a command line describes, shared by `kiln run` and `kiln
//! submit`: the flags (a file, `-c`, code on stdin, or a whole `--job`
//! document; runtime, args, extra files, env, limits) and their translation
//! into the API's JSON, so that both commands accept the same job and
//! validation (with its error messages) is exactly the API's. The flags
//! mean the same with a `--job` document as without: they override its
//! fields. Limit flags are read and checked here, in the flag's terms
//! ([`limit_flags`]), so that a mistake never comes back as an API field
//! the user did not type.

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
    /// The OCI image the job's root is made of (see `kiln image ls`)
    /// [default: the backend's root]
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    /// Code to run instead of a file.
    #[arg(short = 'c', long, value_name = "CODE", conflicts_with = "file")]
    pub code: Option<String>,
    /// A whole job as JSON (the API's JobSpec); `-` reads it from stdin.
    /// The other job flags override its fields: --runtime, ARGS and each
    /// limit replace theirs, --env and --file add to (or replace by name)
    /// the document's.
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

/// What the flags say about a job besides its code: laid over the
/// document made from the code, or over a `--job` document, so that a flag
/// means the same with either (a saved job re-run with a shorter timeout).
#[derive(Debug, Default)]
struct Overlay {
    runtime: Option<String>,
    image: Option<String>,
    args: Vec<String>,
    /// JobSpec `files` entries.
    files: Vec<Value>,
    env: Map<String, Value>,
    /// JobSpec `limits` fields.
    limits: Map<String, Value>,
}

impl Overlay {
    /// Reads the flags (and the files `--file` names). Limits are read
    /// first: a wrong flag is reported before any input is consumed.
    fn from_flags(a: &JobArgs) -> anyhow::Result<Self> {
        let mut o = Overlay::default();
        for (flag, typed) in [
            (&limit_flags::TIMEOUT, &a.timeout),
            (&limit_flags::MEMORY, &a.memory),
            (&limit_flags::PIDS, &a.pids),
            (&limit_flags::CPUS, &a.cpus),
            (&limit_flags::DISK, &a.disk),
            (&limit_flags::OUTPUT_LIMIT, &a.output_limit),
        ] {
            if let Some(typed) = typed {
                o.limits
                    .insert(flag.field.into(), flag.json(flag.parse(typed)?));
            }
        }
        o.runtime = a.runtime.clone();
        o.image = a.image.clone();
        o.args = a.args.clone();
        for f in &a.files {
            let (name, path) = match f.split_once('=') {
                Some((n, p)) => (n.to_owned(), PathBuf::from(p)),
                None => {
                    let p = PathBuf::from(f);
                    let n = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .with_context(|| format!("--file {f:?}: no file name"))?;
                    (n, p)
                }
            };
            let bytes = read_bounded(
                std::fs::File::open(&path)
                    .with_context(|| format!("--file {f:?}: opening {}", path.display()))?,
                limits::MAX_FILE_BYTES,
                &path.display().to_string(),
            )?;
            o.files.push(json!({"path": name, "content": base64::engine::general_purpose::STANDARD.encode(&bytes), "encoding": "base64"}));
        }
        for kv in &a.env {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--env {kv:?}: expected KEY=VALUE"))?;
            o.env.insert(k.into(), json!(v));
        }
        Ok(o)
    }

    fn is_empty(&self) -> bool {
        self.runtime.is_none()
            && self.image.is_none()
            && self.args.is_empty()
            && self.files.is_empty()
            && self.env.is_empty()
            && self.limits.is_empty()
    }

    /// Sets the flags' fields in a job document: `runtime`, `args` and each
    /// limit are replaced, `env` and `files` gain the flags' entries (a file
    /// of the same path is replaced). A field of the wrong JSON type is left
    /// for the API's parser to name.
    fn apply(self, doc: &mut Map<String, Value>) {
        if let Some(r) = self.runtime {
            doc.insert("runtime".into(), json!(r));
        }
        if let Some(i) = self.image {
            doc.insert("image".into(), json!(i));
        }
        if !self.args.is_empty() {
            doc.insert("args".into(), json!(self.args));
        }
        if !self.files.is_empty() {
            let files = doc.entry("files").or_insert_with(|| json!([]));
            if let Value::Array(files) = files {
                for f in self.files {
                    files.retain(|old| {
                        let path = old.get("path").or_else(|| old.get("name"));
                        path != f.get("path")
                    });
                    files.push(f);
                }
            }
        }
        for (key, entries) in [("env", self.env), ("limits", self.limits)] {
            if entries.is_empty() {
                continue;
            }
            if let Value::Object(m) = doc.entry(key).or_insert_with(|| json!({})) {
                m.extend(entries);
            }
        }
    }

    /// A `--job` document with the flags laid over it. Without flags, or
    /// when it is not a JSON object, it stays byte for byte as given, so
    /// that the API's parser names what is wrong with it.
    fn over_document(self, bytes: Vec<u8>) -> Vec<u8> {
        if self.is_empty() {
            return bytes;
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(mut doc)) => {
                self.apply(&mut doc);
                Value::Object(doc).to_string().into_bytes()
            }
            _ => bytes,
        }
    }
}

/// The job document of FILE, `-c CODE` or code on stdin: its code, entry
/// point and runtime (the flag's, or FILE's extension's). Also says
/// whether the code came from stdin.
fn code_document(a: &JobArgs, table: &RuntimeTable) -> anyhow::Result<(Map<String, Value>, bool)> {
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
    Ok((o, used_stdin))
}

/// The job as the API's JSON bytes, so that validation (and its error
/// messages) is exactly the API's: a `--job` document as given, or the
/// code's document, with the other flags laid over either. Also says
/// whether stdin was read (which then cannot be the job's stdin as well).
pub fn job_bytes(a: &JobArgs, table: &RuntimeTable) -> anyhow::Result<(Vec<u8>, bool)> {
    let overlay = Overlay::from_flags(a)?;
    match &a.job {
        Some(p) if p.as_os_str() == "-" => Ok((
            overlay.over_document(read_bounded(
                std::io::stdin(),
                MAX_JOB_DOCUMENT_BYTES,
                "the job on stdin",
            )?),
            true,
        )),
        Some(p) => {
            let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            Ok((
                overlay.over_document(read_bounded(
                    f,
                    MAX_JOB_DOCUMENT_BYTES,
                    &p.display().to_string(),
                )?),
                false,
            ))
        }
        None => {
            let (mut doc, used_stdin) = code_document(a, table)?;
            overlay.apply(&mut doc);
            Ok((Value::Object(doc).to_string().into_bytes(), used_stdin))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        job: JobArgs,
    }

    fn overlay(flags: &[&str]) -> anyhow::Result<Overlay> {
        let cli = Cli::try_parse_from(std::iter::once("kiln").chain(flags.iter().copied()))?;
        Overlay::from_flags(&cli.job)
    }

    fn over(flags: &[&str], doc: Value) -> Value {
        let bytes = overlay(flags)
            .unwrap()
            .over_document(doc.to_string().into_bytes());
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn flags_override_the_fields_of_a_job_document() {
        let doc = json!({
            "runtime": "python",
            "code": "x",
            "args": ["old"],
            "env": {"KEEP": "1", "CHANGE": "old"},
            "limits": {"timeout_ms": 3000, "memory_mb": 128},
        });
        let v = over(
            &[
                "--job",
                "f.json",
                "--runtime",
                "bash",
                "--timeout",
                "1s",
                "--cpus",
                "0.5",
                "-e",
                "CHANGE=new",
                "--",
                "new",
            ],
            doc,
        );
        assert_eq!(v["runtime"], "bash");
        assert_eq!(v["args"], json!(["new"]));
        assert_eq!(v["env"], json!({"KEEP": "1", "CHANGE": "new"}));
        assert_eq!(
            v["limits"],
            json!({"timeout_ms": 1000, "memory_mb": 128, "cpus": 0.5})
        );
        assert_eq!(v["code"], "x");
    }

    #[test]
    fn a_file_flag_adds_to_or_replaces_the_documents_files() {
        let dir = std::env::temp_dir().join(format!("kiln-overlay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let helper = dir.join("helper.py");
        std::fs::write(&helper, "X = 2\n").unwrap();
        let flag = format!("lib/helper.py={}", helper.display());
        let v = over(
            &["--job", "f.json", "--file", &flag],
            json!({"runtime": "python", "files": [
                {"name": "lib/helper.py", "content": "X = 1"},
                {"path": "main.py", "content": "import lib.helper"},
            ]}),
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let files = v["files"].as_array().unwrap();
        assert_eq!(files.len(), 2, "{files:?}");
        assert_eq!(files[0]["path"], "main.py");
        assert_eq!(files[1]["path"], "lib/helper.py");
        assert_eq!(files[1]["content"], "WCA9IDIK");
    }

    #[test]
    fn a_document_without_flags_or_not_an_object_stays_as_given() {
        let odd = b"{ \"runtime\": \"python\" ,\"code\":\"x\" }".to_vec();
        assert_eq!(
            overlay(&["--job", "f"]).unwrap().over_document(odd.clone()),
            odd
        );
        for bad in [&b"{not json"[..], b"[1]", b"\"x\""] {
            let o = overlay(&["--job", "f", "--timeout", "1s"]).unwrap();
            assert_eq!(o.over_document(bad.to_vec()), bad);
        }
        // A field of the wrong type is left for the API's parser to name.
        let v = over(&["--job", "f", "--memory", "64M"], json!({"limits": 5}));
        assert_eq!(v["limits"], 5);
    }

    #[test]
    fn a_wrong_limit_flag_is_named_in_the_flags_terms() {
        let e = overlay(&["-c", "x", "--memory", "64"])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--memory \"64\": "), "{e}");
        assert!(e.contains("did you mean 64M?"), "{e}");
        assert!(!e.contains("memory_mb"), "{e}");
        // A minus sign reaches the parser, not clap's flag matching.
        let e = overlay(&["--timeout", "-1s"]).unwrap_err().to_string();
        assert!(e.contains("cannot be negative"), "{e}");
    }
}

//! The job as users submit it ([`JobSpec`]) and the result they get back
//! ([`JobResult`]). A `JobSpec` can only be obtained by parsing, which checks
//! every field against [`crate::limits`] and names the first wrong one; past
//! this point nothing re-validates.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::limits;

/// A user-visible job id: 1..=128 characters of `[A-Za-z0-9._:-]`, safe to
/// put in a path, a header or a log line.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    /// Parses an id, naming what is wrong with it.
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        if s.is_empty() || s.len() > 128 {
            return Err(SpecError::new("id", "must be 1 to 128 characters long"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(SpecError::new(
                "id",
                "may only contain letters, digits, '.', '_', ':' and '-'",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// A fresh random id (128 bits from the OS, hex).
    pub fn random() -> Self {
        let mut buf = [0u8; 16];
        fill_random(&mut buf);
        Self(buf.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JobId {
    type Error = SpecError;
    fn try_from(s: String) -> Result<Self, SpecError> {
        Self::parse(&s)
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> String {
        id.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Fills `buf` from the kernel's CSPRNG: getrandom(2), one system call (ids
/// are made per job, on the daemon's hot path), retried when a signal
/// interrupts it, or /dev/urandom where that call fails. Ids only need
/// uniqueness, so when neither is available this falls back to time,
/// address and counter entropy rather than panicking.
fn fill_random(buf: &mut [u8]) {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        if n > 0 {
            got += n as usize;
            continue;
        }
        if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        use std::io::Read;
        if std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut buf[got..]))
            .is_err()
        {
            fill_fallback(&mut buf[got..]);
        }
        return;
    }
}

/// Time, address, pid and a process-wide counter: unique enough for ids
/// when the kernel's random source cannot be read.
fn fill_fallback(buf: &mut [u8]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let n = u128::from(COUNT.fetch_add(1, Ordering::Relaxed));
    let seed = t ^ (buf.as_ptr() as u128) ^ (u128::from(std::process::id()) << 64) ^ (n << 96);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (seed >> ((i % 16) * 8)) as u8;
    }
}

/// Identifies one execution inside a sandbox, on the host<->agent channel.
pub type ExecId = u32;

/// A file of a job: a path relative to the work directory and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub path: String,
    pub content: Vec<u8>,
    pub executable: bool,
}

/// Per-job resource limits, each within the bounds of [`crate::limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time the job may run, enforced by the host.
    pub timeout_ms: u64,
    /// Memory of the whole sandbox (cgroup limit), in MiB.
    pub memory_mb: u64,
    /// Most processes and threads alive at once in the sandbox.
    pub pids: u64,
    /// Cap on stdout and on stderr, each, in bytes.
    pub output_bytes: u64,
    /// Size of the writable work directory, in MiB.
    pub disk_mb: u64,
    /// CPU quota in thousandths of a CPU.
    pub cpu_millis: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_ms: limits::TIMEOUT_MS.1,
            memory_mb: limits::MEMORY_MB.1,
            pids: limits::PIDS.1,
            output_bytes: limits::OUTPUT_BYTES.1,
            disk_mb: limits::DISK_MB.1,
            cpu_millis: limits::CPU_MILLIS.1,
        }
    }
}

/// A validated job. Obtain one with [`JobSpec::from_json`] (or serde, which
/// runs the same checks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawJobSpec", into = "RawJobSpec")]
pub struct JobSpec {
    pub id: Option<JobId>,
    /// Runtime name or alias as given; resolved against a [`crate::RuntimeTable`].
    pub runtime: String,
    /// Inline code: becomes the entrypoint file named by the runtime's
    /// default file name unless `entrypoint` says otherwise.
    pub code: Option<String>,
    pub files: Vec<File>,
    pub entrypoint: Option<String>,
    pub args: Vec<String>,
    pub stdin: Vec<u8>,
    pub env: BTreeMap<String, String>,
    pub limits: Limits,
    /// The OCI image whose filesystem is the sandbox's root (a stored
    /// name, `name@sha256:...` or a manifest digest); `None`: the
    /// backend's default root.
    pub image: Option<String>,
    /// The job's sandbox gets a network interface and reaches what
    /// `egress` (or the configured defaults) allows; `false`: loopback
    /// only.
    pub allow_internet: bool,
    /// Egress rules of the job's sandbox (needs `allow_internet`);
    /// `None`: the configured defaults.
    pub egress: Option<EgressSpec>,
}

/// Egress rules as they travel (configuration, API bodies, jobs): lists of
/// rule strings, each an IPv4 network (`10.0.0.0/8`, `192.0.2.7`), a
/// domain name (`example.com`), a wildcard (`*.example.com`) or `*`. Their
/// meaning is the sandbox crate's (`kiln_sandbox::network::EgressRules`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressSpec {
    /// Networks and names that may be reached.
    pub allow: Vec<String>,
    /// Networks and names that may not, whatever `allow` says.
    pub deny: Vec<String>,
}

impl EgressSpec {
    /// Checks the lists' sizes (a rule's meaning is checked where it is
    /// parsed): at most [`limits::MAX_EGRESS_RULES`] rules of at most 255
    /// bytes each.
    pub fn check_sizes(&self, field: &str) -> Result<(), SpecError> {
        for (name, list) in [("allow", &self.allow), ("deny", &self.deny)] {
            if list.len() > limits::MAX_EGRESS_RULES {
                return Err(SpecError::new(
                    format!("{field}.{name}"),
                    format!("{} rules; at most {}", list.len(), limits::MAX_EGRESS_RULES),
                ));
            }
            if let Some((i, _)) = list
                .iter()
                .enumerate()
                .find(|(_, r)| r.is_empty() || r.len() > 255)
            {
                return Err(SpecError::new(
                    format!("{field}.{name}[{i}]"),
                    "a rule is 1 to 255 bytes long",
                ));
            }
        }
        Ok(())
    }
}

/// What was wrong with a job: the field (dotted path) and what would be right.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl JobSpec {
    /// Parses and validates a job from JSON. Syntax errors keep serde's
    /// line/column; semantic errors name the field.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SpecError> {
        let raw: RawJobSpec = serde_json::from_slice(bytes).map_err(|e| {
            let field = if e.is_syntax() || e.is_eof() {
                "body"
            } else {
                "job"
            };
            SpecError::new(field, e.to_string())
        })?;
        Self::try_from(raw)
    }

    /// A job running `code` in `runtime` with default limits.
    pub fn inline(runtime: &str, code: &str) -> Self {
        Self {
            id: None,
            runtime: runtime.to_owned(),
            code: Some(code.to_owned()),
            files: Vec::new(),
            entrypoint: None,
            args: Vec::new(),
            stdin: Vec::new(),
            env: BTreeMap::new(),
            limits: Limits::default(),
            image: None,
            allow_internet: false,
            egress: None,
        }
    }

    /// The files to place in the work directory and the entrypoint's path,
    /// given the runtime's default file name for inline code.
    pub fn materialize(&self, default_file: &str) -> (Vec<File>, String) {
        let mut files = Vec::with_capacity(self.files.len() + 1);
        if let Some(code) = &self.code {
            let path = self
                .entrypoint
                .clone()
                .unwrap_or_else(|| default_file.to_owned());
            files.push(File {
                path: path.clone(),
                content: code.as_bytes().to_vec(),
                executable: false,
            });
            files.extend(self.files.iter().filter(|f| f.path != path).cloned());
            return (files, path);
        }
        files.extend(self.files.iter().cloned());
        let entry = self
            .entrypoint
            .clone()
            .or_else(|| self.files.first().map(|f| f.path.clone()))
            .unwrap_or_else(|| default_file.to_owned());
        (files, entry)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(alias = "name")]
    path: String,
    content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encoding: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    executable: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    memory_mb: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pids: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disk_mb: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cpus: Option<f64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJobSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    runtime: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    files: Vec<RawFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entrypoint: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stdin: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<String, String>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    allow_internet: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    egress: Option<EgressSpec>,
}

/// Checks an image reference's shape (whether the image exists is the
/// executor's business): 1 to 255 bytes of what registry names, tags and
/// digests are made of.
pub fn check_image_ref(field: &str, image: &str) -> Result<(), SpecError> {
    let ok = !image.is_empty()
        && image.len() <= 255
        && image
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:/@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!(
                "{image:?} is not an image reference; use a name such as registry/repo:tag or a sha256: digest"
            ),
        ))
    }
}

/// Checks a path relative to the work directory: no `..`, not absolute, no
/// NUL, no empty components.
pub fn check_rel_path(field: &str, path: &str) -> Result<(), SpecError> {
    if path.is_empty() || path.len() > limits::MAX_PATH_BYTES {
        return Err(SpecError::new(
            field,
            format!("must be 1 to {} bytes long", limits::MAX_PATH_BYTES),
        ));
    }
    if path.starts_with('/') {
        return Err(SpecError::new(
            field,
            format!("{path:?} must be relative to the work directory"),
        ));
    }
    if path.contains('\0') {
        return Err(SpecError::new(field, "must not contain NUL"));
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(SpecError::new(
            field,
            format!("{path:?} must not contain empty, '.' or '..' components"),
        ));
    }
    Ok(())
}

fn check_range(
    field: &str,
    v: Option<i64>,
    (min, def, max): (u64, u64, u64),
) -> Result<u64, SpecError> {
    let Some(v) = v else { return Ok(def) };
    if v < min as i64 || v > max as i64 {
        return Err(SpecError::new(
            field,
            format!("{v} is out of range; allowed {min} to {max}"),
        ));
    }
    Ok(v as u64)
}

fn check_runtime_name(name: &str) -> Result<(), SpecError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
    {
        return Err(SpecError::new(
            "runtime",
            format!("{name:?} is not a runtime name (1 to 64 of [A-Za-z0-9._+-])"),
        ));
    }
    Ok(())
}

impl TryFrom<RawJobSpec> for JobSpec {
    type Error = SpecError;

    fn try_from(raw: RawJobSpec) -> Result<Self, SpecError> {
        let id = raw.id.as_deref().map(JobId::parse).transpose()?;
        check_runtime_name(&raw.runtime)?;
        if let Some(image) = &raw.image {
            check_image_ref("image", image)?;
        }
        if let Some(egress) = &raw.egress {
            if !raw.allow_internet {
                return Err(SpecError::new(
                    "egress",
                    "egress rules need allow_internet: true",
                ));
            }
            egress.check_sizes("egress")?;
        }
        if raw.code.is_none() && raw.files.is_empty() {
            return Err(SpecError::new(
                "code",
                "a job needs `code` or at least one entry in `files`",
            ));
        }
        if raw.files.len() > limits::MAX_FILES {
            return Err(SpecError::new(
                "files",
                format!("{} files; at most {}", raw.files.len(), limits::MAX_FILES),
            ));
        }
        let mut total = raw.code.as_ref().map_or(0, String::len);
        let mut files = Vec::with_capacity(raw.files.len());
        for (i, f) in raw.files.into_iter().enumerate() {
            let field = format!("files[{i}]");
            check_rel_path(&format!("{field}.path"), &f.path)?;
            let content = match f.encoding.as_deref() {
                None | Some("utf8") | Some("utf-8") => f.content.into_bytes(),
                Some("base64") => base64::engine::general_purpose::STANDARD
                    .decode(f.content.as_bytes())
                    .map_err(|e| {
                        SpecError::new(format!("{field}.content"), format!("invalid base64: {e}"))
                    })?,
                Some(other) => {
                    return Err(SpecError::new(
                        format!("{field}.encoding"),
                        format!("{other:?} is not an encoding; use \"utf8\" or \"base64\""),
                    ))
                }
            };
            if files.iter().any(|g: &File| g.path == f.path) {
                return Err(SpecError::new(
                    format!("{field}.path"),
                    format!("{:?} appears twice", f.path),
                ));
            }
            total += content.len();
            files.push(File {
                path: f.path,
                content,
                executable: f.executable,
            });
        }
        if total > limits::MAX_JOB_CODE_BYTES {
            return Err(SpecError::new(
                "files",
                format!(
                    "code and files total {total} bytes; at most {}",
                    limits::MAX_JOB_CODE_BYTES
                ),
            ));
        }
        if let Some(e) = &raw.entrypoint {
            check_rel_path("entrypoint", e)?;
            if raw.code.is_none() && !files.iter().any(|f| &f.path == e) {
                return Err(SpecError::new(
                    "entrypoint",
                    format!("{e:?} is not one of the job's files"),
                ));
            }
        }
        if raw.args.len() > limits::MAX_ARGS
            || raw.args.iter().map(String::len).sum::<usize>() > limits::MAX_ARGS_BYTES
        {
            return Err(SpecError::new(
                "args",
                format!(
                    "at most {} arguments totalling {} bytes",
                    limits::MAX_ARGS,
                    limits::MAX_ARGS_BYTES
                ),
            ));
        }
        if let Some(i) = raw.args.iter().position(|a| a.contains('\0')) {
            return Err(SpecError::new(format!("args[{i}]"), "must not contain NUL"));
        }
        if raw.env.len() > limits::MAX_ENV
            || raw
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
                > limits::MAX_ENV_BYTES
        {
            return Err(SpecError::new(
                "env",
                format!(
                    "at most {} variables totalling {} bytes",
                    limits::MAX_ENV,
                    limits::MAX_ENV_BYTES
                ),
            ));
        }
        for (k, v) in &raw.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(SpecError::new(
                    format!("env.{k}"),
                    "names must be non-empty without '=' or NUL; values without NUL",
                ));
            }
        }
        let stdin = raw.stdin.unwrap_or_default().into_bytes();
        if stdin.len() > limits::MAX_STDIN_BYTES {
            return Err(SpecError::new(
                "stdin",
                format!("{} bytes; at most {}", stdin.len(), limits::MAX_STDIN_BYTES),
            ));
        }
        let l = raw.limits;
        let cpu_millis = match l.cpus {
            None => limits::CPU_MILLIS.1,
            Some(c) if c.is_finite() => check_range(
                "limits.cpus",
                Some((c * 1000.0).round() as i64),
                limits::CPU_MILLIS,
            )
            .map_err(|_| {
                SpecError::new(
                    "limits.cpus",
                    format!(
                        "{c} is out of range; allowed {} to {}",
                        limits::CPU_MILLIS.0 as f64 / 1000.0,
                        limits::CPU_MILLIS.2 as f64 / 1000.0
                    ),
                )
            })?,
            Some(c) => {
                return Err(SpecError::new(
                    "limits.cpus",
                    format!("{c} is not a number"),
                ))
            }
        };
        let limits = Limits {
            timeout_ms: check_range("limits.timeout_ms", l.timeout_ms, limits::TIMEOUT_MS)?,
            memory_mb: check_range("limits.memory_mb", l.memory_mb, limits::MEMORY_MB)?,
            pids: check_range("limits.pids", l.pids, limits::PIDS)?,
            output_bytes: check_range("limits.output_bytes", l.output_bytes, limits::OUTPUT_BYTES)?,
            disk_mb: check_range("limits.disk_mb", l.disk_mb, limits::DISK_MB)?,
            cpu_millis,
        };
        Ok(Self {
            id,
            runtime: raw.runtime,
            code: raw.code,
            files,
            entrypoint: raw.entrypoint,
            args: raw.args,
            stdin,
            env: raw.env,
            limits,
            image: raw.image,
            allow_internet: raw.allow_internet,
            egress: raw.egress,
        })
    }
}

impl From<JobSpec> for RawJobSpec {
    fn from(s: JobSpec) -> Self {
        let files = s
            .files
            .into_iter()
            .map(|f| match String::from_utf8(f.content) {
                Ok(content) => RawFile {
                    path: f.path,
                    content,
                    encoding: None,
                    executable: f.executable,
                },
                Err(e) => RawFile {
                    path: f.path,
                    content: base64::engine::general_purpose::STANDARD.encode(e.as_bytes()),
                    encoding: Some("base64".into()),
                    executable: f.executable,
                },
            })
            .collect();
        let l = s.limits;
        RawJobSpec {
            id: s.id.map(String::from),
            runtime: s.runtime,
            code: s.code,
            files,
            entrypoint: s.entrypoint,
            args: s.args,
            stdin: (!s.stdin.is_empty()).then(|| String::from_utf8_lossy(&s.stdin).into_owned()),
            env: s.env,
            limits: RawLimits {
                timeout_ms: Some(l.timeout_ms as i64),
                memory_mb: Some(l.memory_mb as i64),
                pids: Some(l.pids as i64),
                output_bytes: Some(l.output_bytes as i64),
                disk_mb: Some(l.disk_mb as i64),
                cpus: Some(l.cpu_millis as f64 / 1000.0),
            },
            image: s.image,
            allow_internet: s.allow_internet,
            egress: s.egress,
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The program exited with status 0.
    Ok,
    /// The program exited non-zero or died of a signal of its own making.
    Error,
    /// The host stopped it at its deadline.
    Timeout,
    /// The sandbox ran out of memory and the kernel killed it.
    Oom,
    /// Stopped for another limit (output cap) or cancelled.
    Killed,
    /// Never ran: the job was invalid or could not be admitted.
    Rejected,
    /// Kiln failed, not the job.
    Internal,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::Oom => "oom",
            Outcome::Killed => "killed",
            Outcome::Rejected => "rejected",
            Outcome::Internal => "internal",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the sandbox came ready from a pool or was made for this job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Acquire {
    Warm,
    Cold,
}

/// Where the time went, in milliseconds (fractions kept).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub queued_ms: f64,
    pub acquire_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquire: Option<Acquire>,
    pub run_ms: f64,
    pub total_ms: f64,
    /// How the job's sandbox was made, when it was made for this job (a
    /// `cold` acquire): the backend's own steps, within `acquire_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxTimings>,
}

/// How a sandbox came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxStart {
    /// Started from nothing: a jail's init, or a microVM's kernel booted.
    Boot,
    /// A microVM restored from a template snapshot.
    Restore,
}

/// The steps of making a sandbox, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SandboxTimings {
    pub how: SandboxStart,
    /// From starting the process (jail init, VMM) until the guest runs:
    /// a boot until the agent listens, or a snapshot load and resume.
    pub start_ms: f64,
    /// Until the host is connected to the agent.
    pub connect_ms: f64,
    /// The handshake and, in a microVM, the guest setup (fresh entropy,
    /// clock, identity) before any job code may run.
    pub setup_ms: f64,
}

/// Resources the job used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub cpu_user_ms: u64,
    pub cpu_system_ms: u64,
    /// Peak resident set of the job's largest process, in KiB (rusage).
    pub max_rss_kb: u64,
    /// Peak memory of the whole sandbox, in bytes (cgroup), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_peak_bytes: Option<u64>,
}

/// The result of a job, as returned by every intake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub id: JobId,
    pub outcome: Outcome,
    /// Exit status when the program exited.
    pub exit_code: Option<i32>,
    /// Signal number when the program was killed by one.
    pub signal: Option<i32>,
    /// Output, decoded as UTF-8 with invalid sequences replaced.
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Human-readable explanation for any outcome but `ok` and `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub timings: Timings,
    pub usage: Usage,
    /// Manifest digest of the image the job's root came from, when it ran
    /// in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl JobResult {
    /// A result for a job that never ran.
    pub fn rejected(id: JobId, message: impl Into<String>) -> Self {
        Self::without_run(id, Outcome::Rejected, message)
    }

    /// A result for a job that Kiln failed to run.
    pub fn internal(id: JobId, message: impl Into<String>) -> Self {
        Self::without_run(id, Outcome::Internal, message)
    }

    fn without_run(id: JobId, outcome: Outcome, message: impl Into<String>) -> Self {
        Self {
            id,
            outcome,
            exit_code: None,
            signal: None,
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            message: Some(message.into()),
            timings: Timings::default(),
            usage: Usage::default(),
            image: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_reference_is_kept_and_a_malformed_one_refused() {
        let s = JobSpec::from_json(
            br#"{"runtime":"python","code":"1","image":"localhost:5000/py:3@sha256:ab"}"#,
        )
        .unwrap();
        assert_eq!(s.image.as_deref(), Some("localhost:5000/py:3@sha256:ab"));
        let back: JobSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        let e =
            JobSpec::from_json(br#"{"runtime":"python","code":"1","image":"a b"}"#).unwrap_err();
        assert_eq!(e.field, "image");
    }

    #[test]
    fn a_network_request_is_kept_and_egress_needs_it() {
        let s = JobSpec::from_json(
            br#"{"runtime":"python","code":"1","allow_internet":true,"egress":{"allow":["*.example.com"],"deny":["10.0.0.0/8"]}}"#,
        )
        .unwrap();
        assert!(s.allow_internet);
        let egress = s.egress.clone().unwrap();
        assert_eq!((egress.allow.len(), egress.deny.len()), (1, 1));
        let back: JobSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        // An air-gapped job serializes as before (no new keys).
        let plain = serde_json::to_string(&JobSpec::inline("python", "1")).unwrap();
        assert!(
            !plain.contains("allow_internet") && !plain.contains("egress"),
            "{plain}"
        );
        let e = JobSpec::from_json(br#"{"runtime":"python","code":"1","egress":{"allow":[]}}"#)
            .unwrap_err();
        assert_eq!(e.field, "egress");
        let many: Vec<String> = (0..=limits::MAX_EGRESS_RULES)
            .map(|i| format!("n{i}.test"))
            .collect();
        let json = serde_json::json!({"runtime": "python", "code": "1", "allow_internet": true, "egress": {"deny": many}});
        let e = JobSpec::from_json(json.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.field, "egress.deny");
        let json = serde_json::json!({"runtime": "python", "code": "1", "allow_internet": true, "egress": {"allow": ["ok", ""]}});
        let e = JobSpec::from_json(json.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.field, "egress.allow[1]");
    }

    #[test]
    fn minimal_job_gets_default_limits() {
        let s = JobSpec::from_json(br#"{"runtime":"python","code":"print(1)"}"#).unwrap();
        assert_eq!(s.limits, Limits::default());
        let (files, entry) = s.materialize("main.py");
        assert_eq!(entry, "main.py");
        assert_eq!(files[0].content, b"print(1)");
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"runtime":"python"}"#, "code"),
            (r#"{"runtime":"py thon","code":"x"}"#, "runtime"),
            (
                r#"{"runtime":"python","code":"x","limits":{"memory_mb":-1}}"#,
                "limits.memory_mb",
            ),
            (
                r#"{"runtime":"python","code":"x","limits":{"timeout_ms":999999999}}"#,
                "limits.timeout_ms",
            ),
            (
                r#"{"runtime":"python","code":"x","limits":{"cpus":1000}}"#,
                "limits.cpus",
            ),
            (
                r#"{"runtime":"python","files":[{"path":"../x","content":""}]}"#,
                "files[0].path",
            ),
            (
                r#"{"runtime":"python","files":[{"path":"/etc/x","content":""}]}"#,
                "files[0].path",
            ),
            (
                r#"{"runtime":"python","files":[{"path":"a","content":"!","encoding":"base64"}]}"#,
                "files[0].content",
            ),
            (
                r#"{"runtime":"python","files":[{"path":"a","content":""}],"entrypoint":"b"}"#,
                "entrypoint",
            ),
            (
                r#"{"runtime":"python","code":"x","env":{"A=B":"1"}}"#,
                "env.A=B",
            ),
            (r#"{"runtime":"python","code":"x","id":"a b"}"#, "id"),
            (r#"{"runtime":"python","code":"x""#, "body"),
        ];
        for (json, field) in cases {
            let e = JobSpec::from_json(json.as_bytes()).unwrap_err();
            assert_eq!(&e.field, field, "{json}: {e}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let e = JobSpec::from_json(br#"{"runtime":"python","code":"x","timeout":5}"#).unwrap_err();
        assert!(e.message.contains("timeout"), "{e}");
    }

    #[test]
    fn json_round_trip_keeps_the_job() {
        let json = r#"{"id":"j-1","runtime":"python","files":[{"path":"a/b.py","content":"AAEC","encoding":"base64","executable":true}],
            "entrypoint":"a/b.py","args":["x"],"stdin":"in","env":{"K":"V"},"limits":{"timeout_ms":500,"cpus":0.5}}"#;
        let s = JobSpec::from_json(json.as_bytes()).unwrap();
        assert_eq!(s.files[0].content, vec![0, 1, 2]);
        assert_eq!(s.limits.cpu_millis, 500);
        let back: JobSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn random_ids_are_distinct_and_valid() {
        let a = JobId::random();
        let b = JobId::random();
        assert_ne!(a, b);
        JobId::parse(a.as_str()).unwrap();
    }

    #[test]
    fn the_fallback_fill_gives_distinct_bytes() {
        let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
        fill_fallback(&mut a);
        fill_fallback(&mut b);
        assert_ne!(a, b);
    }
}

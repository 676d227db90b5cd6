//! Sandboxes: isolated places where a job runs, each with a `kiln-agent`
//! inside that speaks the protocol. The [`Backend`] and [`Sandbox`] traits
//! are what the pool, the scheduler and the API see; the backends behind them
//! are the `jail` (Linux namespaces, cgroups, seccomp: the embedded default
//! for hosts without KVM) and, in later issues, microVMs. The host's half of
//! the protocol ([`AgentConn`]) and the job runner ([`run_job`]) are shared
//! by all backends.

mod agent;
mod any;
pub mod firecracker;
pub mod jail;
mod procfs;
pub mod qemu;
mod run;

use std::fmt;
use std::future::Future;

pub use agent::{AgentConn, AgentError, ExecStream, InlineClaim, PendingReply};
pub use any::{AnyBackend, AnySandbox};
use kiln_protocol::Limits;
pub use run::{run_job, OutputSink, RunOutcome, Stream, KILL_GRACE};

/// A sandbox id: 16 random hex digits, unique per host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

impl SandboxId {
    pub fn random() -> Self {
        Self(kiln_protocol::JobId::random().as_str()[..16].to_owned())
    }

    /// Parses an id received from outside (records, API paths).
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a sandbox must provide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    pub memory_mb: u64,
    pub pids: u64,
    pub cpu_millis: u64,
    /// Size of the writable work directory (and of `/tmp`), in MiB.
    pub disk_mb: u64,
    /// Runtimes to pre-warm, by canonical name.
    pub warm: Vec<String>,
    /// `false`: no network at all (only a loopback interface).
    pub allow_internet: bool,
    /// Start at background CPU priority: a pool's spare, whose set-up and
    /// interpreter warm-up should yield the CPU to sandboxes running jobs
    /// until [`Sandbox::set_background`] lifts it at lease.
    pub background: bool,
}

impl SandboxSpec {
    /// A sandbox sized by a job's limits, pre-warming `runtime`.
    pub fn for_job(limits: &Limits, runtime: &str) -> Self {
        Self {
            memory_mb: limits.memory_mb,
            pids: limits.pids,
            cpu_millis: limits.cpu_millis,
            disk_mb: limits.disk_mb,
            warm: vec![runtime.to_owned()],
            allow_internet: false,
            background: false,
        }
    }
}

/// Live figures of a sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxStats {
    pub memory_bytes: u64,
    pub memory_peak_bytes: Option<u64>,
    pub cpu_usage_us: Option<u64>,
    pub pids: u64,
    pub oom_kills: u64,
}

/// What orphan reaping found and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReapReport {
    /// Sandboxes of dead owners that were destroyed.
    pub reaped: Vec<String>,
    /// Leftovers that could not be removed, with the reason.
    pub failed: Vec<String>,
}

/// Why a sandbox could not be created or used.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The request asks for something this backend cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// Setting up the sandbox's cgroup failed.
    #[error(transparent)]
    Cgroup(#[from] jail::CgroupError),
    /// A host-side setup step failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The sandbox's init failed before running the agent.
    #[error("jail setup failed at {step}: {source}")]
    Setup {
        step: String,
        #[source]
        source: std::io::Error,
    },
    /// The agent did not come up or broke the protocol.
    #[error("agent: {0}")]
    Agent(#[from] AgentError),
    /// The seccomp filter could not be built.
    #[error(transparent)]
    Seccomp(#[from] jail::SeccompError),
}

/// A ready sandbox with a connected agent.
///
/// Contract: the owner calls [`Sandbox::destroy`] exactly once when done;
/// dropping a sandbox without it still kills everything in it, but finishes
/// the cleanup in the background.
pub trait Sandbox: Send + Sync {
    fn id(&self) -> &SandboxId;
    /// The protocol connection to the agent inside.
    fn agent(&self) -> &AgentConn;
    /// Kernel OOM kills inside the sandbox so far (a monotonic counter).
    fn oom_kills(&self) -> u64;
    /// The OOM-kill count as of the end of the last job, reset, creation or
    /// resize (whichever came last), for a job's "before" without a fresh
    /// read. A resize can kill (a lower memory limit on cgroup v2 OOM-kills
    /// within the write, likely the idle warm interpreter), so a jail reads
    /// the count again after each; between the last of those and the next
    /// job nothing runs that could be killed: the warm interpreter waits
    /// for its job.
    fn oom_kills_seen(&self) -> u64 {
        self.oom_kills()
    }
    /// Peak memory of the sandbox so far, when the backend knows it.
    fn memory_peak_bytes(&self) -> Option<u64>;
    fn stats(&self) -> SandboxStats;
    /// Moves the sandbox to background CPU priority or back to normal
    /// (where the backend can: a jail's CPU weight; a no-op elsewhere).
    fn set_background(&self, _background: bool) {}
    /// Makes a sandbox whose job ended as fresh as a new one, for the next
    /// job: every process the job left killed, every file, namespace and
    /// counter of its gone, the warm runtimes ready again. `Err` when the
    /// backend cannot (then the owner destroys it); a sandbox whose reset
    /// failed must not run anything else.
    fn reset(&self) -> impl Future<Output = Result<(), SandboxError>> + Send {
        async {
            Err(SandboxError::Unsupported(
                "this backend cannot reset a sandbox; it is destroyed instead".into(),
            ))
        }
    }
    /// Kills everything inside and removes every trace on the host.
    fn destroy(self) -> impl Future<Output = ()> + Send
    where
        Self: Sized;
}

/// Makes sandboxes.
pub trait Backend: Send + Sync + 'static {
    type Sandbox: Sandbox + 'static;
    /// `"jail"`, `"firecracker"`, ...
    fn name(&self) -> &'static str;
    /// Creates a sandbox whose agent has completed the handshake and started
    /// warming `spec.warm`.
    fn create(
        &self,
        spec: &SandboxSpec,
    ) -> impl Future<Output = Result<Self::Sandbox, SandboxError>> + Send;
    /// Destroys what earlier, crashed processes left (call at start-up).
    fn reap_orphans(&self) -> ReapReport;
}

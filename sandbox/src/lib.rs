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
pub mod network;
mod procfs;
pub mod qemu;
pub mod record;
mod run;
pub mod settings;
pub mod template;
pub mod vm;

use std::fmt;
use std::future::Future;

pub use agent::{AgentConn, AgentError, ExecHandle, ExecStream, InlineClaim, PendingReply};
pub use any::{AnyBackend, AnySandbox};
use kiln_protocol::Limits;
pub use run::{run_job, OutputCapture, OutputSink, RunOutcome, Stream, KILL_GRACE};
pub use settings::{BackendFlags, BackendKind, BackendSettings, OpenError};
pub use template::TemplateInfo;

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
    /// An image's filesystem as `/` instead of the backend's default root:
    /// a jail mounts its unpacked root, a qemu or Firecracker microVM boots
    /// from its root disk (`vm::image_disk`).
    pub image: Option<ImageRoot>,
}

/// An unpacked OCI image to use as a sandbox's root: shared read-only by
/// every sandbox of the image, each with a writable layer of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRoot {
    /// The image's manifest digest.
    pub digest: String,
    /// The unpacked root (kiln-images' store), with ids shifted into the
    /// jail's range.
    pub dir: std::path::PathBuf,
    /// The image store holding it, where microVM backends have its root
    /// disk built.
    pub store: std::path::PathBuf,
    /// The runtime table the sandbox's agent gets instead of the
    /// backend's, when the image keeps an interpreter elsewhere.
    pub runtimes: Option<kiln_protocol::RuntimeTable>,
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
            image: None,
        }
    }
}

/// Live figures of a sandbox, as far as its backend can see them (`None`:
/// this backend cannot tell).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxStats {
    pub memory_bytes: u64,
    pub memory_peak_bytes: Option<u64>,
    /// CPU time used since the sandbox started, in microseconds.
    pub cpu_usage_us: Option<u64>,
    pub pids: u64,
    pub oom_kills: u64,
    /// Used and total bytes of the work directory.
    pub disk_used_bytes: Option<u64>,
    pub disk_total_bytes: Option<u64>,
    /// Received and sent bytes, summed over the sandbox's interfaces.
    pub net_rx_bytes: Option<u64>,
    pub net_tx_bytes: Option<u64>,
    /// Exits of the guest's vCPUs to the VMM (microVMs whose VMM counts
    /// them: Firecracker's `vcpu.exit_*`).
    pub vmm_exits: Option<u64>,
}

/// The resources of a live sandbox that [`Sandbox::resize`] can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub memory_mb: u64,
    pub pids: u64,
    pub cpu_millis: u64,
}

impl From<&Limits> for Resources {
    fn from(l: &Limits) -> Self {
        Self {
            memory_mb: l.memory_mb,
            pids: l.pids,
            cpu_millis: l.cpu_millis,
        }
    }
}

impl From<&SandboxSpec> for Resources {
    fn from(s: &SandboxSpec) -> Self {
        Self {
            memory_mb: s.memory_mb,
            pids: s.pids,
            cpu_millis: s.cpu_millis,
        }
    }
}

/// What a backend's sandboxes can do besides running jobs. The pool, the
/// scheduler and the API ask this instead of knowing which backend they
/// have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// [`Sandbox::reset`] makes a used sandbox as fresh as a new one, so
    /// that it may serve another tenant's job; without it a sandbox serves
    /// one lease and is destroyed.
    pub reset: bool,
    /// [`Sandbox::resize`] changes the memory, pids and CPU of a live
    /// sandbox, so that a pooled sandbox can serve a job with other limits.
    pub resize: bool,
    /// Sandboxes are restored from templates ([`Backend::prepare_template`])
    /// instead of booted, once a template for their spec exists.
    pub templates: bool,
}

/// What orphan reaping found and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReapReport {
    /// Sandboxes of dead owners that were destroyed.
    pub reaped: Vec<String>,
    /// Leftovers that could not be removed, with the reason.
    pub failed: Vec<String>,
}

impl ReapReport {
    /// Adds another report's findings to this one.
    pub fn extend(&mut self, other: ReapReport) {
        self.reaped.extend(other.reaped);
        self.failed.extend(other.failed);
    }
}

/// Why a sandbox could not be created or used.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The request asks for something this backend cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// A host-side step failed (`what` names the step).
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    /// The agent did not come up or broke the protocol.
    #[error("agent: {0}")]
    Agent(#[from] AgentError),
    /// A step of the backend's own failed; its error names the step.
    #[error("{backend}: {error}")]
    Backend {
        backend: &'static str,
        error: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl SandboxError {
    /// A failure of `backend`'s own.
    pub fn backend(
        backend: &'static str,
        error: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Backend {
            backend,
            error: Box::new(error),
        }
    }

    /// What a sandbox without a network of Kiln's answers to a network
    /// operation.
    pub fn no_network() -> Self {
        Self::Unsupported(
            "this sandbox has no network (create it with allow_internet: true)".into(),
        )
    }
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
    /// Live figures for metrics streams (reads the host's view now; not
    /// for a job's hot path).
    fn stats(&self) -> SandboxStats;
    /// Changes memory, pids and CPU of the live sandbox. Only called when
    /// the backend's [`Capabilities::resize`] is set; `Err` leaves the
    /// sandbox unfit for the job (the caller destroys it or runs the job
    /// elsewhere).
    fn resize(&self, _to: Resources) -> Result<(), SandboxError> {
        Err(SandboxError::Unsupported(
            "this backend cannot resize a running sandbox".into(),
        ))
    }
    /// How this sandbox was made, step by step (reported with the result
    /// of a job whose sandbox was made for it).
    fn start_timings(&self) -> Option<kiln_protocol::SandboxTimings> {
        None
    }
    /// Kills every process inside now, so that a TTL or a delete stops
    /// running code at once rather than when its exec next yields. Blocking
    /// (run it off the async threads); the sandbox is destroyed afterwards.
    fn kill_now(&self);
    /// The sandbox's network (address, egress rules); `None` when it has
    /// none but loopback.
    fn network_info(&self) -> Option<network::NetworkInfo> {
        None
    }
    /// Replaces the egress rules of a networked sandbox, at once for new
    /// connections and name lookups (open connections are cut). Blocking
    /// for a few milliseconds (the firewall's tools).
    fn set_egress(&self, _rules: network::EgressRules) -> Result<(), SandboxError> {
        Err(SandboxError::no_network())
    }
    /// Joins the private network `name`: sandboxes that joined the same
    /// name reach each other (by address, or by sandbox id through Kiln's
    /// resolver); others do not. Once, on a networked sandbox.
    fn join_network(&self, _name: &str) -> Result<(), SandboxError> {
        Err(SandboxError::no_network())
    }
    /// Sets the bandwidth of a networked sandbox, each way, in Mbit/s (0:
    /// unlimited), at once. Blocking for a few milliseconds.
    fn set_rate_mbit(&self, _mbit: u32) -> Result<(), SandboxError> {
        Err(SandboxError::no_network())
    }
    /// A TCP connection from the host to `port` inside the sandbox, for
    /// the daemon's port proxy (exposed ports). Blocking.
    fn open_port(&self, _port: u16) -> Result<std::net::TcpStream, SandboxError> {
        Err(SandboxError::no_network())
    }
    /// Moves the sandbox to background CPU priority or back to normal
    /// (where the backend can: a jail's CPU weight; a no-op elsewhere).
    fn set_background(&self, _background: bool) {}
    /// Makes a sandbox whose job ended as fresh as a new one, for the next
    /// job (only called when the backend's [`Capabilities::reset`] is set): every process the job left killed, every file, namespace and
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
    /// What this backend's sandboxes can do.
    fn capabilities(&self) -> Capabilities;
    /// Creates a sandbox whose agent has completed the handshake and started
    /// warming `spec.warm`.
    fn create(
        &self,
        spec: &SandboxSpec,
    ) -> impl Future<Output = Result<Self::Sandbox, SandboxError>> + Send;
    /// Destroys what earlier, crashed processes left (call at start-up).
    fn reap_orphans(&self) -> ReapReport;

    /// Makes sure the template for sandboxes of `spec` is built and
    /// published from the current inputs (see `template`), building it if
    /// it is missing or outdated; `progress` hears each step as a line.
    /// Afterwards `create` restores such sandboxes from it. Only for a
    /// backend with [`Capabilities::templates`].
    fn prepare_template(
        &self,
        _spec: &SandboxSpec,
        _progress: &(dyn Fn(&str) + Send + Sync),
    ) -> impl Future<Output = Result<TemplateInfo, SandboxError>> + Send {
        async {
            Err(SandboxError::Unsupported(format!(
                "the {} backend has no templates",
                self.name()
            )))
        }
    }

    /// Registers the backend's own metric families (a VMM's counters, a
    /// page server's) with the daemon's registry; read at scrape time.
    fn register_metrics(&self, _registry: &mut prometheus_client::registry::Registry) {}

    /// This backend's published templates (none without templates).
    fn templates(&self) -> Result<Vec<TemplateInfo>, SandboxError> {
        Ok(Vec::new())
    }

    /// Removes a published template; sandboxes restored from it live on.
    fn remove_template(&self, id: &str) -> Result<(), SandboxError> {
        Err(SandboxError::Unsupported(format!(
            "the {} backend has no templates (no template {id})",
            self.name()
        )))
    }
}

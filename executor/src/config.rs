//! `kiln serve`'s configuration: one TOML file (`--config` /
//! `KILN_CONFIG`), every key of which a flag and a `KILN_*` environment
//! variable override (flag > environment > file > default). The effective
//! result is one [`Config`], printed by `kiln serve --print-config` and
//! documented key by key in `docs/configuration.md`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::backend::{BackendArgs, BackendKind, QemuArgs};

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: Server,
    pub scheduler: Scheduler,
    pub pool: PoolConfig,
    pub sandboxes: Sandboxes,
    pub backend: Backend,
    pub amqp: crate::amqp::AmqpConfig,
}

/// `[server]`: the HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Address and port to listen on.
    pub bind: String,
    /// Bearer token every request must carry (except /healthz, /readyz and
    /// /openapi.json); empty disables auth.
    pub token: String,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: u64,
    /// On SIGTERM, how long in-flight jobs get to finish, in seconds.
    pub drain_grace_s: u64,
    /// Threads of the daemon's async runtime (HTTP, AMQP, scheduling).
    /// 1: everything on one thread, which wakes fewer threads per job;
    /// 0: one per CPU.
    pub worker_threads: usize,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            token: String::new(),
            max_body_bytes: 16 * 1024 * 1024,
            drain_grace_s: 30,
            worker_threads: 1,
        }
    }
}

/// `[scheduler]`: admission and results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scheduler {
    /// Jobs running at once.
    pub max_running: usize,
    /// Admitted jobs that may wait for a run slot; beyond it: 429.
    pub queue_depth: usize,
    /// Finished results kept for GET /v1/jobs/{id}, at most.
    pub results_max: usize,
    /// How long a finished result is kept, in seconds.
    pub results_ttl_s: u64,
}

impl Default for Scheduler {
    fn default() -> Self {
        Self {
            max_running: 8,
            queue_depth: 64,
            results_max: 1000,
            results_ttl_s: 600,
        }
    }
}

/// `[pool]`: the warm pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Runtimes that get a pool of ready sandboxes; empty: every runtime.
    pub runtimes: Vec<String>,
    /// Ready sandboxes kept per pooled runtime.
    pub min_idle: usize,
    /// An idle sandbox older than this is replaced, in seconds.
    pub max_idle_age_s: u64,
    /// How long a job waits for a pooled sandbox when all are out, in ms.
    pub lease_timeout_ms: u64,
    /// Jobs one pooled sandbox serves before it is replaced. Between two
    /// jobs it is reset: its room (processes, files, IPC, network) is
    /// destroyed and made anew. 1: a new sandbox for every job.
    pub max_uses: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            runtimes: Vec::new(),
            min_idle: 2,
            max_idle_age_s: 3600,
            lease_timeout_ms: 5000,
            max_uses: 1000,
        }
    }
}

/// `[sandboxes]`: workspaces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sandboxes {
    /// Workspaces alive at once.
    pub max: usize,
    /// TTL of a workspace whose request names none, in seconds.
    pub default_ttl_s: u64,
    /// Longest TTL a request may ask for, in seconds.
    pub max_ttl_s: u64,
}

impl Default for Sandboxes {
    fn default() -> Self {
        Self {
            max: 32,
            default_ttl_s: 600,
            max_ttl_s: 24 * 3600,
        }
    }
}

/// `[backend]`: the sandbox backend (same keys as `kiln run`'s flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backend {
    /// `jail` (namespaces, cgroups, seccomp) or `qemu` (a microVM per sandbox).
    pub kind: String,
    /// The kiln-agent binary; default: next to the kiln binary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<PathBuf>,
    /// Where sandbox records are kept (for reaping after a crash).
    pub state_dir: PathBuf,
    /// A TOML runtime table replacing the built-in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtimes: Option<PathBuf>,
    /// A template root directory instead of the host's system directories.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<PathBuf>,
    /// Name of the parent cgroup of all sandboxes.
    pub cgroup_parent: String,
    /// qemu: guest kernel; default: newest in `guest_cache`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_kernel: Option<PathBuf>,
    /// qemu: guest root image; default: newest in `guest_cache`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_rootfs: Option<PathBuf>,
    /// qemu: where the guest build scripts cache kernels and images.
    pub guest_cache: PathBuf,
    /// qemu: accelerator, `auto`, `kvm` or `tcg`.
    pub qemu_accel: String,
    /// qemu: the QEMU binary.
    pub qemu_bin: PathBuf,
    /// qemu: the vhost-device-vsock binary.
    pub vhost_vsock_bin: PathBuf,
}

impl Default for Backend {
    fn default() -> Self {
        Self {
            kind: "jail".into(),
            guest_kernel: None,
            guest_rootfs: None,
            guest_cache: PathBuf::from("/var/cache/kiln/guest"),
            qemu_accel: "auto".into(),
            qemu_bin: PathBuf::from("qemu-system-x86_64"),
            vhost_vsock_bin: PathBuf::from("vhost-device-vsock"),
            agent: None,
            state_dir: PathBuf::from("/run/kiln"),
            runtimes: None,
            rootfs: None,
            cgroup_parent: "kiln".into(),
        }
    }
}

/// `kiln serve`'s flags; each overrides the config file's key of the same
/// meaning (see `docs/configuration.md`).
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The TOML config file.
    #[arg(long, env = "KILN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (TOML) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// server.bind
    #[arg(long, env = "KILN_BIND", value_name = "ADDR:PORT")]
    pub bind: Option<String>,
    /// server.token
    #[arg(long, env = "KILN_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// server.max_body_bytes
    #[arg(long, env = "KILN_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<u64>,
    /// server.drain_grace_s
    #[arg(long, env = "KILN_DRAIN_GRACE_S", value_name = "SECONDS")]
    pub drain_grace_s: Option<u64>,
    /// server.worker_threads
    #[arg(long, env = "KILN_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,
    /// scheduler.max_running
    #[arg(long, env = "KILN_MAX_RUNNING", value_name = "N")]
    pub max_running: Option<usize>,
    /// scheduler.queue_depth
    #[arg(long, env = "KILN_QUEUE_DEPTH", value_name = "N")]
    pub queue_depth: Option<usize>,
    /// scheduler.results_max
    #[arg(long, env = "KILN_RESULTS_MAX", value_name = "N")]
    pub results_max: Option<usize>,
    /// scheduler.results_ttl_s
    #[arg(long, env = "KILN_RESULTS_TTL_S", value_name = "SECONDS")]
    pub results_ttl_s: Option<u64>,
    /// pool.runtimes (comma-separated)
    #[arg(
        long,
        env = "KILN_POOL_RUNTIMES",
        value_name = "NAMES",
        value_delimiter = ','
    )]
    pub pool_runtimes: Option<Vec<String>>,
    /// pool.min_idle
    #[arg(long, env = "KILN_MIN_IDLE", value_name = "N")]
    pub min_idle: Option<usize>,
    /// pool.max_idle_age_s
    #[arg(long, env = "KILN_MAX_IDLE_AGE_S", value_name = "SECONDS")]
    pub max_idle_age_s: Option<u64>,
    /// pool.lease_timeout_ms
    #[arg(long, env = "KILN_LEASE_TIMEOUT_MS", value_name = "MS")]
    pub lease_timeout_ms: Option<u64>,
    /// pool.max_uses
    #[arg(long, env = "KILN_POOL_MAX_USES", value_name = "N")]
    pub pool_max_uses: Option<u32>,
    /// sandboxes.max
    #[arg(long, env = "KILN_MAX_SANDBOXES", value_name = "N")]
    pub max_sandboxes: Option<usize>,
    /// sandboxes.default_ttl_s
    #[arg(long, env = "KILN_DEFAULT_TTL_S", value_name = "SECONDS")]
    pub default_ttl_s: Option<u64>,
    /// sandboxes.max_ttl_s
    #[arg(long, env = "KILN_MAX_TTL_S", value_name = "SECONDS")]
    pub max_ttl_s: Option<u64>,
    /// backend.kind: jail, or qemu (a microVM per sandbox)
    #[arg(
        long = "backend",
        env = "KILN_BACKEND",
        value_enum,
        value_name = "KIND"
    )]
    pub kind: Option<BackendKind>,
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub qemu: QemuArgs,
    #[command(flatten)]
    pub amqp: crate::amqp::AmqpArgs,
}

/// Which of the backend flags with defaults (shared with `kiln run`) were
/// given explicitly, by flag or environment, so that a config file's value
/// is not overridden by a mere default.
#[derive(Debug, Clone, Default)]
pub struct Explicit(pub Vec<&'static str>);

impl Explicit {
    /// The defaulted flags (clap ids) this applies to.
    pub const IDS: [&'static str; 6] = [
        "state_dir",
        "cgroup_parent",
        "guest_cache",
        "qemu_accel",
        "qemu_bin",
        "vhost_vsock_bin",
    ];

    fn has(&self, id: &str) -> bool {
        self.0.contains(&id)
    }
}

impl Config {
    /// The file (if any) overlaid by flags and environment.
    pub fn load(args: &ServeArgs, explicit: Explicit) -> anyhow::Result<Self> {
        let mut c = match &args.config {
            None => Config::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading the config file {}", p.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("in the config file {}", p.display()))?
            }
        };
        macro_rules! over {
            ($flag:expr => $key:expr) => {
                if let Some(v) = $flag.clone() {
                    $key = v;
                }
            };
        }
        over!(args.bind => c.server.bind);
        over!(args.token => c.server.token);
        over!(args.max_body_bytes => c.server.max_body_bytes);
        over!(args.drain_grace_s => c.server.drain_grace_s);
        over!(args.worker_threads => c.server.worker_threads);
        over!(args.max_running => c.scheduler.max_running);
        over!(args.queue_depth => c.scheduler.queue_depth);
        over!(args.results_max => c.scheduler.results_max);
        over!(args.results_ttl_s => c.scheduler.results_ttl_s);
        over!(args.pool_runtimes => c.pool.runtimes);
        over!(args.min_idle => c.pool.min_idle);
        over!(args.max_idle_age_s => c.pool.max_idle_age_s);
        over!(args.lease_timeout_ms => c.pool.lease_timeout_ms);
        over!(args.pool_max_uses => c.pool.max_uses);
        over!(args.max_sandboxes => c.sandboxes.max);
        over!(args.default_ttl_s => c.sandboxes.default_ttl_s);
        over!(args.max_ttl_s => c.sandboxes.max_ttl_s);
        let b = &args.backend;
        if b.agent.is_some() {
            c.backend.agent = b.agent.clone();
        }
        if b.runtimes.is_some() {
            c.backend.runtimes = b.runtimes.clone();
        }
        if b.rootfs.is_some() {
            c.backend.rootfs = b.rootfs.clone();
        }
        if explicit.has("state_dir") {
            c.backend.state_dir = b.state_dir.clone();
        }
        if explicit.has("cgroup_parent") {
            c.backend.cgroup_parent = b.cgroup_parent.clone();
        }
        if let Some(k) = args.kind {
            use clap::ValueEnum as _;
            if let Some(v) = k.to_possible_value() {
                c.backend.kind = v.get_name().to_owned();
            }
        }
        let q = &args.qemu;
        if q.guest_kernel.is_some() {
            c.backend.guest_kernel = q.guest_kernel.clone();
        }
        if q.guest_rootfs.is_some() {
            c.backend.guest_rootfs = q.guest_rootfs.clone();
        }
        if explicit.has("guest_cache") {
            c.backend.guest_cache = q.guest_cache.clone();
        }
        if explicit.has("qemu_accel") {
            c.backend.qemu_accel = q.qemu_accel.clone();
        }
        if explicit.has("qemu_bin") {
            c.backend.qemu_bin = q.qemu_bin.clone();
        }
        if explicit.has("vhost_vsock_bin") {
            c.backend.vhost_vsock_bin = q.vhost_vsock_bin.clone();
        }
        args.amqp.apply(&mut c.amqp);
        c.check()?;
        Ok(c)
    }

    /// Refuses values that cannot work, naming the key.
    pub fn check(&self) -> anyhow::Result<()> {
        self.bind_addr()?;
        self.backend_kind()?;
        let s = &self.scheduler;
        anyhow::ensure!(
            s.max_running >= 1,
            "scheduler.max_running is 0: set it to at least 1"
        );
        anyhow::ensure!(
            s.results_max >= 1,
            "scheduler.results_max is 0: set it to at least 1"
        );
        anyhow::ensure!(
            self.pool.max_idle_age_s >= 1,
            "pool.max_idle_age_s is 0: set it to at least 1"
        );
        anyhow::ensure!(
            self.pool.max_uses >= 1,
            "pool.max_uses is 0: set it to at least 1 (1 makes a new sandbox for every job)"
        );
        anyhow::ensure!(
            self.server.max_body_bytes >= 1024,
            "server.max_body_bytes is below 1024: jobs could not be submitted"
        );
        anyhow::ensure!(
            self.sandboxes.default_ttl_s >= 1
                && self.sandboxes.default_ttl_s <= self.sandboxes.max_ttl_s,
            "sandboxes.default_ttl_s must be between 1 and sandboxes.max_ttl_s ({})",
            self.sandboxes.max_ttl_s
        );
        self.amqp.check()?;
        Ok(())
    }

    pub fn bind_addr(&self) -> anyhow::Result<SocketAddr> {
        self.server.bind.parse().with_context(|| {
            format!(
                "server.bind {:?} is not an address and port, e.g. 127.0.0.1:8080",
                self.server.bind
            )
        })
    }

    /// The effective config as TOML, with the token redacted.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        if !shown.server.token.is_empty() {
            shown.server.token = "<redacted>".into();
        }
        shown.amqp.url = shown.amqp.redacted_url();
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render the config: {e}\n"))
    }

    /// The backend flags `crate::backend` builds the jail backend from.
    pub fn backend_args(&self) -> BackendArgs {
        BackendArgs {
            agent: self.backend.agent.clone(),
            state_dir: self.backend.state_dir.clone(),
            runtimes: self.backend.runtimes.clone(),
            rootfs: self.backend.rootfs.clone(),
            cgroup_parent: self.backend.cgroup_parent.clone(),
        }
    }

    /// `backend.kind` as the backend module's enum.
    pub fn backend_kind(&self) -> anyhow::Result<BackendKind> {
        use clap::ValueEnum as _;
        BackendKind::from_str(&self.backend.kind, true).map_err(|_| {
            anyhow::anyhow!(
                "backend.kind {:?} is not a backend; use \"jail\" or \"qemu\"",
                self.backend.kind
            )
        })
    }

    /// The qemu backend's flags.
    pub fn qemu_args(&self) -> QemuArgs {
        let b = &self.backend;
        QemuArgs {
            guest_kernel: b.guest_kernel.clone(),
            guest_rootfs: b.guest_rootfs.clone(),
            guest_cache: b.guest_cache.clone(),
            qemu_accel: b.qemu_accel.clone(),
            qemu_bin: b.qemu_bin.clone(),
            vhost_vsock_bin: b.vhost_vsock_bin.clone(),
        }
    }

    pub fn drain_grace(&self) -> Duration {
        Duration::from_secs(self.server.drain_grace_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let c = Config::default();
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        c.check().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = toml::from_str::<Config>("[server]\nbnd = '1'\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bnd"), "{e}");
    }

    #[test]
    fn a_file_sets_only_what_it_names() {
        let c: Config = toml::from_str("[scheduler]\nqueue_depth = 3\n").unwrap();
        assert_eq!(c.scheduler.queue_depth, 3);
        assert_eq!(c.scheduler.max_running, Scheduler::default().max_running);
    }
}

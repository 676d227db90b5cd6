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

use kiln_sandbox::{BackendFlags, BackendSettings};

/// The whole configuration. Every section refuses keys it does not know;
/// the sandbox backends' sections (`[backend]`, `[jail]`, `[guest]`, ...)
/// belong to `kiln_sandbox::BackendSettings`, and [`Config::from_toml`]
/// refuses unknown sections.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub server: Server,
    pub scheduler: Scheduler,
    pub pool: PoolConfig,
    pub sandboxes: Sandboxes,
    #[serde(flatten)]
    pub backends: BackendSettings,
    pub amqp: crate::amqp::AmqpConfig,
}

/// The sections of the executor's own.
const SECTIONS: [&str; 5] = ["server", "scheduler", "pool", "sandboxes", "amqp"];

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
    #[command(flatten)]
    pub backend: BackendFlags,
    #[command(flatten)]
    pub amqp: crate::amqp::AmqpArgs,
}

impl Config {
    /// Parses a configuration file, refusing sections nobody knows.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let table: toml::Table = toml::from_str(text)?;
        for key in table.keys() {
            let known = SECTIONS.contains(&key.as_str())
                || BackendSettings::SECTIONS.contains(&key.as_str());
            anyhow::ensure!(
                known,
                "unknown section [{key}]; the sections are {}",
                SECTIONS
                    .iter()
                    .chain(BackendSettings::SECTIONS.iter())
                    .map(|s| format!("[{s}]"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(table.try_into()?)
    }

    /// The file (if any) overlaid by flags and environment.
    pub fn load(args: &ServeArgs) -> anyhow::Result<Self> {
        let mut c = match &args.config {
            None => Config::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading the config file {}", p.display()))?;
                Self::from_toml(&text)
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
        args.backend.apply(&mut c.backends);
        args.amqp.apply(&mut c.amqp);
        c.check()?;
        Ok(c)
    }

    /// Refuses values that cannot work, naming the key.
    pub fn check(&self) -> anyhow::Result<()> {
        self.bind_addr()?;
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
        let back = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        c.check().unwrap();
    }

    #[test]
    fn unknown_keys_and_sections_are_refused_by_name() {
        let e = format!(
            "{:#}",
            Config::from_toml("[server]\nbnd = '1'\n").unwrap_err()
        );
        assert!(e.contains("bnd"), "{e}");
        let e = format!(
            "{:#}",
            Config::from_toml("[qemu]\nbinn = 'q'\n").unwrap_err()
        );
        assert!(e.contains("binn"), "{e}");
        let e = format!(
            "{:#}",
            Config::from_toml("[sever]\nbind = '1'\n").unwrap_err()
        );
        assert!(e.contains("[sever]") && e.contains("[server]"), "{e}");
    }

    #[test]
    fn a_file_sets_only_what_it_names() {
        let c = Config::from_toml("[scheduler]\nqueue_depth = 3\n").unwrap();
        assert_eq!(c.scheduler.queue_depth, 3);
        assert_eq!(c.scheduler.max_running, Scheduler::default().max_running);
    }
}

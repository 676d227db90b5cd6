//! Choosing and configuring the sandbox backend from flags and `KILN_*`
//! environment variables, and finding the files it needs (the agent binary,
//! the runtime table).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Args;
use kiln_protocol::RuntimeTable;
use kiln_sandbox::jail::{JailBackend, JailConfig, RootFs};

/// Backend settings shared by every subcommand that makes sandboxes.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// The kiln-agent binary [default: next to the kiln binary].
    #[arg(long, env = "KILN_AGENT", value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Where sandbox records are kept (for reaping after a crash).
    #[arg(
        long,
        env = "KILN_STATE_DIR",
        value_name = "DIR",
        default_value = "/run/kiln"
    )]
    pub state_dir: PathBuf,
    /// A TOML runtime table replacing the built-in one.
    #[arg(long, env = "KILN_RUNTIMES", value_name = "FILE")]
    pub runtimes: Option<PathBuf>,
    /// A template root directory instead of the host's system directories.
    #[arg(long, env = "KILN_ROOTFS", value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    /// Name of the parent cgroup of all sandboxes.
    #[arg(
        long,
        env = "KILN_CGROUP_PARENT",
        value_name = "NAME",
        default_value = "kiln"
    )]
    pub cgroup_parent: String,
}

/// The runtime table from `--runtimes`, or the built-in one.
pub fn runtime_table(args: &BackendArgs) -> anyhow::Result<RuntimeTable> {
    match &args.runtimes {
        None => Ok(RuntimeTable::default()),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the runtime table {}", p.display()))?;
            RuntimeTable::from_toml(&text).with_context(|| format!("in {}", p.display()))
        }
    }
}

/// Finds `kiln-agent`: the flag, else beside our own executable (also one
/// directory up, for test binaries in `target/*/deps`).
fn agent_path(args: &BackendArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.agent {
        if !p.is_file() {
            bail!(
                "the agent binary {} does not exist (from --agent / KILN_AGENT)",
                p.display()
            );
        }
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().context("locating the kiln binary")?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let p = d.join("kiln-agent");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "kiln-agent was not found next to {}; build it (`cargo build --bins`) or pass --agent / KILN_AGENT",
        exe.display()
    )
}

/// Builds the jail backend (the only backend so far) and reaps what crashed
/// processes left behind.
pub fn jail(args: &BackendArgs, runtimes: RuntimeTable) -> anyhow::Result<JailBackend> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the jail backend needs root (user namespaces with id ranges, cgroups)");
    }
    let mut cfg = JailConfig::new(agent_path(args)?, runtimes);
    cfg.state_dir = args.state_dir.clone();
    cfg.cgroup_parent = args.cgroup_parent.clone();
    if let Some(r) = &args.rootfs {
        cfg.rootfs = RootFs::Dir(r.clone());
    }
    let backend = JailBackend::new(cfg).context("setting up the jail backend")?;
    let report = kiln_sandbox::Backend::reap_orphans(&backend);
    if !report.reaped.is_empty() {
        tracing::info!(
            count = report.reaped.len(),
            "reaped sandboxes left by crashed kiln processes"
        );
    }
    for f in &report.failed {
        tracing::warn!("could not reap: {f}");
    }
    Ok(backend)
}

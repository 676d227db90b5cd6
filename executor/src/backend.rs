//! Choosing and configuring the sandbox backend from flags and `KILN_*`
//! environment variables, and finding the files it needs (the agent binary,
//! the runtime table).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use kiln_protocol::RuntimeTable;
use kiln_sandbox::jail::{JailBackend, JailConfig, RootFs};
use kiln_sandbox::qemu::{AccelChoice, QemuBackend, QemuConfig};
use kiln_sandbox::AnyBackend;

/// Which sandbox backend runs jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum BackendKind {
    /// Linux namespaces, cgroups and seccomp (no VM).
    #[default]
    Jail,
    /// A QEMU microVM per sandbox (KVM when usable, else TCG).
    Qemu,
}

/// Settings of the qemu backend.
#[derive(Debug, Clone, Args)]
pub struct QemuArgs {
    /// Guest kernel (PVH vmlinux) [default: newest in $KILN_GUEST_CACHE].
    #[arg(long, env = "KILN_GUEST_KERNEL", value_name = "PATH")]
    pub guest_kernel: Option<PathBuf>,
    /// Guest root image (ext4) [default: newest in $KILN_GUEST_CACHE].
    #[arg(long, env = "KILN_GUEST_ROOTFS", value_name = "PATH")]
    pub guest_rootfs: Option<PathBuf>,
    /// Where deploy/guest/build-*.sh cache the kernel and image.
    #[arg(
        long,
        env = "KILN_GUEST_CACHE",
        value_name = "DIR",
        default_value = "/var/cache/kiln/guest"
    )]
    pub guest_cache: PathBuf,
    /// Accelerator: auto (KVM when usable, else TCG), kvm or tcg.
    #[arg(
        long,
        env = "KILN_QEMU_ACCEL",
        value_name = "ACCEL",
        default_value = "auto"
    )]
    pub qemu_accel: String,
    /// The QEMU binary.
    #[arg(
        long,
        env = "KILN_QEMU_BIN",
        value_name = "PATH",
        default_value = "qemu-system-x86_64"
    )]
    pub qemu_bin: PathBuf,
    /// The vhost-device-vsock binary.
    #[arg(
        long,
        env = "KILN_VHOST_VSOCK_BIN",
        value_name = "PATH",
        default_value = "vhost-device-vsock"
    )]
    pub vhost_vsock_bin: PathBuf,
}

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

/// The newest `<prefix>*/<file>` in the guest cache, as the build scripts
/// leave them.
fn newest_in_cache(cache: &Path, prefix: &str, file: &str) -> Option<PathBuf> {
    std::fs::read_dir(cache)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path().join(file))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

/// Builds the qemu backend and reaps the VMs crashed processes left.
pub fn qemu(
    args: &BackendArgs,
    q: &QemuArgs,
    runtimes: RuntimeTable,
) -> anyhow::Result<QemuBackend> {
    let pick = |given: &Option<PathBuf>, prefix: &str, file: &str, flag: &str, script: &str| {
        given
            .clone()
            .or_else(|| newest_in_cache(&q.guest_cache, prefix, file))
            .with_context(|| {
                format!(
                    "no guest {file} in {}: build it with deploy/guest/{script}, or pass {flag}",
                    q.guest_cache.display()
                )
            })
    };
    let kernel = pick(
        &q.guest_kernel,
        "kernel-",
        "vmlinux",
        "--guest-kernel / KILN_GUEST_KERNEL",
        "build-kernel.sh",
    )?;
    let rootfs = pick(
        &q.guest_rootfs,
        "rootfs-",
        "rootfs.ext4",
        "--guest-rootfs / KILN_GUEST_ROOTFS",
        "build-rootfs.sh",
    )?;
    let mut cfg = QemuConfig::new(kernel, rootfs, runtimes);
    cfg.accel = q
        .qemu_accel
        .parse::<AccelChoice>()
        .map_err(|e| anyhow::anyhow!("--qemu-accel / KILN_QEMU_ACCEL: {e}"))?;
    cfg.qemu = q.qemu_bin.clone();
    cfg.vhost_vsock = q.vhost_vsock_bin.clone();
    cfg.state_dir = args.state_dir.clone();
    let backend = QemuBackend::new(cfg).context("setting up the qemu backend")?;
    tracing::info!(accel = backend.accel().as_str(), "qemu backend ready");
    log_reaped(&kiln_sandbox::Backend::reap_orphans(&backend));
    Ok(backend)
}

/// The backend `kind` names.
pub fn any(
    kind: BackendKind,
    args: &BackendArgs,
    q: &QemuArgs,
    runtimes: RuntimeTable,
) -> anyhow::Result<AnyBackend> {
    Ok(match kind {
        BackendKind::Jail => jail(args, runtimes)?.into(),
        BackendKind::Qemu => qemu(args, q, runtimes)?.into(),
    })
}

fn log_reaped(report: &kiln_sandbox::ReapReport) {
    if !report.reaped.is_empty() {
        tracing::info!(
            count = report.reaped.len(),
            "reaped sandboxes left by crashed kiln processes"
        );
    }
    for f in &report.failed {
        tracing::warn!("could not reap: {f}");
    }
}

/// Builds the jail backend and reaps what crashed processes left behind.
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
    log_reaped(&kiln_sandbox::Backend::reap_orphans(&backend));
    Ok(backend)
}

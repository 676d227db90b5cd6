//! Choosing and configuring the backend: the settings of every backend as
//! TOML sections (`[backend]` for what all share, then one per backend or
//! family), the flags and `KILN_*` variables that override them, opening the
//! configured backend, and reaping what crashed processes of *every*
//! backend left. The executor embeds these as they are, so that a new
//! backend adds its settings here and nothing in the executor changes.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use kiln_protocol::RuntimeTable;
use serde::{Deserialize, Serialize};

use crate::jail::{CgroupLayout, JailBackend, JailConfig, RootFs};
use crate::qemu::{AccelChoice, QemuBackend, QemuConfig};
use crate::record::Owner;
use crate::vm::{image, GuestImage};
use crate::{AnyBackend, ReapReport, SandboxError};

/// Which sandbox backend runs jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Linux namespaces, cgroups and seccomp (no VM).
    #[default]
    Jail,
    /// A QEMU microVM per sandbox (KVM when usable, else TCG).
    Qemu,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Jail => "jail",
            BackendKind::Qemu => "qemu",
        }
    }
}

/// `[backend]`: what every backend uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Common {
    /// Which backend makes sandboxes.
    pub kind: BackendKind,
    /// The kiln-agent binary; default: next to the kiln binary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<PathBuf>,
    /// Where sandbox records are kept (for reaping after a crash).
    pub state_dir: PathBuf,
    /// A TOML runtime table replacing the built-in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtimes: Option<PathBuf>,
    /// Name of the parent cgroup of all sandboxes.
    pub cgroup_parent: String,
}

impl Default for Common {
    fn default() -> Self {
        Self {
            kind: BackendKind::Jail,
            agent: None,
            state_dir: PathBuf::from("/run/kiln"),
            runtimes: None,
            cgroup_parent: "kiln".into(),
        }
    }
}

/// `[jail]`: the jail backend.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailSettings {
    /// A template root directory instead of the host's system directories.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<PathBuf>,
}

/// `[guest]`: the guest of every microVM backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestSettings {
    /// Guest kernel (`vmlinux`); default: the newest in `cache`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Guest root image (ext4); default: the newest in `cache`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<PathBuf>,
    /// Where `deploy/guest/build-*.sh` cache kernels and images.
    pub cache: PathBuf,
}

impl Default for GuestSettings {
    fn default() -> Self {
        Self {
            kernel: None,
            rootfs: None,
            cache: PathBuf::from(image::DEFAULT_CACHE),
        }
    }
}

/// `[qemu]`: the qemu backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuSettings {
    /// Accelerator: `auto` (KVM when usable, else TCG), `kvm` or `tcg`.
    pub accel: String,
    /// The QEMU binary, by path or by name on `PATH`.
    pub bin: PathBuf,
    /// The vhost-device-vsock binary, by path or by name on `PATH`.
    pub vhost_vsock_bin: PathBuf,
}

impl Default for QemuSettings {
    fn default() -> Self {
        Self {
            accel: "auto".into(),
            bin: PathBuf::from("qemu-system-x86_64"),
            vhost_vsock_bin: PathBuf::from("vhost-device-vsock"),
        }
    }
}

/// How a restore loads the template's guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryMode {
    /// Every page on its first touch (Kiln's page server, userfaultfd).
    Lazy,
    /// The template's recorded working set installed at once while the
    /// guest runs, the rest on first touch; the first restores record it.
    #[default]
    Prefetch,
    /// The VMM maps the memory file itself (Firecracker's `File` backend),
    /// for comparison.
    File,
}

/// `[snapshot]`: templates of the microVM backends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotSettings {
    /// Restore microVM sandboxes from templates (a guest booted once, its
    /// runtimes warmed, snapshotted) instead of booting each one.
    pub templates: bool,
    /// Where templates are kept.
    pub store: PathBuf,
    /// How a restore loads guest memory.
    pub memory: MemoryMode,
}

impl Default for SnapshotSettings {
    fn default() -> Self {
        Self {
            templates: true,
            store: PathBuf::from(crate::template::DEFAULT_STORE),
            memory: MemoryMode::Prefetch,
        }
    }
}

/// Every backend setting: the sections `[backend]`, `[jail]`, `[guest]`,
/// `[qemu]` and `[snapshot]` of the configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackendSettings {
    pub backend: Common,
    pub jail: JailSettings,
    pub guest: GuestSettings,
    pub qemu: QemuSettings,
    pub snapshot: SnapshotSettings,
}

impl BackendSettings {
    /// The top-level sections these settings own in a configuration file.
    pub const SECTIONS: [&'static str; 5] = ["backend", "jail", "guest", "qemu", "snapshot"];
}

/// The flags (and `KILN_*` variables) of every backend setting. Each one
/// given overrides the setting of the same meaning; defaults live in
/// [`BackendSettings`], so a flag left out never overrides a file.
#[derive(Debug, Clone, Default, Args)]
pub struct BackendFlags {
    /// backend.kind: jail (namespaces, cgroups, seccomp) or qemu (a microVM
    /// per sandbox) [default: jail]
    #[arg(
        long = "backend",
        env = "KILN_BACKEND",
        value_enum,
        value_name = "KIND"
    )]
    pub kind: Option<BackendKind>,
    /// backend.agent: the kiln-agent binary [default: next to the kiln binary]
    #[arg(long, env = "KILN_AGENT", value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// backend.state_dir: where sandbox records are kept, for reaping after
    /// a crash [default: /run/kiln]
    #[arg(long, env = "KILN_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// backend.runtimes: a TOML runtime table replacing the built-in one
    #[arg(long, env = "KILN_RUNTIMES", value_name = "FILE")]
    pub runtimes: Option<PathBuf>,
    /// backend.cgroup_parent: the parent cgroup of all sandboxes [default: kiln]
    #[arg(long, env = "KILN_CGROUP_PARENT", value_name = "NAME")]
    pub cgroup_parent: Option<String>,
    /// jail.rootfs: a template root directory instead of the host's system
    /// directories
    #[arg(long, env = "KILN_ROOTFS", value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    /// guest.kernel: the microVM guest kernel (vmlinux) [default: the newest
    /// in the guest cache]
    #[arg(long, env = "KILN_GUEST_KERNEL", value_name = "PATH")]
    pub guest_kernel: Option<PathBuf>,
    /// guest.rootfs: the microVM guest root image (ext4) [default: the
    /// newest in the guest cache]
    #[arg(long, env = "KILN_GUEST_ROOTFS", value_name = "PATH")]
    pub guest_rootfs: Option<PathBuf>,
    /// guest.cache: where deploy/guest/build-*.sh cache kernels and images
    /// [default: /var/cache/kiln/guest]
    #[arg(long, env = "KILN_GUEST_CACHE", value_name = "DIR")]
    pub guest_cache: Option<PathBuf>,
    /// qemu.accel: auto (KVM when usable, else TCG), kvm or tcg [default: auto]
    #[arg(long, env = "KILN_QEMU_ACCEL", value_name = "ACCEL")]
    pub qemu_accel: Option<String>,
    /// qemu.bin: the QEMU binary [default: qemu-system-x86_64]
    #[arg(long, env = "KILN_QEMU_BIN", value_name = "PATH")]
    pub qemu_bin: Option<PathBuf>,
    /// qemu.vhost_vsock_bin: the vhost-device-vsock binary [default:
    /// vhost-device-vsock]
    #[arg(long, env = "KILN_VHOST_VSOCK_BIN", value_name = "PATH")]
    pub vhost_vsock_bin: Option<PathBuf>,
    /// snapshot.templates: restore microVM sandboxes from templates instead
    /// of booting each [default: true]
    #[arg(long, env = "KILN_SNAPSHOT_TEMPLATES", value_name = "BOOL")]
    pub snapshot_templates: Option<bool>,
    /// snapshot.store: where templates are kept [default: /var/lib/kiln/templates]
    #[arg(long, env = "KILN_SNAPSHOT_STORE", value_name = "DIR")]
    pub snapshot_store: Option<PathBuf>,
    /// snapshot.memory: how a restore loads guest memory: lazy, prefetch or
    /// file [default: prefetch]
    #[arg(long, env = "KILN_SNAPSHOT_MEMORY", value_enum, value_name = "MODE")]
    pub snapshot_memory: Option<MemoryMode>,
}

impl BackendFlags {
    /// Overrides the settings these flags give.
    pub fn apply(&self, s: &mut BackendSettings) {
        fn over<T: Clone>(flag: &Option<T>, setting: &mut T) {
            if let Some(v) = flag {
                *setting = v.clone();
            }
        }
        fn over_opt<T: Clone>(flag: &Option<T>, setting: &mut Option<T>) {
            if flag.is_some() {
                setting.clone_from(flag);
            }
        }
        over(&self.kind, &mut s.backend.kind);
        over_opt(&self.agent, &mut s.backend.agent);
        over(&self.state_dir, &mut s.backend.state_dir);
        over_opt(&self.runtimes, &mut s.backend.runtimes);
        over(&self.cgroup_parent, &mut s.backend.cgroup_parent);
        over_opt(&self.rootfs, &mut s.jail.rootfs);
        over_opt(&self.guest_kernel, &mut s.guest.kernel);
        over_opt(&self.guest_rootfs, &mut s.guest.rootfs);
        over(&self.guest_cache, &mut s.guest.cache);
        over(&self.qemu_accel, &mut s.qemu.accel);
        over(&self.qemu_bin, &mut s.qemu.bin);
        over(&self.vhost_vsock_bin, &mut s.qemu.vhost_vsock_bin);
        over(&self.snapshot_templates, &mut s.snapshot.templates);
        over(&self.snapshot_store, &mut s.snapshot.store);
        over(&self.snapshot_memory, &mut s.snapshot.memory);
    }

    /// The default settings with these flags applied (no config file).
    pub fn settings(&self) -> BackendSettings {
        let mut s = BackendSettings::default();
        self.apply(&mut s);
        s
    }
}

/// Why the configured backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The runtime table file could not be read or parsed.
    #[error("the runtime table {path} (backend.runtimes / --runtimes / KILN_RUNTIMES): {reason}")]
    Runtimes { path: PathBuf, reason: String },
    /// The agent binary was not found.
    #[error("{0}")]
    Agent(String),
    /// The backend needs root.
    #[error("the {0} backend needs root (user namespaces with id ranges, cgroups)")]
    NotRoot(&'static str),
    /// A setting has a value the backend cannot use.
    #[error("{setting}: {reason}")]
    Setting {
        setting: &'static str,
        reason: String,
    },
    /// The guest image is missing.
    #[error(transparent)]
    Image(#[from] image::ImageError),
    /// The backend refused to start on this host.
    #[error("setting up the {backend} backend: {source}")]
    Backend {
        backend: &'static str,
        #[source]
        source: SandboxError,
    },
}

impl BackendSettings {
    /// The runtime table from `backend.runtimes`, or the built-in one.
    pub fn runtime_table(&self) -> Result<RuntimeTable, OpenError> {
        let Some(p) = &self.backend.runtimes else {
            return Ok(RuntimeTable::default());
        };
        let fail = |reason: String| OpenError::Runtimes {
            path: p.clone(),
            reason,
        };
        let text = std::fs::read_to_string(p).map_err(|e| fail(e.to_string()))?;
        RuntimeTable::from_toml(&text).map_err(|e| fail(e.to_string()))
    }

    /// Finds `kiln-agent`: the setting, else beside our own executable (also
    /// one directory up, for test binaries in `target/*/deps`).
    pub fn agent_path(&self) -> Result<PathBuf, OpenError> {
        if let Some(p) = &self.backend.agent {
            if !p.is_file() {
                return Err(OpenError::Agent(format!(
                    "the agent binary {} does not exist (backend.agent / --agent / KILN_AGENT)",
                    p.display()
                )));
            }
            return Ok(p.clone());
        }
        let exe = std::env::current_exe()
            .map_err(|e| OpenError::Agent(format!("locating our own binary: {e}")))?;
        let dir = exe.parent().unwrap_or(Path::new("/"));
        for d in [Some(dir), dir.parent()].into_iter().flatten() {
            let p = d.join("kiln-agent");
            if p.is_file() {
                return Ok(p);
            }
        }
        Err(OpenError::Agent(format!(
            "kiln-agent was not found next to {}; build it (`cargo build --bins`) or set backend.agent / --agent / KILN_AGENT",
            exe.display()
        )))
    }

    /// Opens the configured backend with `runtimes` and reaps what crashed
    /// processes left behind for it.
    pub fn open(&self, runtimes: RuntimeTable) -> Result<AnyBackend, OpenError> {
        let backend: AnyBackend = match self.backend.kind {
            BackendKind::Jail => self.jail(runtimes)?.into(),
            BackendKind::Qemu => self.qemu(runtimes)?.into(),
        };
        log_reaped(&crate::Backend::reap_orphans(&backend));
        Ok(backend)
    }

    fn jail(&self, runtimes: RuntimeTable) -> Result<JailBackend, OpenError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(OpenError::NotRoot("jail"));
        }
        let mut cfg = JailConfig::new(self.agent_path()?, runtimes);
        cfg.state_dir.clone_from(&self.backend.state_dir);
        cfg.cgroup_parent.clone_from(&self.backend.cgroup_parent);
        if let Some(r) = &self.jail.rootfs {
            cfg.rootfs = RootFs::Dir(r.clone());
        }
        JailBackend::new(cfg).map_err(|source| OpenError::Backend {
            backend: "jail",
            source,
        })
    }

    fn qemu(&self, runtimes: RuntimeTable) -> Result<QemuBackend, OpenError> {
        let img = GuestImage::find(
            self.guest.kernel.as_deref(),
            self.guest.rootfs.as_deref(),
            &self.guest.cache,
        )?;
        let mut cfg = QemuConfig::new(img.kernel, img.rootfs, runtimes);
        cfg.accel =
            self.qemu
                .accel
                .parse::<AccelChoice>()
                .map_err(|reason| OpenError::Setting {
                    setting: "qemu.accel / --qemu-accel / KILN_QEMU_ACCEL",
                    reason,
                })?;
        cfg.qemu.clone_from(&self.qemu.bin);
        cfg.vhost_vsock.clone_from(&self.qemu.vhost_vsock_bin);
        cfg.state_dir.clone_from(&self.backend.state_dir);
        cfg.templates = self.snapshot.templates.then(|| self.snapshot.store.clone());
        let backend = QemuBackend::new(cfg).map_err(|source| OpenError::Backend {
            backend: "qemu",
            source,
        })?;
        tracing::info!(accel = backend.accel().as_str(), "qemu backend ready");
        Ok(backend)
    }

    /// Destroys what crashed processes of any backend left under the state
    /// directory. Needs no agent and no guest image, so it runs on any host
    /// (`kiln reap`).
    pub fn reap_all(&self) -> ReapReport {
        let state = &self.backend.state_dir;
        let me = Owner::current().unwrap_or(Owner { pid: 0, start: 0 });
        let mut report = ReapReport::default();
        match CgroupLayout::detect(Path::new("/sys/fs/cgroup")) {
            Ok(layout) => report.extend(crate::jail::reap_jails(state, &layout, me)),
            Err(e) => report.failed.push(format!("jails: {e}")),
        }
        report.extend(crate::qemu::reap_orphans_in(state));
        report
    }
}

fn log_reaped(report: &ReapReport) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: BackendFlags,
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let s = BackendSettings::default();
        let text = toml::to_string(&s).unwrap();
        assert_eq!(toml::from_str::<BackendSettings>(&text).unwrap(), s);
    }

    #[test]
    fn a_flag_overrides_only_its_own_setting() {
        let mut s: BackendSettings = toml::from_str(
            "[backend]\nkind = \"qemu\"\nstate_dir = \"/srv/k\"\n[qemu]\naccel = \"tcg\"\n",
        )
        .unwrap();
        let cli = Cli::parse_from(["x", "--qemu-bin", "/opt/qemu"]);
        cli.flags.apply(&mut s);
        assert_eq!(s.backend.kind, BackendKind::Qemu);
        assert_eq!(s.backend.state_dir, Path::new("/srv/k"));
        assert_eq!(s.qemu.accel, "tcg");
        assert_eq!(s.qemu.bin, Path::new("/opt/qemu"));
    }

    #[test]
    fn unknown_keys_and_kinds_are_refused_by_name() {
        let e = toml::from_str::<BackendSettings>("[qemu]\nacel = \"tcg\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("acel"), "{e}");
        let e = toml::from_str::<BackendSettings>("[backend]\nkind = \"xen\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("xen") && e.contains("jail"), "{e}");
    }

    #[test]
    fn a_bad_accelerator_names_its_setting() {
        let mut s = BackendSettings::default();
        s.qemu.accel = "hvf".into();
        s.guest.kernel = Some("/proc/self/exe".into());
        s.guest.rootfs = Some("/proc/self/exe".into());
        let Err(e) = s.qemu(RuntimeTable::default()) else {
            panic!("hvf was accepted");
        };
        let e = e.to_string();
        assert!(e.contains("qemu.accel") && e.contains("hvf"), "{e}");
    }
}

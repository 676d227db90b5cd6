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

use crate::firecracker::{
    FirecrackerBackend, FirecrackerBackendConfig, FirecrackerConfig, IdRange, JailerConfig,
};
use crate::jail::{CgroupLayout, JailBackend, JailConfig, RootFs};
pub use crate::network::NetworkSettings;
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
    /// A Firecracker microVM per sandbox (needs KVM), restored from
    /// templates through Kiln's page server.
    Firecracker,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Jail => "jail",
            BackendKind::Qemu => "qemu",
            BackendKind::Firecracker => "firecracker",
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

/// `[firecracker]`: the Firecracker backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirecrackerSettings {
    /// The Firecracker binary, by path or by name on `PATH`.
    pub bin: PathBuf,
    /// The jailer binary, by path or by name on `PATH`.
    pub jailer_bin: PathBuf,
    /// Run each VMM under the jailer (chroot, a uid of its own, cgroups,
    /// pid and network namespaces); `false` runs it as Kiln's child.
    pub jailed: bool,
    /// The jailer's chroot base (must exist, on the filesystem of the guest
    /// image and the template store, whose files are hard-linked in).
    pub chroot_base: PathBuf,
    /// First uid (and gid) handed to jailed VMMs, one per live sandbox.
    pub uid_first: u32,
    /// How many uids from `uid_first` on.
    pub uid_count: u32,
    /// Parent cgroup of the jailed VMMs' cgroups.
    pub cgroup_parent: String,
}

impl Default for FirecrackerSettings {
    fn default() -> Self {
        let jail = JailerConfig::default();
        Self {
            bin: PathBuf::from("firecracker"),
            jailer_bin: PathBuf::from("jailer"),
            jailed: true,
            chroot_base: jail.chroot_base,
            uid_first: jail.ids.first,
            uid_count: jail.ids.count,
            cgroup_parent: jail.parent_cgroup,
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

/// `[images]`: the store of OCI images sandboxes can be rooted in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesSettings {
    /// Where images (blobs, index, unpacked roots) are kept; persistent,
    /// unlike `backend.state_dir`.
    pub dir: PathBuf,
    /// The images jobs and sandboxes may name: stored names, name
    /// prefixes ending in `*`, or manifest digests; empty: any stored
    /// image.
    pub allowed: Vec<String>,
    /// Runtime name -> the image its jobs and sandboxes get when they name
    /// none; a runtime not listed keeps the backend's own root.
    pub defaults: std::collections::BTreeMap<String, String>,
    /// Pull an image a job or sandbox names that is not stored yet, when
    /// `allowed` lists it (by name or `prefix*`; with `allowed` empty,
    /// nothing is pulled). The job waits for the pull without holding a
    /// run slot; other jobs go on.
    pub pull_on_use: bool,
    /// Those pulls may use plain HTTP (registries on loopback only).
    pub pull_insecure: bool,
    /// A pull on first use that takes longer is given up (seconds).
    pub pull_timeout_s: u64,
    /// The largest archive `POST /v1/images/import` takes, in MiB.
    pub import_max_mb: u64,
}

impl Default for ImagesSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/kiln/images"),
            allowed: Vec::new(),
            defaults: std::collections::BTreeMap::new(),
            pull_on_use: false,
            pull_insecure: false,
            pull_timeout_s: 600,
            import_max_mb: 4096,
        }
    }
}

/// Every backend setting: the sections `[backend]`, `[jail]`, `[guest]`,
/// `[qemu]`, `[firecracker]`, `[snapshot]`, `[images]` and `[network]` of the
/// configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackendSettings {
    pub backend: Common,
    pub jail: JailSettings,
    pub guest: GuestSettings,
    pub qemu: QemuSettings,
    pub firecracker: FirecrackerSettings,
    pub snapshot: SnapshotSettings,
    pub images: ImagesSettings,
    pub network: NetworkSettings,
}

impl BackendSettings {
    /// The top-level sections these settings own in a configuration file.
    pub const SECTIONS: [&'static str; 8] = [
        "backend",
        "jail",
        "guest",
        "qemu",
        "firecracker",
        "snapshot",
        "images",
        "network",
    ];
}

/// The flags (and `KILN_*` variables) of every backend setting. Each one
/// given overrides the setting of the same meaning; defaults live in
/// [`BackendSettings`], so a flag left out never overrides a file.
#[derive(Debug, Clone, Default, Args)]
pub struct BackendFlags {
    /// backend.kind: jail (namespaces, cgroups, seccomp), qemu or
    /// firecracker (a microVM per sandbox) [default: jail]
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
    /// images.dir: where OCI images are stored [default: /var/lib/kiln/images]
    #[arg(long, env = "KILN_IMAGES_DIR", value_name = "DIR")]
    pub images_dir: Option<PathBuf>,
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
    /// firecracker.bin: the Firecracker binary [default: firecracker]
    #[arg(long, env = "KILN_FIRECRACKER_BIN", value_name = "PATH")]
    pub firecracker_bin: Option<PathBuf>,
    /// firecracker.jailer_bin: the jailer binary [default: jailer]
    #[arg(long, env = "KILN_JAILER_BIN", value_name = "PATH")]
    pub jailer_bin: Option<PathBuf>,
    /// firecracker.jailed: run each VMM under the jailer [default: true]
    #[arg(long, env = "KILN_FIRECRACKER_JAILED", value_name = "BOOL")]
    pub firecracker_jailed: Option<bool>,
    /// firecracker.chroot_base: the jailer's chroot base [default: /srv/jailer]
    #[arg(long, env = "KILN_FIRECRACKER_CHROOT_BASE", value_name = "DIR")]
    pub firecracker_chroot_base: Option<PathBuf>,
    /// firecracker.uid_first: the first uid (and gid) of jailed VMMs
    /// [default: 900000]
    #[arg(long, env = "KILN_FIRECRACKER_UID_FIRST", value_name = "UID")]
    pub firecracker_uid_first: Option<u32>,
    /// firecracker.uid_count: how many uids jailed VMMs may use [default: 10000]
    #[arg(long, env = "KILN_FIRECRACKER_UID_COUNT", value_name = "N")]
    pub firecracker_uid_count: Option<u32>,
    /// firecracker.cgroup_parent: the parent cgroup of jailed VMMs
    /// [default: kiln-firecracker]
    #[arg(long, env = "KILN_FIRECRACKER_CGROUP_PARENT", value_name = "NAME")]
    pub firecracker_cgroup_parent: Option<String>,
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
        over(&self.images_dir, &mut s.images.dir);
        over_opt(&self.guest_kernel, &mut s.guest.kernel);
        over_opt(&self.guest_rootfs, &mut s.guest.rootfs);
        over(&self.guest_cache, &mut s.guest.cache);
        over(&self.qemu_accel, &mut s.qemu.accel);
        over(&self.qemu_bin, &mut s.qemu.bin);
        over(&self.vhost_vsock_bin, &mut s.qemu.vhost_vsock_bin);
        over(&self.firecracker_bin, &mut s.firecracker.bin);
        over(&self.jailer_bin, &mut s.firecracker.jailer_bin);
        over(&self.firecracker_jailed, &mut s.firecracker.jailed);
        over(
            &self.firecracker_chroot_base,
            &mut s.firecracker.chroot_base,
        );
        over(&self.firecracker_uid_first, &mut s.firecracker.uid_first);
        over(&self.firecracker_uid_count, &mut s.firecracker.uid_count);
        over(
            &self.firecracker_cgroup_parent,
            &mut s.firecracker.cgroup_parent,
        );
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
    /// Firecracker cannot run here as configured (the message names the
    /// setting).
    #[error(transparent)]
    Firecracker(#[from] crate::firecracker::SetupError),
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
            BackendKind::Firecracker => self.firecracker(runtimes)?.into(),
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
        cfg.network = Some(self.network.clone());
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
        cfg.network = Some(self.network.clone());
        let backend = QemuBackend::new(cfg).map_err(|source| OpenError::Backend {
            backend: "qemu",
            source,
        })?;
        tracing::info!(accel = backend.accel().as_str(), "qemu backend ready");
        Ok(backend)
    }

    /// The Firecracker backend's settings as the backend takes them, before
    /// anything of the host is checked.
    pub fn firecracker_config(
        &self,
        runtimes: RuntimeTable,
    ) -> Result<FirecrackerBackendConfig, OpenError> {
        let f = &self.firecracker;
        let ids = IdRange {
            first: f.uid_first,
            count: f.uid_count,
        };
        if f.jailed {
            let fits = u64::from(f.uid_first) + u64::from(f.uid_count) <= u64::from(u32::MAX);
            if f.uid_first == 0 || f.uid_count == 0 || !fits {
                return Err(OpenError::Setting {
                    setting: "firecracker.uid_first / firecracker.uid_count (--firecracker-uid-first, --firecracker-uid-count)",
                    reason: format!(
                        "{} uids from {} is not a range of unprivileged ids: the first must be above 0 (root), the count above 0, and the range must end below 2^32",
                        f.uid_count, f.uid_first
                    ),
                });
            }
            if f.cgroup_parent.is_empty() || f.cgroup_parent.contains("..") {
                return Err(OpenError::Setting {
                    setting: "firecracker.cgroup_parent / --firecracker-cgroup-parent / KILN_FIRECRACKER_CGROUP_PARENT",
                    reason: format!(
                        "{:?} is not a cgroup name (e.g. kiln-firecracker)",
                        f.cgroup_parent
                    ),
                });
            }
        }
        let img = GuestImage::find(
            self.guest.kernel.as_deref(),
            self.guest.rootfs.as_deref(),
            &self.guest.cache,
        )?;
        let mut vmm = FirecrackerConfig::from_env();
        vmm.firecracker_bin.clone_from(&f.bin);
        vmm.jailer_bin.clone_from(&f.jailer_bin);
        vmm.state_dir.clone_from(&self.backend.state_dir);
        vmm.jailer = f.jailed.then(|| JailerConfig {
            chroot_base: f.chroot_base.clone(),
            ids,
            parent_cgroup: f.cgroup_parent.clone(),
            ..JailerConfig::default()
        });
        let mut cfg = FirecrackerBackendConfig::new(vmm, img.kernel, img.rootfs, runtimes);
        cfg.templates = self.snapshot.templates.then(|| self.snapshot.store.clone());
        cfg.memory = self.snapshot.memory;
        cfg.network = Some(self.network.clone());
        Ok(cfg)
    }

    fn firecracker(&self, runtimes: RuntimeTable) -> Result<FirecrackerBackend, OpenError> {
        // SAFETY: geteuid has no preconditions.
        if self.firecracker.jailed && unsafe { libc::geteuid() } != 0 {
            return Err(OpenError::NotRoot("firecracker"));
        }
        let cfg = self.firecracker_config(runtimes)?;
        let backend = FirecrackerBackend::new(cfg)?;
        tracing::info!(
            jailed = self.firecracker.jailed,
            templates = self.snapshot.templates,
            "firecracker backend ready"
        );
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
        match crate::network::reap(state) {
            Ok(gone) => report
                .reaped
                .extend(gone.into_iter().map(|s| format!("network of {s}"))),
            // A live Kiln manages them: nothing of theirs is an orphan.
            Err(crate::network::NetworkError::Locked(_)) => {}
            Err(e) => report.failed.push(format!("networks: {e}")),
        }
        report.extend(crate::qemu::reap_orphans_in(state));
        report.extend(crate::firecracker::reap_orphans(state));
        report.extend(crate::firecracker::reap_page_sockets(
            state,
            Some(&self.firecracker.chroot_base),
        ));
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

    /// Settings for the firecracker backend whose host checks can run
    /// anywhere: binaries that exist (`/bin/true`), the guest files given.
    fn firecracker_settings(dir: &Path) -> BackendSettings {
        let mut s = BackendSettings::default();
        s.backend.kind = BackendKind::Firecracker;
        s.backend.state_dir = dir.join("state");
        s.guest.kernel = Some("/proc/self/exe".into());
        s.guest.rootfs = Some("/proc/self/exe".into());
        s.firecracker.bin = "/bin/true".into();
        s.firecracker.jailer_bin = "/bin/true".into();
        s.firecracker.chroot_base = dir.join("jail");
        s.snapshot.store = dir.join("store");
        s
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-settings-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn open_error(s: &BackendSettings) -> String {
        match s.open(RuntimeTable::default()) {
            Ok(_) => panic!("the firecracker backend opened with {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn firecracker_settings_come_from_the_file_and_flags_override_them() {
        let mut s: BackendSettings = toml::from_str(
            "[backend]\nkind = \"firecracker\"\n[firecracker]\nbin = \"/opt/fc/firecracker\"\njailed = false\nuid_first = 5000\n",
        )
        .unwrap();
        assert_eq!(s.backend.kind, BackendKind::Firecracker);
        assert_eq!(s.firecracker.bin, Path::new("/opt/fc/firecracker"));
        assert!(!s.firecracker.jailed);
        assert_eq!(s.firecracker.uid_count, 10_000, "default kept");
        let cli = Cli::parse_from([
            "x",
            "--jailer-bin",
            "/opt/fc/jailer",
            "--firecracker-jailed",
            "true",
            "--firecracker-uid-count",
            "7",
        ]);
        cli.flags.apply(&mut s);
        assert_eq!(s.firecracker.jailer_bin, Path::new("/opt/fc/jailer"));
        assert!(s.firecracker.jailed);
        assert_eq!(
            (s.firecracker.uid_first, s.firecracker.uid_count),
            (5000, 7)
        );
        // The variable wins over the file (scripts/test.sh sets it); else
        // the file's value stays.
        let bin = std::env::var_os("KILN_FIRECRACKER_BIN")
            .map_or_else(|| PathBuf::from("/opt/fc/firecracker"), PathBuf::from);
        assert_eq!(s.firecracker.bin, bin);
        let e = toml::from_str::<BackendSettings>("[firecracker]\njailer = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("jailer") && e.contains("jailed"), "{e}");
    }

    #[test]
    fn a_missing_firecracker_or_jailer_stops_the_start_naming_its_setting() {
        let dir = scratch("fc-missing");
        let mut s = firecracker_settings(&dir);
        s.firecracker.bin = dir.join("no-firecracker");
        let e = open_error(&s);
        assert!(
            e.contains("firecracker.bin")
                && e.contains("KILN_FIRECRACKER_BIN")
                && e.contains("no-firecracker"),
            "{e}"
        );
        s.firecracker.bin = "/bin/true".into();
        s.firecracker.jailer_bin = "no-such-jailer-on-path".into();
        let e = open_error(&s);
        assert!(
            e.contains("firecracker.jailer_bin") && e.contains("KILN_JAILER_BIN"),
            "{e}"
        );
        assert!(
            !s.backend.state_dir.join("firecracker").exists(),
            "a failed start creates nothing"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_firecracker_values_are_named() {
        let dir = scratch("fc-values");
        let mut s = firecracker_settings(&dir);
        s.firecracker.uid_first = 0;
        let e = open_error(&s);
        assert!(
            e.contains("firecracker.uid_first") && e.contains("root"),
            "{e}"
        );
        s.firecracker.uid_first = u32::MAX - 5;
        let e = open_error(&s);
        assert!(e.contains("2^32"), "{e}");
        s.firecracker.uid_first = 900_000;
        s.firecracker.cgroup_parent = "../escape".into();
        let e = open_error(&s);
        assert!(e.contains("firecracker.cgroup_parent"), "{e}");
        s.firecracker.cgroup_parent = "kiln-firecracker".into();
        s.guest.rootfs = Some(dir.join("no-rootfs.ext4"));
        let e = open_error(&s);
        assert!(
            e.contains("KILN_GUEST_ROOTFS") && e.contains("no-rootfs"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_kvm_or_a_chroot_base_on_the_guests_filesystem_firecracker_does_not_start() {
        let dir = scratch("fc-host");
        let mut s = firecracker_settings(&dir);
        match crate::firecracker::kvm_usable() {
            Err(_) => {
                // This host has no KVM: that is what the start says, naming
                // the setting that chooses another backend.
                let e = open_error(&s);
                assert!(e.contains("/dev/kvm") && e.contains("backend.kind"), "{e}");
            }
            Ok(()) => {
                let e = open_error(&s);
                assert!(
                    e.contains("chroot base") && e.contains("firecracker.chroot_base"),
                    "{e}"
                );
                // A chroot base on another filesystem (the tmpfs of
                // /dev/shm) than the guest's files cannot take hard links.
                let base =
                    Path::new("/dev/shm").join(format!("kiln-settings-{}", std::process::id()));
                std::fs::create_dir_all(&base).unwrap();
                s.firecracker.chroot_base.clone_from(&base);
                s.guest.kernel = Some(dir.join("vmlinux"));
                s.guest.rootfs = Some(dir.join("rootfs.ext4"));
                std::fs::write(dir.join("vmlinux"), b"k").unwrap();
                std::fs::write(dir.join("rootfs.ext4"), b"r").unwrap();
                let e = open_error(&s);
                std::fs::remove_dir_all(&base).unwrap();
                assert!(
                    e.contains("another filesystem")
                        && e.contains("guest.kernel")
                        && e.contains("firecracker.chroot_base"),
                    "{e}"
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The `firecracker` backend: Kiln's sandboxes as Firecracker microVMs
//! behind the `Backend`/`Sandbox` contract. A sandbox is booted from Kiln's
//! guest kernel and image (`boot`), or, once a template of its machine and
//! runtimes is published, restored from it with its memory served by the
//! backend's own userfaultfd page server (`restore`, `template`). Either
//! way the host then connects to the guest's agent over Firecracker's
//! hybrid vsock and shakes hands (`crate::vm::boot`), and the sandbox
//! (`sandbox`) is what the pool and the scheduler see.
//!
//! What this module owns is what the three share: the settings
//! ([`FirecrackerBackendConfig`]), the checks made once at start-up
//! ([`SetupError`]: binaries, KVM, the jail's chroot base and what must be
//! hard-linked into it), the page server, and the step from a running VM
//! to a connected, set-up agent.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_protocol::{Hello, RuntimeTable, SandboxStart, SandboxTimings, PROTOCOL_VERSION};
use kiln_snapshotter::{PageServer, PageServerConfig, ServerError};

use super::config::{FirecrackerConfig, PreflightError, VmResources};
use super::metrics::Fleet;
use super::restore::Pages;
use super::sandbox::FirecrackerSandbox;
use super::template::Templates;
use super::vm::{BootSpec, FirecrackerVm};
use crate::settings::MemoryMode;
use crate::template::{TemplateError, TemplateInfo, TemplateInputs};
use crate::vm::{boot, BootError};
use crate::{AgentConn, Backend, ReapReport, SandboxError, SandboxSpec};

/// The backend's name, in errors, records and template ids.
pub(super) const NAME: &str = "firecracker";

/// Guest CID of every sandbox: each has its own vsock device, so they may
/// share it (and a template's restores must: the CID is in the snapshot).
pub(super) const GUEST_CID: u32 = 3;

/// Where jobs run inside the guest (a tmpfs the agent mounts).
pub const WORKDIR: &str = "/work";

/// Settings of the Firecracker backend.
#[derive(Debug, Clone)]
pub struct FirecrackerBackendConfig {
    /// How Firecracker runs: binaries, jailer, state directory, API timeouts.
    pub vmm: FirecrackerConfig,
    /// The guest kernel (uncompressed `vmlinux`, booted through PVH).
    pub kernel: PathBuf,
    /// The guest root image (ext4, the agent as init), attached read-only.
    pub rootfs: PathBuf,
    pub runtimes: RuntimeTable,
    /// Guest RAM on top of the job's memory limit: the guest kernel, the
    /// agent and the page cache of the runtimes.
    pub guest_overhead_mib: u64,
    /// Most vCPUs a guest gets, whatever its CPU quota.
    pub max_vcpus: u8,
    /// Uid and gid (inside the guest) that jobs run as.
    pub job_uid: u32,
    pub job_gid: u32,
    /// Time from Firecracker's start until a booting guest's agent listens.
    pub boot_timeout: Duration,
    /// Time from a restore's load until the restored agent accepts the
    /// host's connection, and for each step of the handshake.
    pub hello_timeout: Duration,
    /// Time a template's agent gets to have its runtimes warm.
    pub warm_timeout: Duration,
    /// Let the guest kernel log its boot on the console (for diagnosis).
    /// Default from `KILN_GUEST_VERBOSE=1`.
    pub verbose_console: bool,
    /// The template store, when sandboxes are restored from templates.
    pub templates: Option<PathBuf>,
    /// How a restore loads the template's memory.
    pub memory: MemoryMode,
    /// Networking for sandboxes with `allow_internet` (off, or `None`:
    /// refused).
    pub network: Option<crate::network::NetworkSettings>,
}

impl FirecrackerBackendConfig {
    /// Defaults for everything but the VMM settings, the guest's kernel and
    /// image and the runtimes. Templates are off until a store is given.
    pub fn new(
        vmm: FirecrackerConfig,
        kernel: PathBuf,
        rootfs: PathBuf,
        runtimes: RuntimeTable,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            vmm,
            kernel,
            rootfs,
            runtimes,
            guest_overhead_mib: 64,
            max_vcpus: cores.min(32) as u8,
            job_uid: 1000,
            job_gid: 1000,
            boot_timeout: Duration::from_secs(60),
            hello_timeout: Duration::from_secs(20),
            warm_timeout: Duration::from_secs(120),
            verbose_console: std::env::var("KILN_GUEST_VERBOSE").as_deref() == Ok("1"),
            templates: None,
            memory: MemoryMode::Prefetch,
            network: None,
        }
    }
}

/// Why the backend cannot run on this host as configured (found at
/// start-up, before any sandbox).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Firecracker, its jailer or KVM is not usable.
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    /// A guest file is missing.
    #[error("the guest {what} {path} does not exist (guest.{key} / --guest-{key} / KILN_GUEST_{upper}); build it with deploy/guest/build.sh", upper = key.to_uppercase())]
    GuestMissing {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
    },
    /// A file that is hard-linked into every chroot is on another
    /// filesystem than the chroot base.
    #[error("{what} {path} is on another filesystem than the jailer's chroot base {base}: the jail hard-links it into each chroot, which needs one filesystem; put {setting} and firecracker.chroot_base (--firecracker-chroot-base, KILN_FIRECRACKER_CHROOT_BASE) on the same one")]
    OtherFilesystem {
        what: &'static str,
        path: PathBuf,
        base: PathBuf,
        setting: &'static str,
    },
    /// A guest file the jailed VMMs must read is not world-readable.
    #[error("the guest {what} {path} is not readable by the jailed VMMs (their uids are not its owner): make it world-readable (mode 0644 or 0444)")]
    Unreadable { what: &'static str, path: PathBuf },
    /// A directory of the backend could not be made.
    #[error("cannot create {what} {path}: {source}")]
    Directory {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The template store could not be opened.
    #[error("the template store (snapshot.store / --snapshot-store / KILN_SNAPSHOT_STORE): {0}")]
    Store(#[source] TemplateError),
    /// The page server could not start.
    #[error("starting the page server for restores: {0}")]
    PageServer(#[source] ServerError),
    /// This process could not become the subreaper of its jailed VMMs.
    #[error("cannot adopt the jailed VMMs (PR_SET_CHILD_SUBREAPER): {0}")]
    Subreaper(#[source] std::io::Error),
    /// Sandbox networking could not be set up.
    #[error("sandbox networks: {0}")]
    Network(#[source] crate::network::NetworkError),
}

/// What the backend's parts share.
pub(super) struct Inner {
    pub cfg: FirecrackerBackendConfig,
    pub templates: Option<Templates>,
    /// Kiln's page server for `Uffd` restores (with templates).
    pub pages: Option<Pages>,
    /// Every VM's Firecracker counters, for `/metrics`.
    pub fleet: Fleet,
    /// Root disks of sandboxes rooted in an image.
    pub disks: crate::vm::ImageDisks,
    /// Sandbox networking, when configured.
    pub network: Option<Arc<crate::network::Network>>,
}

/// Makes Firecracker microVMs. Cheap to clone.
#[derive(Clone)]
pub struct FirecrackerBackend {
    pub(super) inner: Arc<Inner>,
}

impl FirecrackerBackend {
    /// Checks the host (binaries, KVM, the chroot base and what is linked
    /// into it, the guest files) and sets up the template store and the
    /// page server when templates are on.
    pub fn new(cfg: FirecrackerBackendConfig) -> Result<Self, SetupError> {
        cfg.vmm.check()?;
        for (what, key, path) in [
            ("kernel", "kernel", &cfg.kernel),
            ("root image", "rootfs", &cfg.rootfs),
        ] {
            if !path.is_file() {
                return Err(SetupError::GuestMissing {
                    what,
                    key,
                    path: path.clone(),
                });
            }
        }
        let layer = cfg.vmm.layer_dir();
        std::fs::create_dir_all(&layer).map_err(|source| SetupError::Directory {
            what: "the state directory",
            path: layer.clone(),
            source,
        })?;
        let templates = match &cfg.templates {
            Some(root) => Some(Templates::open(root).map_err(SetupError::Store)?),
            None => None,
        };
        if let Some(jail) = &cfg.vmm.jailer {
            let base = &jail.chroot_base;
            let mut linked = vec![
                ("the guest kernel", cfg.kernel.clone(), "guest.kernel"),
                ("the guest image", cfg.rootfs.clone(), "guest.rootfs"),
            ];
            if let Some(root) = &cfg.templates {
                linked.push(("the template store", root.clone(), "snapshot.store"));
            }
            for (what, path, setting) in linked {
                if !same_filesystem(&path, base) {
                    return Err(SetupError::OtherFilesystem {
                        what,
                        path,
                        base: base.clone(),
                        setting,
                    });
                }
            }
            for (what, path) in [("kernel", &cfg.kernel), ("root image", &cfg.rootfs)] {
                if std::fs::metadata(path).is_ok_and(|m| m.mode() & 0o004 == 0) {
                    return Err(SetupError::Unreadable {
                        what,
                        path: path.clone(),
                    });
                }
            }
            super::adopt_orphaned_vmms().map_err(SetupError::Subreaper)?;
        }
        let network = match &cfg.network {
            Some(n) if n.enabled => Some(
                crate::network::Network::open(n, &cfg.vmm.state_dir)
                    .map_err(SetupError::Network)?,
            ),
            _ => None,
        };
        let pages = match (&templates, cfg.memory) {
            (Some(_), MemoryMode::Lazy | MemoryMode::Prefetch) => Some(open_pages(&cfg)?),
            _ => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                disks: crate::vm::ImageDisks::new(cfg.rootfs.clone()),
                cfg,
                templates,
                pages,
                fleet: Fleet::default(),
                network,
            }),
        })
    }

    pub fn config(&self) -> &FirecrackerBackendConfig {
        &self.inner.cfg
    }

    /// The machine a sandbox of `spec` boots: its resources, Kiln's guest
    /// kernel with the shared command line, the read-only guest image (or
    /// the root disk of the spec's image, built now if need be), a vsock
    /// device and an entropy device.
    pub async fn boot_spec(&self, spec: &SandboxSpec) -> Result<BootSpec, SandboxError> {
        self.inner.boot_spec(spec).await
    }

    /// Kiln's page server for this backend's restores (`None` without
    /// templates or with `snapshot.memory = file`): its live and recent
    /// restores and its metrics.
    pub fn page_server(&self) -> Option<&PageServer> {
        self.inner.pages.as_ref().map(Pages::server)
    }

    /// The inputs of the template for sandboxes of `spec` (its id is their
    /// hash).
    pub async fn template_inputs(
        &self,
        spec: &SandboxSpec,
    ) -> Result<TemplateInputs, SandboxError> {
        self.inner.template_inputs(spec).await
    }

    /// The second half of a template build, for a VM booted with
    /// [`FirecrackerBackend::boot_spec`] whose guest is ready (its runtimes
    /// warm): pauses it, snapshots it, publishes memory and VM state under
    /// the template id of `spec`, and destroys it. `prepare_template` calls
    /// it after booting and warming Kiln's guest; tests call it with a
    /// guest of their own.
    pub async fn publish_template(
        &self,
        spec: &SandboxSpec,
        vm: FirecrackerVm,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<TemplateInfo, SandboxError> {
        let inputs = match self.inner.template_inputs(spec).await {
            Ok(i) => i,
            Err(e) => {
                vm.destroy().await;
                return Err(e);
            }
        };
        self.inner.publish_template(&inputs, vm, progress).await
    }

    /// The VMM half of a restore: a new Firecracker loads the usable
    /// template of `spec` (memory from the page server, or the file, per
    /// `snapshot.memory`; the vsock device on the new VM's own socket) and
    /// resumes it. `None` when no template is usable. [`Backend::create`]
    /// goes on to connect to the restored agent.
    pub async fn restore_vm(
        &self,
        spec: &SandboxSpec,
    ) -> Result<Option<super::restore::RestoredVm>, SandboxError> {
        let Some(template) = self.inner.usable_template(spec).await? else {
            return Ok(None);
        };
        self.inner.restore_vm(&template, spec).await.map(Some)
    }
}

/// Whether `a` and `b` are on one filesystem (a hard link from one to the
/// other can work).
fn same_filesystem(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => false,
    }
}

/// The page server, its sockets where the VMMs can reach them: in a
/// root-only directory on the chroot base's filesystem when jailed (the
/// sockets are hard-linked into each chroot and open to every uid, 0o666,
/// since each jailed VMM runs as a uid of its own), else beside the state.
fn open_pages(cfg: &FirecrackerBackendConfig) -> Result<Pages, SetupError> {
    let (parent, socket_mode) = match &cfg.vmm.jailer {
        Some(j) => (j.chroot_base.join(super::restore::PAGES_DIR), 0o666),
        None => (
            cfg.vmm.state_dir.join(super::restore::UNJAILED_PAGES_DIR),
            0o600,
        ),
    };
    let server = PageServer::with_config(PageServerConfig {
        socket_mode,
        ..PageServerConfig::default()
    })
    .map_err(SetupError::PageServer)?;
    Pages::open(server, &parent).map_err(|source| SetupError::Directory {
        what: "the page server's socket directory",
        path: parent,
        source,
    })
}

impl Inner {
    /// Refuses what this backend cannot give a sandbox.
    pub(super) fn check_spec(&self, spec: &SandboxSpec) -> Result<(), SandboxError> {
        for w in &spec.warm {
            self.cfg
                .runtimes
                .resolve(w)
                .map_err(|e| SandboxError::Unsupported(e.to_string()))?;
        }
        if spec.allow_internet && self.network.is_none() {
            return Err(SandboxError::Unsupported(
                "allow_internet=true is not available: sandbox networking is off (set `enabled = true` in the [network] section of the configuration)".into(),
            ));
        }
        Ok(())
    }

    /// The machine of a sandbox of `spec`.
    pub(super) fn resources(&self, spec: &SandboxSpec) -> VmResources {
        VmResources::for_sandbox(spec, self.cfg.guest_overhead_mib, self.cfg.max_vcpus)
    }

    /// The protocol's opening for sandboxes of `spec`.
    pub(super) fn hello(&self, spec: &SandboxSpec) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            runtimes: spec
                .image
                .as_ref()
                .and_then(|i| i.runtimes.clone())
                .unwrap_or_else(|| self.cfg.runtimes.clone()),
            warm: spec.warm.clone(),
            workdir: WORKDIR.into(),
            uid: self.cfg.job_uid,
            gid: self.cfg.job_gid,
            rooms: None,
        }
    }

    /// From a running VM whose agent listens (or is about to: a restored
    /// guest accepts once it has taken the vsock reset) to a sandbox:
    /// connects to the agent until `times.deadline`, then `Hello` and the
    /// guest setup that makes this guest unlike any other (fresh entropy,
    /// the clock, hostname, id, limits). On error the VM is destroyed.
    pub(super) async fn attach(
        &self,
        vm: FirecrackerVm,
        spec: &SandboxSpec,
        how: SandboxStart,
        times: Times,
        template: Option<String>,
    ) -> Result<FirecrackerSandbox, SandboxError> {
        let Times {
            started,
            running,
            deadline,
        } = times;
        let Some(uds) = vm.vsock_uds() else {
            vm.destroy().await;
            return Err(SandboxError::Unsupported(
                "the VM has no vsock device to reach its agent".into(),
            ));
        };
        let connected = {
            let mut alive = vmm_alive(&vm);
            boot::connect_agent(&uds, deadline, &mut alive, vm.console().guest()).await
        };
        let stream = match connected {
            Ok(s) => s,
            Err(e) => {
                vm.destroy().await;
                return Err(boot_err(e));
            }
        };
        let connected = Instant::now();
        let id = vm.id().clone();
        let setup = match boot::guest_setup(&id, spec) {
            Ok(mut s) => {
                s.network = vm.network().map(|l| l.guest());
                s
            }
            Err(error) => {
                vm.destroy().await;
                return Err(SandboxError::Io {
                    what: "drawing the guest's entropy".into(),
                    error,
                });
            }
        };
        let agent = AgentConn::new(stream);
        if let Err(e) =
            boot::handshake(&agent, self.hello(spec), setup, self.cfg.hello_timeout).await
        {
            drop(agent);
            vm.destroy().await;
            return Err(e.into());
        }
        let ms = |from: Instant, to: Instant| to.duration_since(from).as_secs_f64() * 1000.0;
        let timings = SandboxTimings {
            how,
            start_ms: ms(started, running),
            connect_ms: ms(running, connected),
            setup_ms: ms(connected, Instant::now()),
        };
        tracing::info!(
            sandbox = %id,
            how = ?how,
            template = template.as_deref().unwrap_or("-"),
            start_ms = timings.start_ms,
            connect_ms = timings.connect_ms,
            setup_ms = timings.setup_ms,
            "firecracker sandbox ready"
        );
        Ok(FirecrackerSandbox::new(
            vm,
            agent,
            timings,
            template,
            &self.fleet,
        ))
    }
}

/// When a sandbox's making reached each step.
#[derive(Debug, Clone, Copy)]
pub(super) struct Times {
    /// The VMM was spawned.
    pub started: Instant,
    /// The guest ran: its agent said ready, or the restored VM resumed.
    pub running: Instant,
    /// The agent must be connected by then.
    pub deadline: Instant,
}

/// The boot steps' question "does the VMM still run?", answered from its
/// pidfd, with Firecracker's log when it does not.
pub(super) fn vmm_alive(vm: &FirecrackerVm) -> impl FnMut() -> Result<(), String> + Send + '_ {
    move || {
        if vm.is_running() {
            Ok(())
        } else {
            Err(format!(
                "stopped: Firecracker exited; its log: {}",
                super::process::log_tail(&vm.log_path())
            ))
        }
    }
}

pub(super) fn boot_err(e: BootError) -> SandboxError {
    SandboxError::backend(NAME, e)
}

impl Backend for FirecrackerBackend {
    type Sandbox = FirecrackerSandbox;

    fn name(&self) -> &'static str {
        NAME
    }

    /// A microVM's size is fixed when it boots and it has no rooms to
    /// replace: each serves one lease. Sandboxes are restored from
    /// templates when the template store is configured.
    fn capabilities(&self) -> crate::Capabilities {
        crate::Capabilities {
            templates: self.inner.templates.is_some(),
            ..crate::Capabilities::default()
        }
    }

    /// Restores the sandbox from a usable template when there is one;
    /// boots it otherwise, or when the restore fails.
    async fn create(&self, spec: &SandboxSpec) -> Result<FirecrackerSandbox, SandboxError> {
        let inner = &self.inner;
        inner.check_spec(spec)?;
        // A snapshot fixes its NIC's tap, and templates are of the guest
        // image only: a networked sandbox, or one rooted in an image, boots.
        if inner.templates.is_some() && !spec.allow_internet && spec.image.is_none() {
            match inner.usable_template(spec).await {
                Ok(Some(template)) => match inner.restore(&template, spec).await {
                    Ok(sandbox) => return Ok(sandbox),
                    Err(e) => tracing::warn!(
                        template = %template.manifest().id,
                        "restoring from the template failed, booting instead: {e}"
                    ),
                },
                Ok(None) => {}
                Err(e) => tracing::warn!("looking for a template failed, booting instead: {e}"),
            }
        }
        inner.boot(spec).await
    }

    /// Destroys the VMs of dead kiln processes (their VMMs, cgroups,
    /// chroots, uid claims and records) and their page servers' sockets.
    /// `kiln_firecracker_*` (every VM's Firecracker counters) and, with
    /// `Uffd` restores, `kiln_page_server_*`.
    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(self.inner.fleet.collector());
        if let Some(server) = self.page_server() {
            server.metrics().register(registry);
        }
    }

    fn reap_orphans(&self) -> ReapReport {
        let cfg = &self.inner.cfg.vmm;
        let mut report = super::reap_orphans(&cfg.state_dir);
        report.extend(super::restore::reap_page_sockets(
            &cfg.state_dir,
            cfg.jailer.as_ref().map(|j| j.chroot_base.as_path()),
        ));
        report
    }

    async fn prepare_template(
        &self,
        spec: &SandboxSpec,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<TemplateInfo, SandboxError> {
        self.inner.check_spec(spec)?;
        if let Some(image) = &spec.image {
            return Err(SandboxError::Unsupported(format!(
                "the firecracker backend makes no templates of sandboxes rooted in an image (image {}): they boot; the qemu backend makes them",
                image.digest
            )));
        }
        if spec.allow_internet {
            return Err(SandboxError::Unsupported(
                "the firecracker backend makes no templates of networked sandboxes (a snapshot would fix its NIC's tap); they boot".into(),
            ));
        }
        self.inner.prepare_template(spec, progress).await
    }

    fn templates(&self) -> Result<Vec<TemplateInfo>, SandboxError> {
        match &self.inner.templates {
            Some(t) => t.list().map_err(|e| SandboxError::backend(NAME, e)),
            None => Ok(Vec::new()),
        }
    }

    fn remove_template(&self, id: &str) -> Result<(), SandboxError> {
        match &self.inner.templates {
            Some(t) => t
                .store
                .remove(id)
                .map_err(|e| SandboxError::backend(NAME, e)),
            None => Err(SandboxError::Unsupported(format!(
                "templates are off for this backend ([snapshot] templates = false); no template {id}"
            ))),
        }
    }
}

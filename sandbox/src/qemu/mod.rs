//! The `qemu` backend: each sandbox is a real Linux microVM, one
//! `qemu-system-x86_64 -M microvm` process running Kiln's guest kernel
//! (PVH `vmlinux`, `deploy/guest/build-kernel.sh`) on the read-only guest
//! image (`deploy/guest/build-rootfs.sh`), in which `kiln-agent` is PID 1.
//! It exists for hosts where a VM is the isolation wanted but Firecracker
//! cannot run, and so that real guests run in CI on machines without
//! usable KVM: QEMU's software emulation (TCG) boots the guest in about a
//! second there.
//!
//! A sandbox's VM comes up one of two ways:
//!
//! - **booted** (`boot`): `vhost-device-vsock` serves the guest's
//!   virtio-vsock device and exposes it as a hybrid-vsock unix socket (the
//!   same bytes as Firecracker's, `vm::vsock`); guest RAM is a shared memfd
//!   (vhost-user needs it);
//! - **restored from a template** (`template`, `restore`), once one exists
//!   for the sandbox's spec and `[snapshot] templates` is on: QEMU 7.2
//!   cannot migrate a vhost-user vsock device, so a template VM and its
//!   restores reach the agent over a virtio-serial port on a unix-socket
//!   chardev instead; the template's RAM is a file, mapped privately by
//!   every restore.
//!
//! Either way, under `<state_dir>/qemu/<id>/` (a template being built:
//! `<state_dir>/qemu-templates/<id>/`): QEMU's sockets (QMP on
//! `qmp.sock`), with the image as a read-only virtio-blk disk (a sandbox
//! rooted in an OCI image boots from that image's root disk instead,
//! `vm::image_disk`; its templates are its own), a
//! virtio-rng, the serial console on its stdout (read by the host: logs,
//! and the guest's OOM kills), no network device unless `allow_internet`
//! (then a virtio-net device on the sandbox's tap, see below), and a record of the owner process and the pids, so that a later process
//! can reap what a crashed one left ([`QemuBackend::reap_orphans`]).
//! QEMU's command line is built in one place (`command`), so that a
//! restore describes exactly the machine its template was.
//!
//! Limits: the guest's RAM is the job's memory plus a fixed overhead for
//! the guest kernel and agent, so a memory bomb meets the guest's own OOM
//! killer, never the host's; vCPUs follow the CPU quota; the agent caps the
//! number of threads in the guest and sizes `/work` and `/tmp` from the
//! guest setup sent after the handshake (`vm::boot`), which also brings the
//! guest fresh entropy, the clock, its hostname and its id. The kernel
//! command line is the same for every sandbox of a kind.
//!
//! Networks (`allow_internet`, with `[network] enabled`): the sandbox's
//! [`NetLease`](crate::network::NetLease) makes its tap, `kn<slot>`, in the
//! host side before QEMU starts (QEMU opens it by name, started in the
//! host side's namespace); the guest's agent gives `eth0` its address,
//! route and name server from the guest setup, so a VM restored from a
//! template learns its own, and templates of networked sandboxes carry the
//! NIC (on a hub port that leads nowhere while the template is built). The
//! firewall, resolver, private networks, port proxy, rate limits and
//! reaping are the jail's (`network`). An air-gapped VM has no NIC.
//!
//! Acceleration: KVM when `/dev/kvm` opens and the CPU has hardware
//! virtualisation (vmx/svm), TCG otherwise ([`AccelChoice`]), reported by
//! [`QemuBackend::accel`].

mod boot;
mod command;
mod qmp;
mod restore;
mod template;
mod vm;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::{Hello, RuntimeTable, PROTOCOL_VERSION};
pub use qmp::{Qmp, QmpError};
pub use template::BuildError;
pub use vm::{Origin, QemuVm};

use crate::network::Network;
use crate::template::TemplateInfo;
use crate::vm::process::find_program;
use crate::vm::BootError;
use crate::{Backend, ReapReport, SandboxError, SandboxSpec};

/// Guest CID; every sandbox has its own vsock device, so they may share it.
const GUEST_CID: u32 = 3;

/// Where jobs run inside the guest (a tmpfs the agent mounts).
pub const WORKDIR: &str = "/work";

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation: slower, works everywhere.
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The accelerator asked for (`KILN_QEMU_ACCEL=auto|kvm|tcg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM when usable, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            _ => Err(format!("accelerator {s:?} is not one of auto, kvm, tcg")),
        }
    }
}

/// Whether KVM can run a Linux guest here; `Err` says why not. `/dev/kvm`
/// alone is not enough: a nested PVM host offers one but cannot boot
/// Linux, and has no vmx/svm flag, which is what is checked.
pub fn kvm_usable() -> Result<(), String> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm cannot be opened: {e}"))?;
    let cpuinfo =
        fs::read_to_string("/proc/cpuinfo").map_err(|e| format!("reading /proc/cpuinfo: {e}"))?;
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return Err(
            "/dev/kvm exists but the CPU has no vmx/svm flag (nested or paravirtual KVM cannot boot Linux guests)"
                .into(),
        );
    }
    Ok(())
}

impl AccelChoice {
    /// The accelerator to use; forcing KVM where it is unusable is an error.
    pub fn resolve(self) -> Result<Accel, SandboxError> {
        match self {
            AccelChoice::Tcg => Ok(Accel::Tcg),
            AccelChoice::Kvm => kvm_usable().map(|()| Accel::Kvm).map_err(|why| {
                SandboxError::Unsupported(format!(
                    "KVM was asked for (KILN_QEMU_ACCEL=kvm) but {why}; use tcg or auto"
                ))
            }),
            AccelChoice::Auto => Ok(match kvm_usable() {
                Ok(()) => Accel::Kvm,
                Err(why) => {
                    tracing::info!("qemu backend uses TCG: {why}");
                    Accel::Tcg
                }
            }),
        }
    }
}

/// Settings of the qemu backend.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// `qemu-system-x86_64`, by path or by name on `PATH`.
    pub qemu: PathBuf,
    /// `vhost-device-vsock`, by path or by name on `PATH`.
    pub vhost_vsock: PathBuf,
    /// The guest kernel (uncompressed PVH `vmlinux`).
    pub kernel: PathBuf,
    /// The guest root image (ext4), attached read-only.
    pub rootfs: PathBuf,
    /// Where sandbox directories live (`<state_dir>/qemu/<id>`).
    pub state_dir: PathBuf,
    pub accel: AccelChoice,
    /// Guest RAM on top of the job's memory limit: the guest kernel, the
    /// agent and the page cache of the runtimes.
    pub memory_overhead_mb: u64,
    /// Most vCPUs a guest gets, whatever its CPU quota.
    pub max_vcpus: u32,
    /// Uid and gid (inside the guest) that jobs run as.
    pub job_uid: u32,
    pub job_gid: u32,
    pub runtimes: RuntimeTable,
    /// Time from QEMU's start until the agent accepts a connection.
    pub boot_timeout: Duration,
    /// Time the agent gets to answer the handshake.
    pub hello_timeout: Duration,
    /// TCG's translation cache per VM, in MiB (QEMU's default is 1 GiB,
    /// most of an idle guest's host memory once touched).
    pub tcg_cache_mb: u32,
    /// Let the guest kernel log its boot on the console (slower under
    /// TCG; for diagnosis). Default from `KILN_GUEST_VERBOSE=1`.
    pub verbose_console: bool,
    /// The template store, when sandboxes are restored from templates.
    pub templates: Option<PathBuf>,
    /// Networking for sandboxes with `allow_internet` (off, or `None`:
    /// refused).
    pub network: Option<crate::network::NetworkSettings>,
}

impl QemuConfig {
    /// Defaults for everything but the guest's kernel, image and runtimes.
    pub fn new(kernel: PathBuf, rootfs: PathBuf, runtimes: RuntimeTable) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        Self {
            qemu: "qemu-system-x86_64".into(),
            vhost_vsock: "vhost-device-vsock".into(),
            kernel,
            rootfs,
            state_dir: PathBuf::from("/run/kiln"),
            accel: AccelChoice::Auto,
            memory_overhead_mb: 64,
            max_vcpus: cores,
            job_uid: 1000,
            job_gid: 1000,
            runtimes,
            boot_timeout: Duration::from_secs(60),
            hello_timeout: Duration::from_secs(20),
            verbose_console: std::env::var("KILN_GUEST_VERBOSE").as_deref() == Ok("1"),
            templates: None,
            network: None,
            tcg_cache_mb: std::env::var("KILN_QEMU_TCG_CACHE_MB")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(128),
        }
    }
}

/// A duration in milliseconds, as results report them.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn boot_err(e: BootError) -> SandboxError {
    SandboxError::backend("qemu", e)
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SandboxError {
    let what = what.into();
    move |error| SandboxError::Io { what, error }
}

struct Inner {
    cfg: QemuConfig,
    accel: Accel,
    qemu: PathBuf,
    vhost_vsock: PathBuf,
    /// Our pid and start time, written into every sandbox's record.
    owner: crate::record::Owner,
    /// The template store, when templates are on.
    templates: Option<template::Templates>,
    /// Root disks of sandboxes rooted in an image.
    disks: crate::vm::ImageDisks,
    /// Sandbox networking, when configured.
    network: Option<Arc<Network>>,
}

/// Makes QEMU microVMs. Cheap to clone.
#[derive(Clone)]
pub struct QemuBackend {
    inner: Arc<Inner>,
}

impl QemuBackend {
    /// Checks the host (programs, kernel, image, accelerator).
    pub fn new(cfg: QemuConfig) -> Result<Self, SandboxError> {
        let qemu = find_program(&cfg.qemu).ok_or_else(|| {
            SandboxError::Unsupported(format!(
                "{} was not found (install Debian's qemu-system-x86, or set KILN_QEMU_BIN)",
                cfg.qemu.display()
            ))
        })?;
        let vhost_vsock = find_program(&cfg.vhost_vsock).ok_or_else(|| {
            SandboxError::Unsupported(format!(
                "{} was not found (`cargo install vhost-device-vsock`, or set KILN_VHOST_VSOCK_BIN)",
                cfg.vhost_vsock.display()
            ))
        })?;
        for (what, p, hint) in [
            ("guest kernel", &cfg.kernel, "deploy/guest/build-kernel.sh"),
            ("guest rootfs", &cfg.rootfs, "deploy/guest/build-rootfs.sh"),
        ] {
            if !p.is_file() {
                return Err(SandboxError::Unsupported(format!(
                    "the {what} {} does not exist (build it with {hint})",
                    p.display()
                )));
            }
        }
        let accel = cfg.accel.resolve()?;
        let templates = cfg
            .templates
            .as_deref()
            .map(template::Templates::open)
            .transpose()
            .map_err(|e| SandboxError::backend("qemu", e))?;
        let network = match &cfg.network {
            Some(n) if n.enabled => Some(
                Network::open(n, &cfg.state_dir).map_err(|e| SandboxError::backend("qemu", e))?,
            ),
            _ => None,
        };
        for kind in vm::VmKind::ALL {
            let dir = cfg.state_dir.join(kind.dir());
            fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let me = std::process::id();
        let owner = crate::record::Owner::of(me as i32).unwrap_or(crate::record::Owner {
            pid: me as i32,
            start: 0,
        });
        Ok(Self {
            inner: Arc::new(Inner {
                accel,
                qemu,
                vhost_vsock,
                owner,
                templates,
                disks: crate::vm::ImageDisks::new(cfg.rootfs.clone()),
                network,
                cfg,
            }),
        })
    }

    pub fn config(&self) -> &QemuConfig {
        &self.inner.cfg
    }

    /// The accelerator in use.
    pub fn accel(&self) -> Accel {
        self.inner.accel
    }

    /// Sandbox networking, when configured (`[network] enabled`).
    pub fn network(&self) -> Option<&Arc<Network>> {
        self.inner.network.as_ref()
    }
}

impl Inner {
    /// Refuses a spec that asks to warm a runtime the table lacks.
    fn check_warm(&self, spec: &SandboxSpec) -> Result<(), SandboxError> {
        for w in &spec.warm {
            self.cfg
                .runtimes
                .resolve(w)
                .map_err(|e| SandboxError::Unsupported(e.to_string()))?;
        }
        Ok(())
    }

    /// The runtime table of sandboxes of `spec`: an image's, where it
    /// keeps an interpreter elsewhere, else the backend's.
    fn runtimes<'a>(&'a self, spec: &'a SandboxSpec) -> &'a RuntimeTable {
        spec.image
            .as_ref()
            .and_then(|i| i.runtimes.as_ref())
            .unwrap_or(&self.cfg.runtimes)
    }

    /// The root disk sandboxes of `spec` boot from: their image's (built
    /// now if need be), or the guest image.
    async fn rootfs(&self, spec: &SandboxSpec) -> Result<PathBuf, SandboxError> {
        match &spec.image {
            Some(image) => self.disks.disk(image).await,
            None => Ok(self.cfg.rootfs.clone()),
        }
    }

    /// Refuses `allow_internet` when networking is off.
    fn check_network(&self, spec: &SandboxSpec) -> Result<(), SandboxError> {
        if spec.allow_internet && self.network.is_none() {
            return Err(SandboxError::Unsupported(
                "allow_internet=true is not available: sandbox networking is off (set `enabled = true` in the [network] section of the configuration)".into(),
            ));
        }
        Ok(())
    }

    /// The host side's namespace, when networks live in another one than
    /// ours (QEMU of a networked VM starts there to open its tap).
    fn host_netns(&self) -> Option<&fs::File> {
        self.network.as_ref()?.host_netns()
    }

    /// For a sandbox of `spec` with `allow_internet`: its network lease and
    /// tap, kept in `remains` (released with them); the tap's name.
    async fn attach_network(
        &self,
        id: &crate::SandboxId,
        spec: &SandboxSpec,
        remains: &mut vm::Remains,
    ) -> Result<Option<String>, SandboxError> {
        let Some((lease, tap)) = self.network_for(id, spec).await? else {
            return Ok(None);
        };
        remains.net = Some(lease);
        Ok(Some(tap))
    }

    /// The network lease and tap of a sandbox of `spec`, if it has
    /// `allow_internet`; the caller keeps the lease with the VM.
    async fn network_for(
        &self,
        id: &crate::SandboxId,
        spec: &SandboxSpec,
    ) -> Result<Option<(crate::network::NetLease, String)>, SandboxError> {
        let (Some(net), true) = (&self.network, spec.allow_internet) else {
            return Ok(None);
        };
        let net = net.clone();
        let id = id.to_string();
        let (lease, tap) = tokio::task::spawn_blocking(move || {
            let lease = net.lease(&id, None)?;
            let tap = lease.attach_tap(None, true)?;
            Ok::<_, crate::network::NetworkError>((lease, tap))
        })
        .await
        .map_err(|e| SandboxError::Io {
            what: "network lease task".into(),
            error: io::Error::other(e.to_string()),
        })?
        .map_err(|e| SandboxError::backend("qemu", e))?;
        Ok(Some((lease, tap)))
    }

    /// The handshake's opening for a sandbox of `spec`.
    fn hello(&self, spec: &SandboxSpec) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            runtimes: self.runtimes(spec).clone(),
            warm: spec.warm.clone(),
            workdir: WORKDIR.into(),
            uid: self.cfg.job_uid,
            gid: self.cfg.job_gid,
            rooms: None,
        }
    }
}

impl Backend for QemuBackend {
    type Sandbox = QemuVm;

    fn name(&self) -> &'static str {
        "qemu"
    }

    /// A microVM's size is fixed when it boots, and it has no rooms to
    /// replace: each serves one lease. Sandboxes are restored from
    /// templates when the template store is configured.
    fn capabilities(&self) -> crate::Capabilities {
        crate::Capabilities {
            templates: self.inner.templates.is_some(),
            ..crate::Capabilities::default()
        }
    }

    /// Restores the sandbox from a usable template when there is one (see
    /// `template`); boots it otherwise, or when the restore fails.
    async fn create(&self, spec: &SandboxSpec) -> Result<QemuVm, SandboxError> {
        let inner = &self.inner;
        inner.check_warm(spec)?;
        inner.check_network(spec)?;
        if inner.templates.is_some() {
            match inner.usable_template(spec).await {
                Ok(Some(snap)) => match inner.restore(spec, &snap).await {
                    Ok(vm) => return Ok(vm),
                    Err(e) => tracing::warn!(
                        template = %snap.manifest().id,
                        "restoring from the template failed, booting instead: {e}"
                    ),
                },
                Ok(None) => {}
                Err(e) => tracing::warn!("looking for a template failed, booting instead: {e}"),
            }
        }
        inner.boot(spec).await
    }

    /// Kills the VMs of dead kiln processes and removes their directories
    /// (and the files of template builds they left).
    fn reap_orphans(&self) -> ReapReport {
        reap_orphans_in(&self.inner.cfg.state_dir)
    }

    async fn prepare_template(
        &self,
        spec: &SandboxSpec,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<TemplateInfo, SandboxError> {
        self.inner.prepare_template(spec, progress).await
    }

    fn templates(&self) -> Result<Vec<TemplateInfo>, SandboxError> {
        match &self.inner.templates {
            Some(_) => self.inner.list_templates(&[]),
            None => Ok(Vec::new()),
        }
    }

    fn remove_template(&self, id: &str) -> Result<(), SandboxError> {
        match &self.inner.templates {
            Some(t) => t
                .store
                .remove(id)
                .map_err(|e| SandboxError::backend("qemu", e)),
            None => Err(SandboxError::Unsupported(format!(
                "templates are off for this backend ([snapshot] templates = false); no template {id}"
            ))),
        }
    }
}

/// Kills and removes the qemu sandboxes and template builds recorded under
/// `state_dir` whose owner is dead (a build's files in the template store
/// are named in its record). Needs no guest image, so `kiln reap` can call
/// it on any host.
pub fn reap_orphans_in(state_dir: &Path) -> ReapReport {
    let me = crate::record::Owner::current().unwrap_or(crate::record::Owner { pid: 0, start: 0 });
    let mut report = ReapReport::default();
    for kind in vm::VmKind::ALL {
        report.extend(crate::record::reap_records(
            &state_dir.join(kind.dir()),
            me,
            |rec, _dir| {
                rec.kill_and_remove_paths();
                Ok(())
            },
        ));
    }
    report
}

#[cfg(test)]
mod guest_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// Pids of processes whose command line names `dir`.
    pub(crate) fn processes_naming(dir: &Path) -> Vec<u32> {
        let needle = dir.to_string_lossy().into_owned();
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = fs::read(e.path().join("cmdline")).ok()?;
                String::from_utf8_lossy(&cmd)
                    .contains(&needle)
                    .then_some(pid)
            })
            .collect()
    }

    #[test]
    fn accel_choice_parses_and_names_the_choices() {
        assert_eq!("tcg".parse::<AccelChoice>(), Ok(AccelChoice::Tcg));
        assert_eq!("auto".parse::<AccelChoice>(), Ok(AccelChoice::Auto));
        assert!("hvf"
            .parse::<AccelChoice>()
            .unwrap_err()
            .contains("auto, kvm, tcg"));
        assert_eq!(AccelChoice::Tcg.resolve().unwrap(), Accel::Tcg);
    }
}

//! The `qemu` backend: each sandbox is a real Linux microVM, one
//! `qemu-system-x86_64 -M microvm` process booting Kiln's guest kernel
//! (PVH `vmlinux`, `deploy/guest/build-kernel.sh`) on the read-only guest
//! image (`deploy/guest/build-rootfs.sh`), in which `kiln-agent` is PID 1
//! and listens on AF_VSOCK. It exists for hosts where a VM is the isolation
//! wanted but Firecracker cannot run, and so that real guests run in CI on
//! machines without usable KVM: QEMU's software emulation (TCG) boots the
//! guest in about a second there.
//!
//! Per sandbox, under `<state_dir>/qemu/<id>/`:
//! - `vhost-device-vsock` serves the guest's virtio-vsock device over
//!   vhost-user (`vhost.sock`) and exposes it to the host as a hybrid-vsock
//!   unix socket (`vsock.sock`, `vm::vsock`): the same bytes as Firecracker's;
//! - QEMU, with guest memory in a shared memfd (vhost-user needs it), the
//!   image as a read-only virtio-blk disk, a virtio-rng, the serial console
//!   on its stdout (read by the host: logs, and the guest's OOM kills), QMP
//!   on `qmp.sock`, and no network device unless `allow_internet`;
//! - a record of the owner process and the two pids, so that a later
//!   process can reap what a crashed one left ([`QemuBackend::reap_orphans`]).
//!
//! Limits: the guest's RAM is the job's memory plus a fixed overhead for
//! the guest kernel and agent, so a memory bomb meets the guest's own OOM
//! killer, never the host's; vCPUs follow the CPU quota; the agent caps the
//! number of threads in the guest and sizes `/work` and `/tmp` from the
//! guest setup sent after the handshake (`vm::boot`), which also brings the
//! guest fresh entropy, the clock, its hostname and its id. The kernel
//! command line is the same for every sandbox.
//!
//! Acceleration: KVM when `/dev/kvm` opens and the CPU has hardware
//! virtualisation (vmx/svm), TCG otherwise ([`AccelChoice`]), reported by
//! [`QemuBackend::accel`].

mod qmp;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_protocol::{Hello, RuntimeTable, PROTOCOL_VERSION};
pub use qmp::{Qmp, QmpError};

use crate::vm::process::{find_program, spawn_tied};
use crate::vm::{boot, vsock, BootError, Console, ReadySignal, VsockError};

use crate::{
    AgentConn, Backend, ReapReport, Sandbox, SandboxError, SandboxId, SandboxSpec, SandboxStats,
};

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
            tcg_cache_mb: std::env::var("KILN_QEMU_TCG_CACHE_MB")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(128),
        }
    }
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
        fs::create_dir_all(cfg.state_dir.join("qemu"))
            .map_err(io_err(format!("creating {}", cfg.state_dir.display())))?;
        let me = std::process::id();
        let owner = crate::record::Owner::of(me as i32).unwrap_or(crate::record::Owner {
            pid: me as i32,
            start: 0,
        });
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                accel,
                qemu,
                vhost_vsock,
                owner,
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
}

/// The processes and files of one VM on the host.
struct Remains {
    qemu: Option<Child>,
    vhost: Option<Child>,
    dir: PathBuf,
}

impl Remains {
    /// `Err` naming what stopped, if QEMU or its vsock device exited.
    fn exited(&mut self) -> Result<(), String> {
        let gone = |c: &mut Option<Child>| {
            c.as_mut()
                .is_some_and(|c| !matches!(c.try_wait(), Ok(None)))
        };
        if gone(&mut self.qemu) {
            return Err("stopped before its agent listened".into());
        }
        if gone(&mut self.vhost) {
            return Err("lost its vsock device (vhost-device-vsock exited)".into());
        }
        Ok(())
    }

    fn teardown(&mut self) {
        for child in [self.qemu.take(), self.vhost.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Remains {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A running microVM with a connected agent.
pub struct QemuVm {
    id: SandboxId,
    agent: AgentConn,
    remains: Mutex<Option<Remains>>,
    console: Arc<Console>,
    qemu_pid: u32,
    uds: PathBuf,
    boot_time: Duration,
    accel: Accel,
    qmp: tokio::sync::Mutex<Qmp>,
}

impl QemuVm {
    /// QEMU's pid on the host.
    pub fn pid(&self) -> u32 {
        self.qemu_pid
    }

    /// Time from QEMU's start until the agent accepted the connection.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The last lines the guest wrote on its console.
    pub fn console_tail(&self) -> String {
        self.console.tail()
    }

    /// A new connection to guest vsock `port` (host-initiated).
    pub async fn connect_vsock(&self, port: u32) -> Result<tokio::net::UnixStream, VsockError> {
        vsock::connect(&self.uds, port).await
    }

    /// The unix socket path on which connections from the guest to host
    /// vsock `port` arrive; the host must listen there.
    pub fn guest_listener_path(&self, port: u32) -> PathBuf {
        vsock::guest_listener_path(&self.uds, port)
    }

    /// Runs a QMP command on the VM (e.g. `query-status`).
    pub async fn qmp(
        &self,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, QmpError> {
        self.qmp.lock().await.execute(command, args).await
    }

    /// Whether QEMU is still running.
    pub fn is_running(&self) -> bool {
        let mut r = self.remains.lock().unwrap_or_else(|e| e.into_inner());
        r.as_mut()
            .and_then(|r| r.qemu.as_mut())
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Sandbox for QemuVm {
    fn id(&self) -> &SandboxId {
        &self.id
    }

    fn agent(&self) -> &AgentConn {
        &self.agent
    }

    /// OOM kills by the guest kernel, counted from its console: the host has
    /// no cgroup to read, and the console carries only the kernel's and the
    /// agent's output (jobs cannot open it).
    fn oom_kills(&self) -> u64 {
        self.console.oom_kills()
    }

    fn memory_peak_bytes(&self) -> Option<u64> {
        None
    }

    /// The host's view: QEMU's resident memory and CPU time. The guest's
    /// disk and network are not visible from the host.
    fn stats(&self) -> SandboxStats {
        let pid = self.qemu_pid as i32;
        SandboxStats {
            memory_bytes: crate::procfs::rss_bytes(pid).unwrap_or(0),
            cpu_usage_us: Some(crate::procfs::cpu_us(&[pid], false)),
            oom_kills: self.oom_kills(),
            ..SandboxStats::default()
        }
    }

    fn kill_now(&self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is the
        // VM's QEMU process, our child, not reaped until destroy.
        unsafe { libc::kill(self.qemu_pid as i32, libc::SIGKILL) };
    }

    async fn destroy(self) {
        let remains = self
            .remains
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut r) = remains {
            let _ = tokio::task::spawn_blocking(move || r.teardown()).await;
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let remains = self
            .remains
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut r) = remains {
            // Kill at once; wait and clean up in the background.
            if let Some(c) = r.qemu.as_mut() {
                let _ = c.kill();
            }
            std::thread::spawn(move || r.teardown());
        }
    }
}

/// The files of a sandbox directory.
const VHOST_SOCK: &str = "vhost.sock";
const VSOCK_SOCK: &str = "vsock.sock";
const QMP_SOCK: &str = "qmp.sock";

impl Inner {
    fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.cfg.state_dir.join("qemu").join(id.as_str())
    }

    /// The guest kernel's command line: the same for every sandbox (a
    /// snapshot freezes it); what is unique to one travels in its guest
    /// setup.
    fn kernel_cmdline(&self, spec: &SandboxSpec) -> String {
        let mut c = boot::kernel_cmdline(self.cfg.verbose_console);
        if spec.allow_internet {
            // QEMU's user-mode network: fixed addresses (docs/system/devices/net.rst).
            c.push_str(" ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off kiln.dns=10.0.2.3");
        }
        c
    }

    fn qemu_command(&self, dir: &Path, spec: &SandboxSpec) -> Command {
        let mem_mb = spec.memory_mb + self.cfg.memory_overhead_mb;
        let vcpus = (spec.cpu_millis.div_ceil(1000) as u32).clamp(1, self.cfg.max_vcpus.max(1));
        let mut cmd = Command::new(&self.qemu);
        cmd.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-M")
        .arg("microvm,acpi=off,x-option-roms=off,memory-backend=mem")
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=mem,size={mem_mb}M,share=on"
        ))
        .arg("-m")
        .arg(format!("{mem_mb}M"))
        .arg("-smp")
        .arg(vcpus.to_string());
        match self.accel {
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => cmd
                .arg("-accel")
                .arg(format!("tcg,tb-size={}", self.cfg.tcg_cache_mb))
                .args(["-cpu", "max"]),
        };
        cmd.arg("-kernel")
            .arg(&self.cfg.kernel)
            .arg("-append")
            .arg(self.kernel_cmdline(spec))
            .arg("-drive")
            .arg(format!(
                "id=root,file={},format=raw,if=none,read-only=on",
                self.cfg.rootfs.display()
            ))
            .args(["-device", "virtio-blk-device,drive=root"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=vsock,path={}",
                dir.join(VHOST_SOCK).display()
            ))
            .args(["-device", "vhost-user-vsock-device,chardev=vsock"])
            .args(["-object", "rng-random,id=rng,filename=/dev/urandom"])
            .args(["-device", "virtio-rng-device,rng=rng"])
            .args([
                "-chardev",
                "stdio,id=console,signal=off",
                "-serial",
                "chardev:console",
            ])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join(QMP_SOCK).display()
            ));
        if spec.allow_internet {
            cmd.args([
                "-netdev",
                "user,id=net0",
                "-device",
                "virtio-net-device,netdev=net0",
            ]);
        }
        cmd
    }

    /// Starts vhost-device-vsock for the VM: it serves the guest's
    /// virtio-vsock device over vhost-user and exposes it to the host as
    /// the hybrid vsock `uds`. Returns its pid once its socket exists.
    async fn start_vhost(
        &self,
        id: &SandboxId,
        dir: &Path,
        uds: &Path,
        console: &Arc<Console>,
        remains: &mut Remains,
    ) -> Result<u32, SandboxError> {
        let mut vhost = Command::new(&self.vhost_vsock);
        vhost
            .arg("--guest-cid")
            .arg(GUEST_CID.to_string())
            .arg("--socket")
            .arg(dir.join(VHOST_SOCK))
            .arg("--uds-path")
            .arg(uds)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn_tied(vhost)
            .map_err(io_err(format!("starting {}", self.vhost_vsock.display())))?;
        if let Some(e) = child.stderr.take() {
            Console::follow(console, id, e);
        }
        let pid = child.id();
        remains.vhost = Some(child);
        let vhost_sock = dir.join(VHOST_SOCK);
        if !wait_for(Duration::from_secs(5), || vhost_sock.exists()).await {
            return Err(SandboxError::Unsupported(format!(
                "vhost-device-vsock did not create {} within 5 s: {}",
                vhost_sock.display(),
                console.tail()
            )));
        }
        Ok(pid)
    }

    fn write_record(&self, dir: &Path, id: &SandboxId, pids: &[u32]) -> io::Result<()> {
        let mut rec = crate::record::Record::new("qemu", id.as_str(), self.owner);
        for p in pids {
            rec.add_process(*p as i32);
        }
        rec.write(dir)
    }
}

/// Polls `cond` every 10 ms until it holds or `within` passes.
async fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

impl Backend for QemuBackend {
    type Sandbox = QemuVm;

    fn name(&self) -> &'static str {
        "qemu"
    }

    /// A microVM's size is fixed when it boots, and it has no rooms to
    /// replace: each serves one lease.
    fn capabilities(&self) -> crate::Capabilities {
        crate::Capabilities::default()
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<QemuVm, SandboxError> {
        let inner = &self.inner;
        for w in &spec.warm {
            inner
                .cfg
                .runtimes
                .resolve(w)
                .map_err(|e| SandboxError::Unsupported(e.to_string()))?;
        }
        let id = SandboxId::random();
        let dir = inner.sandbox_dir(&id);
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let mut remains = Remains {
            qemu: None,
            vhost: None,
            dir: dir.clone(),
        };
        inner
            .write_record(&dir, &id, &[])
            .map_err(io_err("writing the sandbox record"))?;
        let console = Arc::new(Console::default());
        let uds = dir.join(VSOCK_SOCK);
        let vhost_pid = inner
            .start_vhost(&id, &dir, &uds, &console, &mut remains)
            .await?;
        let ready = ReadySignal::listen(&uds).map_err(boot_err)?;

        let started = Instant::now();
        let mut qemu = inner.qemu_command(&dir, spec);
        qemu.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child =
            spawn_tied(qemu).map_err(io_err(format!("starting {}", inner.qemu.display())))?;
        if let Some(o) = child.stdout.take() {
            Console::follow(&console, &id, o);
        }
        if let Some(e) = child.stderr.take() {
            Console::follow(&console, &id, e);
        }
        let qemu_pid = child.id();
        remains.qemu = Some(child);
        inner
            .write_record(&dir, &id, &[qemu_pid, vhost_pid])
            .map_err(io_err("updating the sandbox record"))?;

        // QMP: the socket appears once QEMU has parsed its arguments.
        let qmp_path = dir.join(QMP_SOCK);
        let qmp = loop {
            match Qmp::connect(&qmp_path).await {
                Ok(q) => break q,
                Err(e) => {
                    if remains.exited().is_err() {
                        return Err(boot_err(BootError::Died {
                            what: "exited during start-up".into(),
                            console: console.tail(),
                        }));
                    }
                    if started.elapsed() > Duration::from_secs(10) {
                        return Err(SandboxError::Io {
                            what: "connecting to QEMU's QMP socket".into(),
                            error: io::Error::other(e.to_string()),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };

        // Boot: wait for the agent's `ready`, then connect.
        let deadline = started + inner.cfg.boot_timeout;
        let mut alive = || remains.exited();
        ready
            .wait(deadline, &mut alive, &console)
            .await
            .map_err(boot_err)?;
        let stream = boot::connect_agent(&uds, deadline, &mut alive, &console)
            .await
            .map_err(boot_err)?;
        let boot_time = started.elapsed();
        tracing::info!(
            sandbox = %id,
            accel = inner.accel.as_str(),
            boot_ms = boot_time.as_millis() as u64,
            "guest agent is listening"
        );

        let setup = boot::guest_setup(&id, spec).map_err(io_err("drawing the guest's entropy"))?;
        let vm = QemuVm {
            id,
            agent: AgentConn::new(stream),
            remains: Mutex::new(Some(remains)),
            console,
            qemu_pid,
            uds,
            boot_time,
            accel: inner.accel,
            qmp: tokio::sync::Mutex::new(qmp),
        };
        let hello = Hello {
            version: PROTOCOL_VERSION,
            runtimes: inner.cfg.runtimes.clone(),
            warm: spec.warm.clone(),
            workdir: WORKDIR.into(),
            uid: inner.cfg.job_uid,
            gid: inner.cfg.job_gid,
            rooms: None,
        };
        match boot::handshake(&vm.agent, hello, setup, inner.cfg.hello_timeout).await {
            Ok(()) => Ok(vm),
            Err(e) => {
                vm.destroy().await;
                Err(e.into())
            }
        }
    }

    /// Kills the VMs of dead kiln processes and removes their directories.
    fn reap_orphans(&self) -> ReapReport {
        reap_orphans_in(&self.inner.cfg.state_dir)
    }
}

/// Kills and removes the qemu sandboxes recorded under `state_dir` whose
/// owner is dead. Needs no guest image, so `kiln reap` can call it on any
/// host.
pub fn reap_orphans_in(state_dir: &Path) -> ReapReport {
    let me = crate::record::Owner::current().unwrap_or(crate::record::Owner { pid: 0, start: 0 });
    crate::record::reap_records(&state_dir.join("qemu"), me, |rec, _dir| {
        rec.kill_and_remove_paths();
        Ok(())
    })
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

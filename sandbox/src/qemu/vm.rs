//! A QEMU process on the host and what it leaves there, whichever way its
//! guest came up (booted, a template being built, restored): starting QEMU
//! so that it dies with us and is recorded for reaping, its console and
//! QMP, waits that fail as soon as QEMU dies, and the sandbox a connected
//! VM becomes ([`QemuVm`]).

use std::fs;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::command::Launch;
use super::qmp::{Qmp, QmpError};
use super::{boot_err, io_err, Accel, Inner};
use crate::network::NetLease;
use crate::vm::process::spawn_tied;
use crate::vm::{vsock, BootError, Console, VsockError};
use crate::{AgentConn, Sandbox, SandboxError, SandboxId, SandboxStats};

/// The files of a sandbox directory.
pub(super) const VHOST_SOCK: &str = "vhost.sock";
pub(super) const VSOCK_SOCK: &str = "vsock.sock";
pub(super) const QMP_SOCK: &str = "qmp.sock";
pub(super) const AGENT_SOCK: &str = "agent.sock";

/// What a VM is for, which decides where its directory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum VmKind {
    /// A sandbox's VM: `<state_dir>/qemu/<id>`.
    Sandbox,
    /// A template being built: `<state_dir>/qemu-templates/<id>`, apart
    /// from the sandboxes (it is none).
    Template,
}

impl VmKind {
    pub const ALL: [VmKind; 2] = [VmKind::Sandbox, VmKind::Template];

    pub fn dir(self) -> &'static str {
        match self {
            VmKind::Sandbox => "qemu",
            VmKind::Template => "qemu-templates",
        }
    }
}

/// How often a wait looks at whether QEMU still runs.
const LIVENESS_POLL: Duration = Duration::from_millis(20);
/// How many more looks a failed step gets to find QEMU exited (100 ms).
const EXIT_GRACE_POLLS: u32 = 5;

/// The processes and files of one VM on the host.
pub(super) struct Remains {
    pub qemu: Option<Child>,
    pub vhost: Option<Child>,
    pub dir: PathBuf,
    /// More to remove with the VM (a template's files being built).
    pub extra: Vec<PathBuf>,
    /// The sandbox's network (its tap, rules and slot), released once
    /// QEMU is gone.
    pub net: Option<NetLease>,
}

impl Remains {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            qemu: None,
            vhost: None,
            dir,
            extra: Vec::new(),
            net: None,
        }
    }

    /// `Err` naming what stopped, if QEMU or its vsock device exited.
    pub fn exited(&mut self) -> Result<(), String> {
        let gone = |c: &mut Option<Child>| {
            c.as_mut()
                .is_some_and(|c| !matches!(c.try_wait(), Ok(None)))
        };
        if gone(&mut self.qemu) {
            return Err("QEMU exited".into());
        }
        if gone(&mut self.vhost) {
            return Err("lost its vsock device (vhost-device-vsock exited)".into());
        }
        Ok(())
    }

    /// Runs `step`, failing at once with the console's last lines if QEMU
    /// exits meanwhile. A step that failed because QEMU died (its sockets
    /// close a moment before it can be waited for) reports QEMU's death.
    pub async fn watch<T>(
        &mut self,
        console: &Console,
        what: &str,
        step: impl Future<Output = Result<T, SandboxError>>,
    ) -> Result<T, SandboxError> {
        let died = |why: String| {
            boot_err(BootError::Died {
                what: format!("{why} while {what}"),
                console: console.tail(),
            })
        };
        tokio::pin!(step);
        loop {
            tokio::select! {
                r = &mut step => {
                    let Err(e) = r else { return r };
                    for _ in 0..EXIT_GRACE_POLLS {
                        if let Err(why) = self.exited() {
                            return Err(died(why));
                        }
                        tokio::time::sleep(LIVENESS_POLL).await;
                    }
                    return Err(e);
                }
                _ = tokio::time::sleep(LIVENESS_POLL) => {
                    if let Err(why) = self.exited() {
                        return Err(died(why));
                    }
                }
            }
        }
    }

    pub fn teardown(&mut self) {
        for child in [self.qemu.take(), self.vhost.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        for p in self.extra.drain(..) {
            crate::record::remove_path(&p);
        }
        drop(self.net.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Remains {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A started QEMU whose QMP answers; its guest is not reached yet.
pub(super) struct Started {
    pub id: SandboxId,
    pub dir: PathBuf,
    pub remains: Remains,
    pub console: Arc<Console>,
    pub qemu_pid: u32,
    pub qmp: Qmp,
    /// When QEMU was started.
    pub at: Instant,
}

impl Inner {
    /// A new VM's directory under `<state_dir>/<kind's directory>/`,
    /// recorded before anything runs in it.
    pub(super) fn new_vm_dir(
        &self,
        kind: VmKind,
    ) -> Result<(SandboxId, PathBuf, Remains), SandboxError> {
        let id = SandboxId::random();
        let dir = self.cfg.state_dir.join(kind.dir()).join(id.as_str());
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let remains = Remains::new(dir.clone());
        self.write_record(&dir, &id, &[], &remains.extra)
            .map_err(io_err("writing the VM's record"))?;
        Ok((id, dir, remains))
    }

    pub(super) fn write_record(
        &self,
        dir: &Path,
        id: &SandboxId,
        pids: &[u32],
        paths: &[PathBuf],
    ) -> io::Result<()> {
        let mut rec = crate::record::Record::new("qemu", id.as_str(), self.owner);
        for p in pids {
            rec.add_process(*p as i32);
        }
        rec.paths = paths.to_vec();
        rec.write(dir)
    }

    /// Starts QEMU for `launch` in the sandbox `id` (whose directory and
    /// remains the caller made; `helper_pids` are recorded with QEMU's),
    /// and connects to its QMP.
    pub(super) async fn start_qemu(
        &self,
        id: SandboxId,
        dir: PathBuf,
        mut remains: Remains,
        console: Arc<Console>,
        launch: &Launch,
        helper_pids: &[u32],
    ) -> Result<Started, SandboxError> {
        let at = Instant::now();
        let mut qemu = self.qemu_command(launch);
        qemu.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child =
            spawn_tied(qemu).map_err(io_err(format!("starting {}", self.qemu.display())))?;
        if let Some(o) = child.stdout.take() {
            Console::follow(&console, &id, o);
        }
        if let Some(e) = child.stderr.take() {
            Console::follow(&console, &id, e);
        }
        let qemu_pid = child.id();
        remains.qemu = Some(child);
        let mut pids = vec![qemu_pid];
        pids.extend_from_slice(helper_pids);
        self.write_record(&dir, &id, &pids, &remains.extra)
            .map_err(io_err("updating the sandbox record"))?;

        // The socket appears once QEMU has parsed its arguments.
        let qmp = connect_when_there(
            &launch.qmp,
            at + Duration::from_secs(10),
            &mut remains,
            &console,
            |p| async move { Qmp::connect(&p).await },
            "connecting to QEMU's QMP socket",
        )
        .await?;
        Ok(Started {
            id,
            dir,
            remains,
            console,
            qemu_pid,
            qmp,
            at,
        })
    }
}

/// Retries `connect(path)` until it works, `deadline` passes or QEMU
/// exits: a socket QEMU listens on exists only once QEMU has got that far.
pub(super) async fn connect_when_there<T, E, F, Fut>(
    path: &Path,
    deadline: Instant,
    remains: &mut Remains,
    console: &Console,
    connect: F,
    what: &'static str,
) -> Result<T, SandboxError>
where
    E: std::fmt::Display,
    F: Fn(PathBuf) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        let e = match connect(path.to_owned()).await {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        if let Err(why) = remains.exited() {
            return Err(boot_err(BootError::Died {
                what: format!("{why} while {what}"),
                console: console.tail(),
            }));
        }
        if Instant::now() > deadline {
            return Err(SandboxError::Io {
                what: what.into(),
                error: io::Error::other(e.to_string()),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How a VM's guest came to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Booted from the kernel; the agent over vsock.
    Booted,
    /// Restored from the template of this id; the agent over a
    /// virtio-serial port.
    Restored { template: String },
}

/// A running microVM with a connected agent.
pub struct QemuVm {
    pub(super) id: SandboxId,
    pub(super) agent: AgentConn,
    pub(super) remains: Mutex<Option<Remains>>,
    pub(super) console: Arc<Console>,
    pub(super) qemu_pid: u32,
    /// The hybrid-vsock socket of a booted VM (a restored one has none).
    pub(super) uds: Option<PathBuf>,
    /// How it was made; the setup step is filled once the handshake is done.
    pub(super) timings: kiln_protocol::SandboxTimings,
    pub(super) accel: Accel,
    pub(super) qmp: tokio::sync::Mutex<Qmp>,
    pub(super) origin: Origin,
}

impl QemuVm {
    /// QEMU's pid on the host.
    pub fn pid(&self) -> u32 {
        self.qemu_pid
    }

    /// Time from QEMU's start until the host was connected to the agent:
    /// a boot, or a restore (load and resume) and the connection.
    pub fn boot_time(&self) -> Duration {
        Duration::from_secs_f64((self.timings.start_ms + self.timings.connect_ms) / 1000.0)
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// Whether it was booted or restored (and from which template).
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The last lines the guest wrote on its console.
    pub fn console_tail(&self) -> String {
        self.console.tail()
    }

    fn uds(&self) -> Result<&Path, VsockError> {
        self.uds.as_deref().ok_or_else(|| VsockError::Socket {
            path: PathBuf::new(),
            source: io::Error::new(
                io::ErrorKind::Unsupported,
                "a VM restored from a template has no vsock device (QEMU cannot migrate one)",
            ),
        })
    }

    /// A new connection to guest vsock `port` (host-initiated; booted VMs
    /// only).
    pub async fn connect_vsock(&self, port: u32) -> Result<tokio::net::UnixStream, VsockError> {
        vsock::connect(self.uds()?, port).await
    }

    /// The unix socket path on which connections from the guest to host
    /// vsock `port` arrive; the host must listen there (booted VMs only).
    pub fn guest_listener_path(&self, port: u32) -> Option<PathBuf> {
        self.uds
            .as_deref()
            .map(|u| vsock::guest_listener_path(u, port))
    }

    /// Runs a QMP command on the VM (e.g. `query-status`).
    pub async fn qmp(
        &self,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, QmpError> {
        self.qmp.lock().await.execute(command, args).await
    }

    /// The sandbox's network (`allow_internet`), if it has one: a handle
    /// on the lease, which lives (tap, rules, slot) while any is held.
    pub fn network(&self) -> Option<NetLease> {
        let r = self.remains.lock().unwrap_or_else(|e| e.into_inner());
        r.as_ref()?.net.clone()
    }

    /// The sandbox's network, or why there is none.
    fn networked(&self) -> Result<NetLease, SandboxError> {
        self.network().ok_or_else(SandboxError::no_network)
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

    /// A boot: QEMU's start until the agent said `ready`, the vsock
    /// connection, the handshake and guest setup. A restore: QEMU's start,
    /// the device state loaded and the guest resumed, the port connected,
    /// the handshake and guest setup.
    fn start_timings(&self) -> Option<kiln_protocol::SandboxTimings> {
        Some(self.timings)
    }

    /// The host's view: QEMU's resident memory and CPU time, and a
    /// networked guest's traffic as its tap counts it (QEMU runs in the
    /// host side, where the tap is). The guest's disk is not visible from
    /// the host.
    fn stats(&self) -> SandboxStats {
        let pid = self.qemu_pid as i32;
        let net = self
            .network()
            .and_then(|n| crate::procfs::tap_bytes(pid, &n.slot().host_link()));
        SandboxStats {
            memory_bytes: crate::procfs::rss_bytes(pid).unwrap_or(0),
            cpu_usage_us: Some(crate::procfs::cpu_us(&[pid], false)),
            oom_kills: self.oom_kills(),
            net_rx_bytes: net.map(|n| n.0),
            net_tx_bytes: net.map(|n| n.1),
            ..SandboxStats::default()
        }
    }

    fn network_info(&self) -> Option<crate::network::NetworkInfo> {
        self.network().as_ref().map(NetLease::info)
    }

    fn set_egress(&self, rules: crate::network::EgressRules) -> Result<(), SandboxError> {
        self.networked()?
            .set_rules(rules)
            .map_err(|e| SandboxError::backend("qemu", e))
    }

    fn join_network(&self, name: &str) -> Result<(), SandboxError> {
        self.networked()?
            .join(name)
            .map_err(|e| SandboxError::backend("qemu", e))
    }

    fn set_rate_mbit(&self, mbit: u32) -> Result<(), SandboxError> {
        self.networked()?
            .set_rate(mbit)
            .map_err(|e| SandboxError::backend("qemu", e))
    }

    fn open_port(&self, port: u16) -> Result<std::net::TcpStream, SandboxError> {
        self.networked()?
            .open_port(port)
            .map_err(|e| SandboxError::backend("qemu", e))
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

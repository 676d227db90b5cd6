//! The `jail` backend: each sandbox is `kiln-agent` running as init of new
//! user, pid, mount, net, ipc, uts and cgroup namespaces, in a read-only root
//! of overlays of its own over the host's system directories (or a template
//! directory), with a minimal `/dev` (see `rootfs` for why every jail has
//! its own inodes), a fresh `/proc`, a cgroup with memory/pids/CPU limits,
//! rlimits, only the capabilities the agent needs, no_new_privs and a
//! seccomp filter. Networking, when asked for, is `crate::network`'s.
//!
//! Jobs do not run in the jail's own namespaces but in a *room* the agent
//! makes inside it (`Hello.rooms`; see the agent's `room` module): new pid,
//! mount, network and IPC namespaces with tmpfs `/work`, `/tmp` and
//! `/dev/shm` of the job's disk size, a fresh `/proc` and only a loopback
//! interface, as an unprivileged uid with no capabilities, bound by the
//! job's seccomp filters as well as the jail's. [`Sandbox::reset`] replaces
//! the room, which is what lets a pool reuse a jail for the next job with
//! nothing of the last one left: remove-on-exit at the cost of a few
//! namespaces instead of a whole jail and an interpreter start.
//!
//! Every sandbox leaves a record in `<state_dir>/jails/<id>/` naming its
//! owner process, its init pid and its cgroups, so that a later process can
//! reap what a crashed one left ([`JailBackend::reap_orphans`]). Nothing else
//! on the host is touched: the jail's mounts live only in its own mount
//! namespace.

mod cgroup;
mod reach;
mod rootfs;
mod seccomp;
mod spawn;

use std::ffi::CString;
use std::fs;
use std::io::{self, BufRead as _};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use cgroup::{Cgroup, CgroupError, CgroupLimits, CgroupStats, Layout as CgroupLayout};
use kiln_protocol::{Hello, Rooms, RuntimeTable, PROTOCOL_VERSION};
pub(crate) use rootfs::is_static_elf;
pub use seccomp::SeccompError;
use seccompiler::BpfProgram;

use crate::network::{NetLease, Network};
use crate::record::{self, Record};
use crate::{
    AgentConn, Backend, ReapReport, Sandbox, SandboxError, SandboxId, SandboxSpec, SandboxStats,
};
use spawn::{Plan, Step};

/// Where a jail's root filesystem comes from. Either way each jail sees it
/// through overlays of its own, read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootFs {
    /// The host's `/usr`, `/etc` and the `/bin`, `/lib`... next to them.
    Host,
    /// A template directory as `/`; it must contain the mount points
    /// `proc`, `dev`, `tmp` and `work`. Mounts inside it are not seen.
    Dir(PathBuf),
}

/// The host uid and gid a jail's root is by default (`JailConfig::id_base`);
/// image roots are unpacked owned by the ids from there.
pub const DEFAULT_ID_BASE: u32 = 1_000_000_000;

/// Settings of the jail backend.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// The `kiln-agent` binary on the host.
    pub agent: PathBuf,
    /// Where sandbox records live (`<state_dir>/jails/<id>`).
    pub state_dir: PathBuf,
    /// Where the cgroup hierarchies are mounted.
    pub cgroup_mount: PathBuf,
    /// Name of the parent group of all jails, under each hierarchy's root.
    pub cgroup_parent: String,
    pub rootfs: RootFs,
    /// Host uid/gid that the jail's uid/gid 0 maps to; 65536 ids are mapped.
    pub id_base: u32,
    /// Uid and gid (inside the jail) that jobs run as.
    pub job_uid: u32,
    pub job_gid: u32,
    /// Bring each room's loopback interface up (it has no other).
    pub loopback: bool,
    pub runtimes: RuntimeTable,
    /// Time the agent gets to start and answer the handshake.
    pub hello_timeout: Duration,
    /// Networking for sandboxes with `allow_internet` (`None`: refused).
    pub network: Option<crate::network::NetworkSettings>,
}

impl JailConfig {
    /// Defaults for everything but the agent binary and the runtimes.
    pub fn new(agent: PathBuf, runtimes: RuntimeTable) -> Self {
        Self {
            agent,
            state_dir: PathBuf::from("/run/kiln"),
            cgroup_mount: PathBuf::from("/sys/fs/cgroup"),
            cgroup_parent: "kiln".into(),
            rootfs: RootFs::Host,
            id_base: DEFAULT_ID_BASE,
            job_uid: 1000,
            job_gid: 1000,
            loopback: true,
            runtimes,
            hello_timeout: Duration::from_secs(10),
            network: None,
        }
    }
}

/// Why a jail could not be made or changed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Setting up or changing the jail's cgroup failed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The jail's init failed before running the agent.
    #[error("setup failed at {step}: {source}")]
    Setup {
        step: String,
        #[source]
        source: io::Error,
    },
    /// The seccomp filter could not be built.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A jail's root could not be prepared or mounted.
    #[error(transparent)]
    Root(#[from] rootfs::RootFsError),
}

impl From<JailError> for SandboxError {
    fn from(e: JailError) -> Self {
        SandboxError::backend("jail", e)
    }
}

impl From<CgroupError> for SandboxError {
    fn from(e: CgroupError) -> Self {
        JailError::from(e).into()
    }
}

impl From<SeccompError> for SandboxError {
    fn from(e: SeccompError) -> Self {
        JailError::from(e).into()
    }
}

impl From<rootfs::RootFsError> for SandboxError {
    fn from(e: rootfs::RootFsError) -> Self {
        JailError::from(e).into()
    }
}

/// Where inside the jail jobs run.
pub const WORKDIR: &str = "/work";

/// How long the agent may take to replace a room. It takes a few
/// milliseconds; the bound is for a process that will not die (the kernel
/// kills a pid namespace's processes, but a task stuck in the kernel can
/// delay it).
const RESET_TIMEOUT: Duration = Duration::from_secs(10);

/// Capabilities the agent keeps, in the jail's user namespace only (numbers
/// from linux/capability.h): CAP_KILL (5), CAP_SETGID (6) and CAP_SETUID (7)
/// to run and signal jobs as their user; for making rooms, CAP_SETPCAP (8)
/// to empty a job's bounding set, CAP_NET_ADMIN (12) to bring a room's
/// loopback up, CAP_SYS_CHROOT (18) and CAP_SYS_ADMIN (21) for its
/// namespaces, mounts and `setns`. Jobs end up with none.
const AGENT_CAPS: u64 =
    (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 12) | (1 << 18) | (1 << 21);

struct Inner {
    cfg: JailConfig,
    layout: CgroupLayout,
    /// The jail's filters, installed on the agent.
    filters: Vec<BpfProgram>,
    /// The job's filters, as raw programs for `Hello.rooms`.
    job_filters: Vec<Vec<u8>>,
    root: rootfs::RootLayout,
    owner: record::Owner,
    /// Whether the agent needs no dynamic loader: a root that is an image
    /// has the image's libraries, not the host's.
    agent_static: bool,
    network: Option<Arc<Network>>,
}

/// Makes jails. Cheap to clone.
#[derive(Clone)]
pub struct JailBackend {
    inner: Arc<Inner>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SandboxError {
    let what = what.into();
    move |error| SandboxError::Io { what, error }
}

fn cstr(p: impl AsRef<Path>) -> CString {
    CString::new(p.as_ref().as_os_str().as_bytes()).expect("paths built here have no NUL")
}

impl JailBackend {
    /// Checks the host (cgroups, agent binary, that the jails' ids can
    /// reach the state directory) and prepares what every jail's root is
    /// made of.
    pub fn new(cfg: JailConfig) -> Result<Self, SandboxError> {
        let layout = CgroupLayout::detect(&cfg.cgroup_mount)?;
        let agent = fs::read(&cfg.agent).map_err(io_err(format!(
            "reading the agent binary {} (set KILN_AGENT or `agent` in the config)",
            cfg.agent.display()
        )))?;
        let filters = seccomp::cell_filters()?;
        let job_filters = seccomp::job_filters()?
            .iter()
            .map(seccomp::to_bytes)
            .collect();
        if let RootFs::Dir(d) = &cfg.rootfs {
            for m in rootfs::MOUNT_POINTS {
                if !d.join(m).is_dir() {
                    return Err(SandboxError::Unsupported(format!(
                        "template root {} lacks the mount point /{m}",
                        d.display()
                    )));
                }
            }
        }
        let agent_static = rootfs::is_static_elf(&agent);
        let jails = cfg.state_dir.join("jails");
        reach::create_searchable(&jails)
            .map_err(io_err(format!("creating {}", jails.display())))?;
        reach::check(&jails, cfg.id_base)?;
        let owner = record::Owner::current().map_err(io_err("reading our own /proc/self/stat"))?;
        let network = match &cfg.network {
            Some(n) if n.enabled => Some(
                Network::open(n, &cfg.state_dir).map_err(|e| SandboxError::backend("jail", e))?,
            ),
            _ => None,
        };
        let nameserver = network.as_ref().map(|n| n.nameserver());
        let root = rootfs::RootLayout::new(&cfg.rootfs, cfg.id_base, &agent, nameserver)?;
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                layout,
                filters,
                job_filters,
                root,
                owner,
                agent_static,
                network,
            }),
        })
    }

    pub fn config(&self) -> &JailConfig {
        &self.inner.cfg
    }

    /// The cgroup version in use (1 or 2).
    pub fn cgroup_version(&self) -> u8 {
        self.inner.layout.version()
    }

    /// Sandbox networking, when configured (`[network] enabled`).
    pub fn network(&self) -> Option<&Arc<Network>> {
        self.inner.network.as_ref()
    }
}

impl Inner {
    fn jail_dir(&self, id: &SandboxId) -> PathBuf {
        self.cfg.state_dir.join("jails").join(id.as_str())
    }

    /// The child's filesystem plan for a jail rooted at `root`: attach the
    /// overlays mounted for it (the root first), mount its `/proc`, pivot.
    fn plan(&self, root: &Path, mounts: &[rootfs::Mounted]) -> Plan {
        let mut steps: Vec<Step> = mounts
            .iter()
            .map(|m| Step::Attach {
                mount: m.mount.as_raw_fd(),
                dst: cstr(root.join(m.at)),
            })
            .collect();
        steps.push(Step::Mount {
            src: Some(c"proc".into()),
            dst: cstr(root.join("proc")),
            fstype: Some(c"proc".into()),
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data: None,
        });
        steps.push(Step::PivotInto { root: cstr(root) });
        let log_level = std::env::var("KILN_AGENT_LOG").unwrap_or_else(|_| "warn".into());
        Plan {
            steps,
            hostname: c"kiln".into(),
            filters: self.filters.clone(),
            keep_caps: AGENT_CAPS,
            rlimits: vec![
                (libc::RLIMIT_CORE, 0),
                (libc::RLIMIT_NOFILE, 4096),
                (libc::RLIMIT_MEMLOCK, 64 * 1024),
            ],
            argv: vec![c"kiln-agent".into(), c"--fd".into(), c"3".into()],
            envp: vec![CString::new(format!("KILN_AGENT_LOG={log_level}")).unwrap_or_default()],
            dev_null: c"/dev/null".into(),
        }
    }

    /// The synchronous part of creation: directories, cgroup, clone, maps,
    /// release. Returns the init pid, our end of the control socket and the
    /// read end of the agent's log pipe.
    fn start(&self, id: &SandboxId, spec: &SandboxSpec) -> Result<Started, SandboxError> {
        let dir = self.jail_dir(id);
        let root = dir.join("root");
        reach::create_searchable(&root).map_err(io_err(format!("creating {}", root.display())))?;
        let mut rec = Record::new("jail", id.as_str(), self.owner);
        rec.cgroups = self.layout.dirs(&self.cfg.cgroup_parent, id.as_str());
        rec.write(&dir)
            .map_err(io_err("writing the sandbox record"))?;
        let cg = match Cgroup::create(
            &self.layout,
            &self.cfg.cgroup_parent,
            id.as_str(),
            CgroupLimits {
                memory_bytes: spec.memory_mb * 1024 * 1024,
                pids: spec.pids,
                cpu_millis: spec.cpu_millis,
            },
        ) {
            Ok(cg) => cg,
            Err(e) => {
                remove_jail_dir(&dir);
                return Err(e.into());
            }
        };
        let fail = |e: SandboxError, pid: Option<i32>, cg: &Cgroup| {
            teardown(pid, cg, &dir, false);
            e
        };
        if spec.background {
            // Before the clone, so that everything the sandbox runs, from the
            // agent's exec to the warm interpreter's start, is background.
            cg.set_cpu_background(true)
                .map_err(|e| fail(e.into(), None, &cg))?;
        }
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| fail(io_err("socketpair")(e), None, &cg))?;
        let (log_r, log_w) = std::io::pipe().map_err(|e| fail(io_err("log pipe")(e), None, &cg))?;
        let mounts = match &spec.image {
            Some(image) => self
                .root
                .mount_image(&image.dir, spec.disk_mb, spec.allow_internet),
            None => self.root.mount(spec.allow_internet),
        }
        .map_err(|e| fail(e.into(), None, &cg))?;
        let plan = self.plan(&root, &mounts.layers);
        let fds = spawn::ChildFds {
            agent_exe: mounts.agent.as_raw_fd(),
            control: theirs.as_raw_fd(),
            log: log_w.as_raw_fd(),
        };
        let (child, inside) = cg
            .with_thread_inside(|| spawn::start(&plan, fds))
            .map_err(|e| fail(e.into(), None, &cg))?;
        let mut child = child.map_err(|e| fail(io_err("clone")(e), None, &cg))?;
        // The child has its own copies of these descriptors.
        drop(mounts);
        drop(theirs);
        drop(log_w);
        let pid = child.pid;
        rec.add_process(pid);
        let prepared = (|| -> Result<(), SandboxError> {
            rec.write(&dir)
                .map_err(io_err("updating the sandbox record"))?;
            let map = format!("0 {} 65536\n", self.cfg.id_base);
            fs::write(format!("/proc/{pid}/uid_map"), &map).map_err(io_err("writing uid_map"))?;
            fs::write(format!("/proc/{pid}/gid_map"), &map).map_err(io_err("writing gid_map"))?;
            if !inside {
                cg.attach(pid as u32)?;
            }
            Ok(())
        })();
        if let Err(e) = prepared {
            return Err(fail(e, Some(pid), &cg));
        }
        if let Err((step, errno)) = child.release() {
            let step = spawn::describe_step(&plan, step);
            let e = JailError::Setup {
                step,
                source: io::Error::from_raw_os_error(errno),
            }
            .into();
            return Err(fail(e, Some(pid), &cg));
        }
        Ok(Started {
            pid,
            control: ours,
            log: log_r,
            cgroup: cg,
            dir,
        })
    }
}

struct Started {
    pid: i32,
    control: std::os::unix::net::UnixStream,
    log: io::PipeReader,
    cgroup: Cgroup,
    dir: PathBuf,
}

/// Kills a jail and removes its traces. `reap` waits for the init process
/// (only possible for our own child).
fn teardown(pid: Option<i32>, cg: &Cgroup, dir: &Path, orphan: bool) -> bool {
    if let Some(pid) = pid {
        // SAFETY: kill and waitpid have no memory-safety preconditions;
        // the pid is our child (or, for orphans, verified by start time).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            if !orphan {
                let mut status = 0;
                while libc::waitpid(pid, &mut status, 0) < 0
                    && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
                {
                }
            }
        }
    }
    let empty = cg.kill_all(Duration::from_secs(5));
    let removed = empty && cg.remove();
    remove_jail_dir(dir);
    removed
}

/// Removes a jail's directory without ever recursing: it holds only the
/// record and the (host-side empty) root mount point.
fn remove_jail_dir(dir: &Path) {
    let _ = fs::remove_dir(dir.join("root"));
    let _ = fs::remove_file(dir.join(record::FILE));
    let _ = fs::remove_dir(dir);
}

/// A running jail.
pub struct Jail {
    id: SandboxId,
    agent: AgentConn,
    timings: kiln_protocol::SandboxTimings,
    remains: Option<Remains>,
    /// The CPU weight last set successfully, so that setting it again costs
    /// nothing (a write per lease saved).
    background: std::sync::atomic::AtomicBool,
    /// A shared `flock` on the image root under the jail's overlay, held
    /// for the jail's life: the image store's GC skips a root so locked.
    _image_lock: Option<fs::File>,
}

/// Opens `dir` (an image root) and takes a shared `flock` on it.
fn lock_image_root(dir: &Path) -> Result<fs::File, SandboxError> {
    let f = fs::File::open(dir).map_err(io_err(format!("opening {}", dir.display())))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH) } != 0 {
        return Err(io_err(format!("locking {}", dir.display()))(
            io::Error::last_os_error(),
        ));
    }
    Ok(f)
}

struct Remains {
    pid: i32,
    cgroup: Cgroup,
    dir: PathBuf,
    /// The sandbox's network, when it has one; released after the jail is
    /// gone (its interface goes with the room's namespace, the rest here).
    net: Option<NetLease>,
}

impl Remains {
    fn teardown(self) {
        if !teardown(Some(self.pid), &self.cgroup, &self.dir, false) {
            tracing::warn!(dir = %self.dir.display(), "jail cgroup could not be fully removed");
        }
        drop(self.net);
    }
}

impl Jail {
    /// The init process's pid on the host.
    pub fn pid(&self) -> i32 {
        self.remains.as_ref().map_or(0, |r| r.pid)
    }

    /// The jail's cgroup (limits, live figures, processes).
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.remains.as_ref().map(|r| &r.cgroup)
    }

    /// The host pid of the current room's holder (its pid 1), through which
    /// the room's mounts and network are seen from the host
    /// (`/proc/<pid>/root`, `/proc/<pid>/net`). Found among the jail's
    /// processes as the one that is pid 1 one pid namespace below the
    /// agent's; `None` between rooms.
    pub fn room_pid(&self) -> Option<i32> {
        let r = self.remains.as_ref()?;
        self.room_pid_among(&r.cgroup.procs())
    }

    /// The sandbox's network (`allow_internet`), if it has one.
    pub fn network(&self) -> Option<&NetLease> {
        self.remains.as_ref()?.net.as_ref()
    }

    /// The sandbox's network, or why there is none.
    fn networked(&self) -> Result<&NetLease, SandboxError> {
        self.network().ok_or_else(SandboxError::no_network)
    }

    /// Gives the room in service the sandbox's interface. A networked jail
    /// has no spare room, so the one room is the lease's; it is looked for
    /// a little while, since a new room's holder can be the agent's child
    /// a moment before the host sees it in the group.
    async fn connect_room(&self) -> Result<(), SandboxError> {
        let Some(r) = &self.remains else {
            return Ok(());
        };
        let Some(net) = r.net.clone() else {
            return Ok(());
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let holder = loop {
            let procs = r.cgroup.procs();
            let holders = self.room_pids_among(&procs);
            match holders.as_slice() {
                [one] => break *one,
                _ if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                many => {
                    return Err(SandboxError::Unsupported(format!(
                        "the jail should have exactly one room to connect, it has {}",
                        many.len()
                    )))
                }
            }
        };
        tokio::task::spawn_blocking(move || net.connect(holder))
            .await
            .map_err(|e| SandboxError::Io {
                what: "network connect task".into(),
                error: io::Error::other(e.to_string()),
            })?
            .map_err(|e| SandboxError::backend("jail", e))
    }

    /// Every room holder among `procs` (see [`room_pid_among`](Self::room_pid_among)).
    fn room_pids_among(&self, procs: &[i32]) -> Vec<i32> {
        let Some(r) = self.remains.as_ref() else {
            return Vec::new();
        };
        let Some(depth) = ns_pids(r.pid).map(|v| v.len()) else {
            return Vec::new();
        };
        procs
            .iter()
            .copied()
            .filter(|&p| {
                ns_pids(p)
                    .is_some_and(|ns| ns.len() == depth + 1 && ns.last().is_some_and(|l| l == "1"))
            })
            .collect()
    }

    /// [`room_pid`](Self::room_pid) for a caller that has just read the
    /// jail's processes ([`Cgroup::procs`]), which saves reading them again.
    pub fn room_pid_among(&self, procs: &[i32]) -> Option<i32> {
        self.room_pids_among(procs).first().copied()
    }
}

/// A process's pids in each pid namespace it is in, outermost first.
fn ns_pids(pid: i32) -> Option<Vec<String>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    Some(line.split_whitespace().map(str::to_owned).collect())
}

impl Drop for Jail {
    fn drop(&mut self) {
        if let Some(r) = self.remains.take() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(r.pid, libc::SIGKILL) };
            std::thread::spawn(move || r.teardown());
        }
    }
}

impl Sandbox for Jail {
    fn id(&self) -> &SandboxId {
        &self.id
    }

    fn agent(&self) -> &AgentConn {
        &self.agent
    }

    fn oom_kills(&self) -> u64 {
        self.remains.as_ref().map_or(0, |r| r.cgroup.oom_kills())
    }

    fn oom_kills_seen(&self) -> u64 {
        self.remains
            .as_ref()
            .map_or(0, |r| r.cgroup.oom_kills_seen())
    }

    fn memory_peak_bytes(&self) -> Option<u64> {
        self.remains
            .as_ref()
            .and_then(|r| r.cgroup.memory_peak_bytes())
    }

    fn set_background(&self, background: bool) {
        use std::sync::atomic::Ordering;
        if self.background.load(Ordering::Relaxed) == background {
            return;
        }
        if let Some(r) = &self.remains {
            // The flag follows only a write that took: after a failed one
            // the next call tries again.
            match r.cgroup.set_cpu_background(background) {
                Ok(()) => self.background.store(background, Ordering::Relaxed),
                Err(e) => tracing::debug!(sandbox = %self.id, "setting the CPU weight: {e}"),
            }
        }
    }

    /// The cgroup's figures; disk use of the work directory (statvfs
    /// through `/proc/<holder>/root`, which reaches into the mount
    /// namespace of the current room) and the network counters of the
    /// room's own network namespace (`/proc/<holder>/net/dev`).
    fn stats(&self) -> SandboxStats {
        let Some(r) = &self.remains else {
            return SandboxStats::default();
        };
        let s = r.cgroup.stats();
        // One read of the group's processes serves both the room's holder
        // and, where cgroup v1's cpuacct is not beside the jail's group,
        // the CPU time (the agent is init and reaps every job, so finished
        // jobs stay counted in its children's time).
        let procs = r.cgroup.procs();
        let holder = self.room_pid_among(&procs);
        let disk =
            holder.and_then(|p| crate::procfs::disk_usage(&format!("/proc/{p}/root{WORKDIR}")));
        let net = holder.and_then(crate::procfs::net_bytes);
        SandboxStats {
            memory_bytes: s.memory_bytes,
            memory_peak_bytes: s.memory_peak_bytes,
            cpu_usage_us: s
                .cpu_usage_us
                .or_else(|| Some(crate::procfs::cpu_us(&procs, true))),
            pids: s.pids,
            oom_kills: s.oom_kills,
            disk_used_bytes: disk.map(|d| d.0),
            disk_total_bytes: disk.map(|d| d.1),
            net_rx_bytes: net.map(|n| n.0),
            net_tx_bytes: net.map(|n| n.1),
            vmm_exits: None,
        }
    }

    /// Writes the cgroup's limits; a smaller memory limit may OOM-kill
    /// (cgroup v2), so the OOM count is read again afterwards (see
    /// [`Sandbox::oom_kills_seen`]).
    fn resize(&self, to: crate::Resources) -> Result<(), SandboxError> {
        let r = self
            .remains
            .as_ref()
            .ok_or_else(|| SandboxError::Unsupported("the jail is being destroyed".into()))?;
        r.cgroup.set_limits(CgroupLimits {
            memory_bytes: to.memory_mb * 1024 * 1024,
            pids: to.pids,
            cpu_millis: to.cpu_millis,
        })?;
        Ok(())
    }

    /// A jail's start is the clone until its init is released; its
    /// connection is a socket pair made beforehand; its setup is the
    /// handshake.
    fn start_timings(&self) -> Option<kiln_protocol::SandboxTimings> {
        Some(self.timings)
    }

    fn network_info(&self) -> Option<crate::network::NetworkInfo> {
        self.network().map(NetLease::info)
    }

    fn set_egress(&self, rules: crate::network::EgressRules) -> Result<(), SandboxError> {
        self.networked()?
            .set_rules(rules)
            .map_err(|e| SandboxError::backend("jail", e))
    }

    fn set_rate_mbit(&self, mbit: u32) -> Result<(), SandboxError> {
        self.networked()?
            .set_rate(mbit)
            .map_err(|e| SandboxError::backend("jail", e))
    }

    fn open_port(&self, port: u16) -> Result<std::net::TcpStream, SandboxError> {
        self.networked()?
            .open_port(port)
            .map_err(|e| SandboxError::backend("jail", e))
    }

    fn join_network(&self, name: &str) -> Result<(), SandboxError> {
        self.networked()?
            .join(name)
            .map_err(|e| SandboxError::backend("jail", e))
    }

    fn kill_now(&self) {
        if let Some(r) = &self.remains {
            r.cgroup.kill_all(Duration::from_secs(2));
        }
    }

    /// A networked jail's interface is taken from the old room first and
    /// given to the new one after: the new room has a new namespace.
    async fn reset(&self) -> Result<(), SandboxError> {
        let net = self.network().cloned();
        if let Some(n) = net.clone() {
            let _ = tokio::task::spawn_blocking(move || n.disconnect()).await;
        }
        self.agent.reset(RESET_TIMEOUT).await?;
        if net.is_some() {
            self.connect_room().await?;
        }
        if let Some(r) = &self.remains {
            r.cgroup.reset_memory_peak()?;
            r.cgroup.oom_kills();
        }
        Ok(())
    }

    async fn destroy(mut self) {
        if let Some(r) = self.remains.take() {
            let _ = tokio::task::spawn_blocking(move || r.teardown()).await;
        }
    }
}

impl Backend for JailBackend {
    type Sandbox = Jail;

    fn name(&self) -> &'static str {
        "jail"
    }

    /// A jail resets (its agent replaces the room) and resizes (cgroup
    /// limits).
    fn capabilities(&self) -> crate::Capabilities {
        crate::Capabilities {
            reset: true,
            resize: true,
            templates: false,
        }
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<Jail, SandboxError> {
        if spec.allow_internet && self.inner.network.is_none() {
            return Err(SandboxError::Unsupported(
                "allow_internet=true is not available: sandbox networking is off (set `enabled = true` in the [network] section of the configuration)".into(),
            ));
        }
        if let (Some(image), false) = (&spec.image, self.inner.agent_static) {
            return Err(SandboxError::Unsupported(format!(
                "image {} cannot root a jail: the agent {} is dynamically linked and would look for its libraries in the image; \
                 build a static one (RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu -p kiln-agent) \
                 and set backend.agent / --agent / KILN_AGENT",
                image.digest,
                self.inner.cfg.agent.display()
            )));
        }
        for w in &spec.warm {
            self.inner
                .cfg
                .runtimes
                .resolve(w)
                .map_err(|e| SandboxError::Unsupported(e.to_string()))?;
        }
        let image_lock = spec
            .image
            .as_ref()
            .map(|i| lock_image_root(&i.dir))
            .transpose()?;
        let id = SandboxId::random();
        let net = match (&self.inner.network, spec.allow_internet) {
            (Some(n), true) => {
                let n = n.clone();
                let id = id.to_string();
                Some(
                    tokio::task::spawn_blocking(move || n.lease(&id, None))
                        .await
                        .map_err(|e| SandboxError::Io {
                            what: "network lease task".into(),
                            error: io::Error::other(e.to_string()),
                        })?
                        .map_err(|e| SandboxError::backend("jail", e))?,
                )
            }
            _ => None,
        };
        let t0 = std::time::Instant::now();
        let inner = self.inner.clone();
        let spec2 = spec.clone();
        let id2 = id.clone();
        let started = tokio::task::spawn_blocking(move || inner.start(&id2, &spec2))
            .await
            .map_err(|e| SandboxError::Io {
                what: "jail start task".into(),
                error: io::Error::other(e.to_string()),
            })??;
        let Started {
            pid,
            control,
            log,
            cgroup,
            dir,
        } = started;
        let remains = Remains {
            pid,
            cgroup,
            dir,
            net,
        };
        let id_log = id.clone();
        // The agent's stderr: forwarded to our log, line by line.
        std::thread::spawn(move || {
            for line in io::BufReader::new(log).lines().map_while(Result::ok) {
                tracing::info!(sandbox = %id_log, "agent: {line}");
            }
        });
        let stream = control
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(control))
            .map_err(io_err("registering the control socket"));
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                let _ = tokio::task::spawn_blocking(move || remains.teardown()).await;
                return Err(e);
            }
        };
        let started = t0.elapsed();
        let mut jail = Jail {
            timings: kiln_protocol::SandboxTimings {
                how: kiln_protocol::SandboxStart::Boot,
                start_ms: started.as_secs_f64() * 1000.0,
                connect_ms: 0.0,
                setup_ms: 0.0,
            },
            id,
            agent: AgentConn::new(stream),
            remains: Some(remains),
            background: spec.background.into(),
            _image_lock: image_lock,
        };
        let hello = Hello {
            version: PROTOCOL_VERSION,
            runtimes: spec
                .image
                .as_ref()
                .and_then(|i| i.runtimes.clone())
                .unwrap_or_else(|| self.inner.cfg.runtimes.clone()),
            warm: spec.warm.clone(),
            workdir: WORKDIR.into(),
            uid: self.inner.cfg.job_uid,
            gid: self.inner.cfg.job_gid,
            rooms: Some(Rooms {
                disk_mb: spec.disk_mb,
                job_filters: self.inner.job_filters.clone(),
                loopback: self.inner.cfg.loopback,
                spare: !spec.allow_internet,
            }),
        };
        match jail.agent.hello(hello, self.inner.cfg.hello_timeout).await {
            Ok(_) => {
                if jail.network().is_some() {
                    if let Err(e) = jail.connect_room().await {
                        jail.destroy().await;
                        return Err(e);
                    }
                }
                jail.timings.setup_ms = (t0.elapsed() - started).as_secs_f64() * 1000.0;
                jail.oom_kills();
                Ok(jail)
            }
            Err(e) => {
                jail.destroy().await;
                Err(e.into())
            }
        }
    }

    fn reap_orphans(&self) -> ReapReport {
        reap_jails(
            &self.inner.cfg.state_dir,
            &self.inner.layout,
            self.inner.owner,
        )
    }
}

/// Destroys the jails recorded under `state_dir` whose owner died: kills
/// their init, empties and removes their cgroups, removes their
/// directories. Needs no agent binary, so `kiln reap` can run it anywhere.
pub fn reap_jails(state_dir: &Path, layout: &CgroupLayout, me: record::Owner) -> ReapReport {
    record::reap_records(&state_dir.join("jails"), me, |rec, _dir| {
        rec.kill_and_remove_paths();
        let cg = Cgroup::from_dirs(layout, rec.cgroups.clone());
        if cg.kill_all(Duration::from_secs(5)) && cg.remove() {
            Ok(())
        } else {
            Err(format!("cgroup {:?} could not be emptied", rec.cgroups))
        }
    })
}

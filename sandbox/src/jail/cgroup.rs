//! Control groups for jails: one group per sandbox carrying its memory, pids
//! and CPU limits, the source of its live figures, and the handle that kills
//! everything in it. Both layouts are supported because hosts have both:
//! the unified v2 hierarchy (preferred when it has the memory and pids
//! controllers) and the v1 per-controller hierarchies (this CI machine: v1
//! plus an empty v2 mount).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a usable v2 hierarchy nor the v1 memory and pids hierarchies
    /// are mounted.
    #[error("no usable cgroup hierarchy: need cgroup v2 with the memory and pids controllers, or cgroup v1 memory and pids mounted under {0}")]
    NoHierarchy(PathBuf),
    /// Reading or writing a cgroup file failed.
    #[error("cgroup file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn file_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::File {
        path: path.to_owned(),
        source,
    }
}

/// Which hierarchy the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// `root` is the unified mount point.
    V2 { root: PathBuf },
    /// Mount points of the controllers used; `cpu` and `cpuacct` are
    /// optional, and `cpuacct` is absent when it is co-mounted with `cpu`.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: Option<PathBuf>,
        cpuacct: Option<PathBuf>,
    },
}

impl Layout {
    /// Detects the layout under `mount` (normally `/sys/fs/cgroup`).
    pub fn detect(mount: &Path) -> Result<Self, CgroupError> {
        let controllers = fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if has("memory") && has("pids") {
            return Ok(Layout::V2 {
                root: mount.to_owned(),
            });
        }
        let memory = mount.join("memory");
        let pids = mount.join("pids");
        if memory.join("memory.limit_in_bytes").exists() && pids.join("cgroup.procs").exists() {
            let cpu = mount.join("cpu");
            let cpu = cpu.join("cpu.cfs_quota_us").exists().then_some(cpu);
            let comounted = cpu
                .as_ref()
                .is_some_and(|c| c.join("cpuacct.usage").exists());
            let acct = mount.join("cpuacct");
            let cpuacct = (!comounted && acct.join("cpuacct.usage").exists()).then_some(acct);
            return Ok(Layout::V1 {
                memory,
                pids,
                cpu,
                cpuacct,
            });
        }
        Err(CgroupError::NoHierarchy(mount.to_owned()))
    }

    pub fn version(&self) -> u8 {
        match self {
            Layout::V2 { .. } => 2,
            Layout::V1 { .. } => 1,
        }
    }

    /// The directories a group named `parent/name` occupies: on v1, memory
    /// and pids first, then cpu and cpuacct when mounted.
    pub fn dirs(&self, parent: &str, name: &str) -> Vec<PathBuf> {
        match self {
            Layout::V2 { root } => vec![root.join(parent).join(name)],
            Layout::V1 { .. } => self
                .v1_hierarchies()
                .into_iter()
                .map(|(m, _)| m.join(parent).join(name))
                .collect(),
        }
    }

    /// The v1 hierarchies in use, in the order of [`Layout::dirs`], each
    /// with the controller it is listed by in `/proc/<pid>/cgroup`.
    fn v1_hierarchies(&self) -> Vec<(&Path, &'static str)> {
        let Layout::V1 {
            memory,
            pids,
            cpu,
            cpuacct,
        } = self
        else {
            return Vec::new();
        };
        [
            (Some(memory), "memory"),
            (Some(pids), "pids"),
            (cpu.as_ref(), "cpu"),
            (cpuacct.as_ref(), "cpuacct"),
        ]
        .into_iter()
        .filter_map(|(m, name)| Some((m?.as_path(), name)))
        .collect()
    }
}

/// The limits a group enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub pids: u64,
    pub cpu_millis: u64,
}

/// Live figures of a group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    pub memory_bytes: u64,
    pub memory_peak_bytes: Option<u64>,
    pub cpu_usage_us: Option<u64>,
    pub pids: u64,
    pub oom_kills: u64,
}

/// One sandbox's group (a directory per hierarchy on v1).
#[derive(Debug)]
pub struct Cgroup {
    layout: Layout,
    dirs: Vec<PathBuf>,
    hot: HotFiles,
    /// The OOM-kill count as last read, so that a job's "before" costs no
    /// read (see [`Cgroup::oom_kills_seen`]).
    oom_seen: std::sync::atomic::AtomicU64,
    /// v1: whether `memory.memsw.limit_in_bytes` exists (swap accounting
    /// on), decided once at creation rather than on every resize.
    has_memsw: bool,
}

/// The group files read or written for every job, kept open: a path lookup
/// and an open of a cgroupfs file cost more than the read itself, and a
/// pooled sandbox touches these several times per job. On v2, `memory.peak`
/// must stay open anyway: a reset of the peak holds only for reads through
/// the descriptor that wrote it.
#[derive(Debug, Default)]
struct HotFiles {
    /// `memory.oom_control` (v1) or `memory.events` (v2).
    oom: Option<fs::File>,
    /// `memory.max_usage_in_bytes` (v1) or `memory.peak` (v2).
    peak: Option<fs::File>,
    /// `cpu.shares` (v1) or `cpu.weight` (v2), where there is a cpu controller.
    cpu_weight: Option<fs::File>,
}

impl HotFiles {
    fn open(layout: &Layout, dirs: &[PathBuf]) -> Self {
        let open = |dir: Option<&PathBuf>, file: &str, write: bool| {
            fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(dir?.join(file))
                .ok()
        };
        // The OOM counter is only read (v2 `memory.events` is read-only);
        // the peak is written to reset it, where the kernel allows that
        // (v2 `memory.peak` is read-only before Linux 6.12), and otherwise
        // still read through a kept descriptor.
        let oom = |file| open(dirs.first(), file, false);
        let peak =
            |file| open(dirs.first(), file, true).or_else(|| open(dirs.first(), file, false));
        Self {
            oom: oom(layout.oom_file()),
            peak: peak(layout.peak_file()),
            cpu_weight: open(cpu_dir(layout, dirs), layout.cpu_weight_file(), true),
        }
    }
}

impl Layout {
    /// The file counting OOM kills (`oom_kill` line).
    fn oom_file(&self) -> &'static str {
        match self {
            Layout::V2 { .. } => "memory.events",
            Layout::V1 { .. } => "memory.oom_control",
        }
    }

    /// The file holding the peak memory usage.
    fn peak_file(&self) -> &'static str {
        match self {
            Layout::V2 { .. } => "memory.peak",
            Layout::V1 { .. } => "memory.max_usage_in_bytes",
        }
    }

    /// The file holding the CPU weight.
    fn cpu_weight_file(&self) -> &'static str {
        match self {
            Layout::V2 { .. } => "cpu.weight",
            Layout::V1 { .. } => "cpu.shares",
        }
    }
}

/// The directory of `dirs` in the cpu hierarchy: the only one on v2, the
/// cpu controller's on v1 (none when it is not mounted).
fn cpu_dir<'a>(layout: &Layout, dirs: &'a [PathBuf]) -> Option<&'a PathBuf> {
    match layout {
        Layout::V2 { .. } => dirs.first(),
        Layout::V1 { cpu, .. } => dir_under(dirs, cpu.as_ref()),
    }
}

/// Reads a small cgroup file through a kept descriptor (from offset 0,
/// which regenerates its contents).
fn read_kept(f: &fs::File) -> Option<String> {
    let mut buf = [0u8; 512];
    let n = std::os::unix::fs::FileExt::read_at(f, &mut buf, 0).ok()?;
    Some(std::str::from_utf8(&buf[..n]).ok()?.to_owned())
}

/// Writes a value to a cgroup file through a kept descriptor.
fn write_kept(f: &fs::File, value: &str) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, value.as_bytes(), 0)
}

/// The value of `key` in `key value` lines.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The directory of `dirs` under hierarchy mount `mount`, if any.
fn dir_under<'a>(dirs: &'a [PathBuf], mount: Option<&PathBuf>) -> Option<&'a PathBuf> {
    let mount = mount?;
    dirs.iter().find(|d| d.starts_with(mount))
}

/// CFS period used for CPU quotas: the kernel default, 100 ms.
const CPU_PERIOD_US: u64 = 100_000;

impl Cgroup {
    /// Creates `parent/name` in every hierarchy and applies `limits`.
    pub fn create(
        layout: &Layout,
        parent: &str,
        name: &str,
        limits: CgroupLimits,
    ) -> Result<Self, CgroupError> {
        if let Layout::V2 { root } = layout {
            // Delegate the controllers down to our groups; harmless if done.
            let p = root.join(parent);
            fs::create_dir_all(&p).map_err(file_err(&p))?;
            for dir in [root.as_path(), p.as_path()] {
                let f = dir.join("cgroup.subtree_control");
                let _ = fs::write(&f, "+memory +pids +cpu");
            }
        }
        let dirs = layout.dirs(parent, name);
        let mut cg = Self::from_dirs(layout, dirs);
        for d in &cg.dirs {
            fs::create_dir_all(d).map_err(file_err(d))?;
        }
        cg.hot = HotFiles::open(layout, &cg.dirs);
        cg.has_memsw = Self::memsw_exists(layout, &cg.dirs);
        if let Err(e) = cg.set_limits(limits) {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// Re-opens the group of a recorded sandbox (orphan reaping).
    pub fn from_dirs(layout: &Layout, dirs: Vec<PathBuf>) -> Self {
        Self {
            has_memsw: Self::memsw_exists(layout, &dirs),
            layout: layout.clone(),
            dirs,
            hot: HotFiles::default(),
            oom_seen: 0.into(),
        }
    }

    /// Whether the group has v1 swap accounting (`memory.memsw.*`).
    fn memsw_exists(layout: &Layout, dirs: &[PathBuf]) -> bool {
        matches!(layout, Layout::V1 { .. })
            && dirs
                .first()
                .is_some_and(|d| d.join("memory.memsw.limit_in_bytes").exists())
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
        let p = dir.join(file);
        fs::write(&p, value).map_err(file_err(&p))
    }

    fn read(dir: &Path, file: &str) -> Option<String> {
        fs::read_to_string(dir.join(file)).ok()
    }

    fn read_u64(dir: &Path, file: &str) -> Option<u64> {
        Self::read(dir, file)?.trim().parse().ok()
    }

    /// Reads `key value` lines (memory.events, memory.oom_control, cpu.stat).
    fn read_keyed(dir: &Path, file: &str, key: &str) -> Option<u64> {
        keyed(&Self::read(dir, file)?, key)
    }

    /// Applies limits; also used to resize a pooled sandbox for a job.
    ///
    /// Ends by re-reading the OOM-kill count into the cache behind
    /// [`oom_kills_seen`](Self::oom_kills_seen): on v2, lowering
    /// `memory.max` below the usage makes the kernel OOM-kill in the group
    /// (likely the idle warm interpreter) within the write, and that kill
    /// must not be blamed on the job the sandbox is being resized for.
    pub fn set_limits(&self, l: CgroupLimits) -> Result<(), CgroupError> {
        self.write_limits(l)?;
        self.oom_kills();
        Ok(())
    }

    fn write_limits(&self, l: CgroupLimits) -> Result<(), CgroupError> {
        let quota = l.cpu_millis * CPU_PERIOD_US / 1000;
        match &self.layout {
            Layout::V2 { .. } => {
                let d = &self.dirs[0];
                Self::write(d, "memory.max", &l.memory_bytes.to_string())?;
                let _ = Self::write(d, "memory.swap.max", "0");
                Self::write(d, "pids.max", &l.pids.to_string())?;
                let _ = Self::write(d, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"));
            }
            Layout::V1 { .. } => {
                let (mem, pids) = (&self.dirs[0], &self.dirs[1]);
                let bytes = l.memory_bytes.to_string();
                // memory.memsw.limit_in_bytes (present only with swap
                // accounting) keeps swap out of reach. The kernel refuses a
                // memory limit above the memsw limit (EINVAL), so a limit
                // that grows goes to memsw first, one that shrinks last.
                let has_memsw = self.has_memsw;
                let grows = Self::read_u64(mem, "memory.limit_in_bytes")
                    .is_none_or(|now| l.memory_bytes > now);
                if has_memsw && grows {
                    let _ = Self::write(mem, "memory.memsw.limit_in_bytes", &bytes);
                }
                Self::write(mem, "memory.limit_in_bytes", &bytes)?;
                if has_memsw && !grows {
                    let _ = Self::write(mem, "memory.memsw.limit_in_bytes", &bytes);
                }
                Self::write(pids, "pids.max", &l.pids.to_string())?;
                let cpu_mount = match &self.layout {
                    Layout::V1 { cpu, .. } => cpu.as_ref(),
                    Layout::V2 { .. } => None,
                };
                if let Some(cpu) = dir_under(&self.dirs, cpu_mount) {
                    Self::write(cpu, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                    Self::write(cpu, "cpu.cfs_quota_us", &quota.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Sets the group's CPU weight to background (1/16 of the default) or
    /// back to the default: when CPUs are contended, a spare sandbox
    /// warming up gets a sixteenth of what a sandbox running a job gets.
    /// No-op where the cpu controller is not available.
    pub fn set_cpu_background(&self, background: bool) -> Result<(), CgroupError> {
        if let Some(f) = &self.hot.cpu_weight {
            let value = match (&self.layout, background) {
                (Layout::V2 { .. }, true) => "6",
                (Layout::V2 { .. }, false) => "100",
                (Layout::V1 { .. }, true) => "64",
                (Layout::V1 { .. }, false) => "1024",
            };
            // The file is open only when the cpu hierarchy's directory is.
            let dir = cpu_dir(&self.layout, &self.dirs).unwrap_or(&self.dirs[0]);
            return write_kept(f, value).map_err(|source| CgroupError::File {
                path: dir.join(self.layout.cpu_weight_file()),
                source,
            });
        }
        match &self.layout {
            Layout::V2 { .. } => {
                let weight = if background { "6" } else { "100" };
                let d = &self.dirs[0];
                if d.join("cpu.weight").exists() {
                    Self::write(d, "cpu.weight", weight)?;
                }
            }
            Layout::V1 { cpu, .. } => {
                let shares = if background { "64" } else { "1024" };
                if let Some(d) = dir_under(&self.dirs, cpu.as_ref()) {
                    Self::write(d, "cpu.shares", shares)?;
                }
            }
        }
        Ok(())
    }

    /// Runs `spawn` with the calling thread inside this group, so that the
    /// process it forks starts inside and needs no [`attach`](Self::attach).
    /// Returns `spawn`'s value and whether that held; when it did not (v2,
    /// where a thread cannot leave its process's domain group; CLONE_INTO_CGROUP
    /// would be the v2 way), the caller attaches the child.
    ///
    /// Why: on v1, writing a pid to `cgroup.procs` takes the kernel's global
    /// `cgroup_threadgroup_rwsem` for writing, which waits for an RCU grace
    /// period unless another writer just did: 9-16 ms per sandbox on the
    /// benchmark machine, most of a create. Writing `0` to `tasks` moves
    /// only the calling thread and skips that lock (`cgroup_procs_write_start`
    /// in kernel/cgroup/cgroup.c): ~15 µs per hierarchy each way.
    pub fn with_thread_inside<T>(
        &self,
        spawn: impl FnOnce() -> T,
    ) -> Result<(T, bool), CgroupError> {
        let Layout::V1 { .. } = &self.layout else {
            return Ok((spawn(), false));
        };
        let home = self.thread_home()?;
        let mut entered = 0;
        let mut result = Ok(());
        for d in &self.dirs {
            if let Err(e) = Self::write(d, "tasks", "0") {
                result = Err(e);
                break;
            }
            entered += 1;
        }
        let value = result.is_ok().then(spawn);
        // Back home in every hierarchy entered, whatever happened: a thread
        // left behind would keep the group from being removed.
        for (d, home) in self.dirs.iter().zip(&home).take(entered) {
            if let Err(e) = Self::write(home, "tasks", "0") {
                tracing::error!(group = %d.display(), "could not move the spawning thread back: {e}");
                result = result.and(Err(e));
            }
        }
        result.map(|()| (value.expect("spawned when every move succeeded"), true))
    }

    /// The calling thread's own group in each v1 hierarchy, in the order of
    /// this group's directories.
    fn thread_home(&self) -> Result<Vec<PathBuf>, CgroupError> {
        let own = Path::new("/proc/thread-self/cgroup");
        let text = fs::read_to_string(own).map_err(file_err(own))?;
        self.layout
            .v1_hierarchies()
            .into_iter()
            .map(|(mount, name)| {
                let path = text.lines().find_map(|l| {
                    let mut parts = l.splitn(3, ':');
                    let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
                    ctrls.split(',').any(|c| c == name).then_some(path)
                });
                match path {
                    Some(p) => Ok(mount.join(p.trim_start_matches('/'))),
                    None => Err(CgroupError::File {
                        path: own.to_owned(),
                        source: io::Error::other(format!("no {name} hierarchy listed")),
                    }),
                }
            })
            .collect()
    }

    /// Moves a process into the group (all hierarchies).
    pub fn attach(&self, pid: u32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            Self::write(d, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// Times the kernel's OOM killer has killed a process in the group.
    pub fn oom_kills(&self) -> u64 {
        let n = if let Some(f) = &self.hot.oom {
            read_kept(f)
                .and_then(|t| keyed(&t, "oom_kill"))
                .unwrap_or(0)
        } else {
            Self::read_keyed(&self.dirs[0], self.layout.oom_file(), "oom_kill").unwrap_or(0)
        };
        self.oom_seen.store(n, std::sync::atomic::Ordering::Relaxed);
        n
    }

    /// The OOM-kill count as [`oom_kills`](Self::oom_kills) last read it
    /// (the file is dear to read: the kernel formats three figures).
    pub fn oom_kills_seen(&self) -> u64 {
        self.oom_seen.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Peak memory of the group since it was made or since the last
    /// [`reset_memory_peak`](Self::reset_memory_peak), from one file
    /// (cheaper than `stats`).
    pub fn memory_peak_bytes(&self) -> Option<u64> {
        if let Some(f) = &self.hot.peak {
            return read_kept(f)?.trim().parse().ok();
        }
        Self::read_u64(&self.dirs[0], self.layout.peak_file())
    }

    /// Starts the peak over from the current usage, so that the next job in
    /// a reused sandbox is measured on its own (v1: writing 0 to
    /// `memory.max_usage_in_bytes`; v2, kernels from 6.12: writing to
    /// `memory.peak`, which holds for that descriptor).
    ///
    /// On v2 this is best effort and never fails: before Linux 6.12
    /// `memory.peak` has no write handler (read-only, or EINVAL on a write),
    /// and a failed reset must not fail every [`Sandbox::reset`](crate::Sandbox::reset);
    /// the peak read there is then the group's lifetime peak.
    pub fn reset_memory_peak(&self) -> Result<(), CgroupError> {
        let d = &self.dirs[0];
        match (&self.layout, &self.hot.peak) {
            // A kept descriptor that cannot write (opened read-only) falls
            // back to the path.
            (Layout::V1 { .. }, Some(f)) if write_kept(f, "0").is_ok() => Ok(()),
            (Layout::V1 { .. }, _) => Self::write(d, "memory.max_usage_in_bytes", "0"),
            (Layout::V2 { .. }, Some(f)) => {
                if let Err(e) = write_kept(f, "reset") {
                    tracing::debug!(
                        group = %d.display(),
                        "memory.peak cannot be reset (kernel before 6.12?); it stays the lifetime peak: {e}"
                    );
                }
                Ok(())
            }
            // v2 resets only per descriptor, and there is none.
            (Layout::V2 { .. }, None) => Ok(()),
        }
    }

    pub fn stats(&self) -> CgroupStats {
        let d = &self.dirs[0];
        match self.layout {
            Layout::V2 { .. } => CgroupStats {
                memory_bytes: Self::read_u64(d, "memory.current").unwrap_or(0),
                memory_peak_bytes: self.memory_peak_bytes(),
                cpu_usage_us: Self::read_keyed(d, "cpu.stat", "usage_usec"),
                pids: Self::read_u64(d, "pids.current").unwrap_or(0),
                oom_kills: self.oom_kills(),
            },
            Layout::V1 {
                ref cpu,
                ref cpuacct,
                ..
            } => CgroupStats {
                memory_bytes: Self::read_u64(d, "memory.usage_in_bytes").unwrap_or(0),
                memory_peak_bytes: self.memory_peak_bytes(),
                // cpuacct is either its own hierarchy or co-mounted with cpu.
                cpu_usage_us: dir_under(&self.dirs, cpuacct.as_ref())
                    .or_else(|| dir_under(&self.dirs, cpu.as_ref()))
                    .and_then(|a| Self::read_u64(a, "cpuacct.usage"))
                    .map(|ns| ns / 1000),
                pids: Self::read_u64(&self.dirs[1], "pids.current").unwrap_or(0),
                oom_kills: self.oom_kills(),
            },
        }
    }

    /// Pids currently in the group.
    pub fn procs(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|d| Self::read(d, "cgroup.procs"))
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// SIGKILLs everything in the group until it is empty or `within` has
    /// passed; returns whether it is empty. Loops because a process can fork
    /// between reading `cgroup.procs` and the kill (the pids limit bounds how
    /// many there can be).
    pub fn kill_all(&self, within: Duration) -> bool {
        let start = Instant::now();
        if let Layout::V2 { .. } = self.layout {
            let _ = Self::write(&self.dirs[0], "cgroup.kill", "1");
        }
        loop {
            let procs = self.procs();
            if procs.is_empty() {
                return true;
            }
            if start.elapsed() > within {
                return false;
            }
            for p in procs {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Removes the group's directories; they must be empty of processes.
    /// Retries briefly because the kernel frees a group a moment after its
    /// last process is reaped. Returns whether all are gone.
    pub fn remove(&self) -> bool {
        let mut all = true;
        for d in &self.dirs {
            let mut gone = false;
            for _ in 0..200 {
                match fs::remove_dir(d) {
                    Ok(()) => {
                        gone = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        gone = true;
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            if !gone {
                tracing::warn!(dir = %d.display(), "cgroup directory could not be removed");
                all = false;
            }
        }
        all
    }
}

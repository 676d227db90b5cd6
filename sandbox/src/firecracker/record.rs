//! What one VM holds on the host, written down so that a later process can
//! remove it when the one that made it was SIGKILLed: the owner and the VMM
//! by pid *and* start time (a recycled pid is never mistaken for either), the
//! VM's root directory, the jail directory, the cgroups and the uid claim.
//! [`Remains::teardown`] removes all of it, for `destroy`, for a dropped VM
//! and for [`reap_orphans`] alike.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::sys;
use crate::jail::{Cgroup, CgroupLayout};
use crate::procfs::start_time;
use crate::ReapReport;

/// The record's file in a VM's state directory.
pub(crate) const FILE: &str = "record.json";

/// The directory of uid claims under the layer's directory.
pub(crate) const UIDS: &str = "uids";

/// A directory without a record is reaped only once it is this old: a live
/// process writes the record right after creating the directory.
const RECORDLESS_GRACE: Duration = Duration::from_secs(60);

/// How long a killed VMM, and the processes in its cgroups, get to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// A process identified beyond pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProcessRef {
    pub pid: u32,
    pub start: u64,
}

impl ProcessRef {
    pub fn current() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            start: start_time(pid).unwrap_or(0),
        }
    }

    pub fn of(pid: u32) -> Option<Self> {
        Some(Self {
            pid,
            start: start_time(pid)?,
        })
    }

    pub fn is_alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}

/// The record on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub id: String,
    pub owner: ProcessRef,
    /// Firecracker, once its pid is known.
    pub vmm: Option<ProcessRef>,
    /// The VM's files (the chroot's root when jailed).
    pub root: PathBuf,
    /// `<chroot_base>/firecracker/<id>`, removed whole (jailed only).
    pub jail_dir: Option<PathBuf>,
    /// The jail's cgroup directories.
    pub cgroups: Vec<PathBuf>,
    /// The uid claim file (jailed only).
    pub uid_claim: Option<PathBuf>,
}

impl Record {
    /// Writes atomically (temporary file, then rename) into `dir`.
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join(".record.tmp");
        fs::write(&tmp, serde_json::to_vec(self).map_err(io::Error::other)?)?;
        fs::rename(&tmp, dir.join(FILE))
    }

    fn read(dir: &Path) -> Option<Self> {
        serde_json::from_slice(&fs::read(dir.join(FILE)).ok()?).ok()
    }
}

/// Everything one live VM holds on the host, with the handles to end it.
#[derive(Debug)]
pub(crate) struct Remains {
    pub record: Record,
    /// The VM's state directory (`<state_dir>/firecracker/<id>`).
    pub dir: PathBuf,
    /// A pidfd of Firecracker, once known.
    pub vmm: Option<OwnedFd>,
    /// Our children: the jailer or Firecracker itself.
    pub children: Vec<Child>,
}

/// What a teardown could not remove.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TeardownReport {
    /// One sentence per leftover.
    pub leftovers: Vec<String>,
}

impl TeardownReport {
    pub fn is_clean(&self) -> bool {
        self.leftovers.is_empty()
    }
}

impl Remains {
    /// Kills the VMM (SIGKILL: a jailed Firecracker is pid 1 of its pid
    /// namespace and ignores SIGTERM from outside), everything in its
    /// cgroups and any process still rooted in its chroot; reaps what is
    /// ours to reap; removes the cgroups, the files, the uid claim and the
    /// record. Blocks for at most a few seconds.
    pub fn teardown(&mut self) -> TeardownReport {
        let mut report = TeardownReport::default();
        if let Some(fd) = &self.vmm {
            if let Err(e) = sys::pidfd_kill(fd, libc::SIGKILL) {
                report
                    .leftovers
                    .push(format!("Firecracker could not be killed: {e}"));
            }
        } else if let Some(vmm) = self.record.vmm.filter(ProcessRef::is_alive) {
            // SAFETY: kill(2) has no memory-safety preconditions; the start
            // time was checked just before.
            unsafe { libc::kill(vmm.pid as i32, libc::SIGKILL) };
        }
        for child in &mut self.children {
            let _ = child.kill();
        }
        if let Some(fd) = &self.vmm {
            if !sys::pidfd_wait_exit(fd, KILL_WAIT) {
                report.leftovers.push(format!(
                    "Firecracker did not exit within {KILL_WAIT:?} of SIGKILL"
                ));
            }
            // Ours to reap when we are its parent or its subreaper.
            sys::pidfd_reap(fd);
        }
        for mut child in self.children.drain(..) {
            let _ = child.wait();
        }
        report
            .leftovers
            .extend(remove_leftovers(&self.record, &self.dir));
        report
    }
}

/// Everything of a record but the VMM itself: stray processes (in the
/// cgroups or rooted in the chroot), cgroups, files, claim, record.
fn remove_leftovers(record: &Record, dir: &Path) -> Vec<String> {
    let mut leftovers = Vec::new();
    for pid in rooted_in(record.jail_dir.as_ref().map(|_| record.root.as_path())) {
        kill_and_reap(pid);
    }
    if !record.cgroups.is_empty() {
        match CgroupLayout::detect(Path::new("/sys/fs/cgroup")) {
            Ok(layout) => {
                let cg = Cgroup::from_dirs(&layout, record.cgroups.clone());
                if !cg.kill_all(KILL_WAIT) {
                    leftovers.push(format!(
                        "processes remain in the cgroups {:?} after SIGKILL",
                        record.cgroups
                    ));
                } else if !cg.remove() {
                    leftovers.push(format!(
                        "the cgroups {:?} could not be removed",
                        record.cgroups
                    ));
                }
            }
            Err(e) => leftovers.push(format!(
                "the cgroups {:?} were not removed: {e}",
                record.cgroups
            )),
        }
    }
    let tree = record.jail_dir.as_deref().unwrap_or(&record.root);
    if let Err(e) = remove_tree(tree) {
        leftovers.push(format!("{} could not be removed: {e}", tree.display()));
    }
    if let Some(claim) = &record.uid_claim {
        if let Err(e) = remove_file(claim) {
            leftovers.push(format!("{} could not be removed: {e}", claim.display()));
        }
    }
    if let Err(e) = remove_tree(dir) {
        leftovers.push(format!("{} could not be removed: {e}", dir.display()));
    }
    leftovers
}

fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether the root directory of `pid` is the directory `root`. Compared
/// by device and inode: the jailer pivots into the chroot in a mount
/// namespace of its own, where the link `/proc/<pid>/root` reads `/`.
pub(crate) fn has_root(pid: u32, root: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (
        fs::metadata(format!("/proc/{pid}/root/")),
        fs::metadata(root),
    ) {
        (Ok(theirs), Ok(ours)) => theirs.dev() == ours.dev() && theirs.ino() == ours.ino(),
        _ => false,
    }
}

/// Processes whose root directory is `root` (a jailed VMM whose pid was
/// never recorded: the owner died between spawn and record).
fn rooted_in(root: Option<&Path>) -> Vec<u32> {
    let Some(root) = root else {
        return Vec::new();
    };
    if !root.is_dir() {
        return Vec::new();
    }
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            has_root(pid, root).then_some(pid)
        })
        .collect()
}

/// SIGKILLs `pid` through a pidfd, waits for it and reaps it if it is ours.
fn kill_and_reap(pid: u32) {
    if let Ok(fd) = sys::pidfd_open(pid) {
        let _ = sys::pidfd_kill(&fd, libc::SIGKILL);
        sys::pidfd_wait_exit(&fd, KILL_WAIT);
        sys::pidfd_reap(&fd);
    }
}

/// Destroys every VM recorded under `layer_dir` (`<state_dir>/firecracker`)
/// whose owner is dead: kills its VMM and every process in its cgroups or
/// chroot, then removes its cgroups, files, uid claim and record. VMs of
/// live owners (this process included) are left alone. Stale uid claims
/// (no record) are removed too.
pub fn reap_orphans(layer_dir: &Path) -> ReapReport {
    let mut report = ReapReport::default();
    let Ok(entries) = fs::read_dir(layer_dir) else {
        return report;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == UIDS || crate::SandboxId::parse(&name).is_none() {
            continue;
        }
        let Some(record) = Record::read(&dir) else {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > RECORDLESS_GRACE);
            if old {
                match remove_tree(&dir) {
                    Ok(()) => report.reaped.push(name),
                    Err(e) => report.failed.push(format!("{}: {e}", dir.display())),
                }
            }
            continue;
        };
        if record.owner.is_alive() {
            continue;
        }
        if let Some(vmm) = record.vmm.filter(ProcessRef::is_alive) {
            kill_and_reap(vmm.pid);
        }
        // The jailer's pid file names Firecracker even if the record never
        // got it.
        if let Some(pid) = fs::read_to_string(record.root.join("firecracker.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            if has_root(pid, &record.root) {
                kill_and_reap(pid);
            }
        }
        let leftovers = remove_leftovers(&record, &dir);
        if leftovers.is_empty() {
            report.reaped.push(record.id);
        } else {
            report
                .failed
                .push(format!("{}: {}", record.id, leftovers.join("; ")));
        }
    }
    if let Ok(claims) = fs::read_dir(layer_dir.join(UIDS)) {
        for claim in claims.flatten() {
            let owner = fs::read_to_string(claim.path()).unwrap_or_default();
            let owner = owner.trim();
            if crate::SandboxId::parse(owner).is_some_and(|_| !layer_dir.join(owner).exists()) {
                let _ = fs::remove_file(claim.path());
            }
        }
    }
    report
}

//! Removing what a Firecracker VM holds on the host, for `destroy`, for a
//! dropped VM and for [`reap_orphans`] alike. What a VM holds is written
//! down in Kiln's crash record (`crate::record`, in
//! `<state_dir>/firecracker/<id>/record.json`) before it exists: the VMM by
//! pid and start time, the jail's cgroups, and as paths the VM's directory
//! tree (the jail directory `<chroot_base>/firecracker/<id>`, or the
//! unjailed VM's root) and its uid claim. A jail directory is recognised by
//! the `root/` it holds, so that the reaper also finds a jailed VMM whose
//! pid the record never got (through the jailer's pid file, or as a process
//! rooted in the chroot).

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use super::sys;
use crate::jail::{Cgroup, CgroupLayout};
use crate::record::{reap_records, remove_path, remove_shallow, Owner, Record};
use crate::ReapReport;

/// The backend's name in records.
pub(crate) const BACKEND: &str = "firecracker";

/// How long a killed VMM, and the processes in its cgroups, get to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The jailer's file with Firecracker's pid, in the chroot's root.
pub(crate) const PID_FILE: &str = "firecracker.pid";

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
    /// A networked VM's network (its tap, rules and slot), released once
    /// the VMM is dead.
    pub net: Option<crate::network::NetLease>,
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
        drop(self.net.take());
        report.leftovers.extend(remove_leftovers(&self.record));
        if !remove_shallow(&self.dir) {
            report
                .leftovers
                .push(format!("{} could not be removed", self.dir.display()));
        }
        report
    }
}

/// The chroot root of a jailed VM's record: the `root/` of a recorded
/// directory.
pub(crate) fn jail_root(record: &Record) -> Option<PathBuf> {
    record
        .paths
        .iter()
        .map(|p| p.join("root"))
        .find(|r| r.is_dir())
}

/// Everything of a record but the VMM it has a pidfd for: processes (the
/// recorded ones, the one in the jailer's pid file, any rooted in the
/// chroot, any in the cgroups), cgroups, recorded paths. Returns what is
/// left, one sentence each.
fn remove_leftovers(record: &Record) -> Vec<String> {
    let mut leftovers = Vec::new();
    for p in record.processes.iter().filter(|p| p.is_alive()) {
        kill_and_reap(p.pid as u32);
    }
    if let Some(root) = jail_root(record) {
        // The jailer's pid file names Firecracker even if the record never
        // got it; trusted only if that process lives in this chroot.
        if let Some(pid) = fs::read_to_string(root.join(PID_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|&pid| has_root(pid, &root))
        {
            kill_and_reap(pid);
        }
        for pid in rooted_in(&root) {
            kill_and_reap(pid);
        }
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
    for p in &record.paths {
        remove_path(p);
        if fs::symlink_metadata(p).is_ok() {
            leftovers.push(format!("{} could not be removed", p.display()));
        }
    }
    leftovers
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
fn rooted_in(root: &Path) -> Vec<u32> {
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

/// The directory of uid claims: `<state_dir>/firecracker-uids` (beside the
/// records' directory, whose every subdirectory is a sandbox).
pub(crate) fn claims_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("firecracker-uids")
}

/// Destroys every VM recorded under `<state_dir>/firecracker` whose owner
/// is dead: kills its VMM and every process in its cgroups or chroot, then
/// removes its cgroups, files, uid claim and record. VMs of live owners
/// (this process included) are left alone. Claims of sandboxes without a
/// record are removed too.
pub fn reap_orphans(state_dir: &Path) -> ReapReport {
    let records = state_dir.join(BACKEND);
    let me = Owner::current().unwrap_or(Owner { pid: -1, start: 0 });
    let report = reap_records(&records, me, |record, _dir| {
        let leftovers = remove_leftovers(record);
        if leftovers.is_empty() {
            Ok(())
        } else {
            Err(leftovers.join("; "))
        }
    });
    for claim in fs::read_dir(claims_dir(state_dir))
        .into_iter()
        .flatten()
        .flatten()
    {
        let owner = fs::read_to_string(claim.path()).unwrap_or_default();
        let owner = owner.trim();
        if crate::SandboxId::parse(owner).is_some() && !records.join(owner).exists() {
            let _ = fs::remove_file(claim.path());
        }
    }
    report
}

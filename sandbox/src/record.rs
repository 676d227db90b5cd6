//! Crash records: one format for every backend. Each sandbox keeps a
//! record in `<state_dir>/<backend>/<id>/record.json` naming the process
//! that owns it and every host resource it holds (processes by pid *and*
//! start time, so that a recycled pid is never mistaken for one of ours;
//! cgroup directories; files and directories to remove). When the owner
//! dies without destroying its sandboxes (SIGKILL, a crash), a later
//! process reads the records and removes what they name ([`reap_records`]).
//!
//! The records are written atomically (temporary file and rename) and
//! updated as a sandbox acquires resources, so that whatever a crash
//! interrupts is named by the record on disk.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::procfs::start_time;
use crate::ReapReport;

/// The record's file name inside a sandbox's directory.
pub const FILE: &str = "record.json";

/// A process identified beyond pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: i32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start: u64,
}

impl Owner {
    /// This process.
    pub fn current() -> io::Result<Self> {
        let pid = std::process::id() as i32;
        let start = start_time(pid as u32)
            .ok_or_else(|| io::Error::other("no start time in /proc/self/stat"))?;
        Ok(Self { pid, start })
    }

    /// `pid` as it is now; `None` if no such process exists.
    pub fn of(pid: i32) -> Option<Self> {
        Some(Self {
            pid,
            start: start_time(pid as u32)?,
        })
    }

    /// Whether this very process (not a later one with its pid) still runs.
    pub fn is_alive(&self) -> bool {
        start_time(self.pid as u32) == Some(self.start)
    }

    /// SIGKILLs the process if it is still this one.
    pub fn kill(&self) {
        if self.is_alive() {
            // SAFETY: kill has no memory-safety preconditions; the start
            // time check makes a recycled pid very unlikely to be hit.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
}

/// What a sandbox holds on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The backend that made it (`jail`, `qemu`, `firecracker`).
    pub backend: String,
    pub id: String,
    /// The process that made the sandbox and will destroy it.
    pub owner: Owner,
    /// Processes of the sandbox (an init, a VMM, its helpers).
    #[serde(default)]
    pub processes: Vec<Owner>,
    /// Cgroup directories of the sandbox, one per hierarchy.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// Files and directories to remove, besides the record's own directory.
    #[serde(default)]
    pub paths: Vec<PathBuf>,
}

impl Record {
    pub fn new(backend: &str, id: &str, owner: Owner) -> Self {
        Self {
            backend: backend.to_owned(),
            id: id.to_owned(),
            owner,
            processes: Vec::new(),
            cgroups: Vec::new(),
            paths: Vec::new(),
        }
    }

    /// Adds a process by pid (its start time read now; 0 if it is gone).
    pub fn add_process(&mut self, pid: i32) {
        self.processes
            .push(Owner::of(pid).unwrap_or(Owner { pid, start: 0 }));
    }

    /// Writes the record into `dir` atomically (temporary file and rename).
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join(".record.tmp");
        fs::write(&tmp, serde_json::to_vec(self).map_err(io::Error::other)?)?;
        fs::rename(&tmp, dir.join(FILE))
    }

    /// Reads the record in `dir`; `None` if it is missing or unreadable.
    pub fn read(dir: &Path) -> Option<Self> {
        let bytes = fs::read(dir.join(FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Kills the recorded processes and removes the recorded paths (not the
    /// cgroups: emptying those is the backend's, see [`reap_records`]).
    pub fn kill_and_remove_paths(&self) {
        for p in &self.processes {
            p.kill();
        }
        for p in &self.paths {
            remove_path(p);
        }
    }
}

/// Removes a file or a directory tree; a missing one is fine.
pub fn remove_path(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// Removes a sandbox's directory without recursing into subdirectories:
/// their contents are the backend's to remove (a mount point, say, must
/// never be descended into). Files are removed, subdirectories only if
/// empty, then the directory itself; `false` if anything is left.
pub fn remove_shallow(dir: &Path) -> bool {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let _ = if e.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir(&p)
            } else {
                fs::remove_file(&p)
            };
        }
    }
    fs::remove_dir(dir).is_ok() || !dir.exists()
}

/// A directory without a record is only reaped once it is this old: a live
/// process writes the record right after creating the directory.
const RECORDLESS_GRACE: Duration = Duration::from_secs(60);

/// Destroys what the records under `dir` (one subdirectory per sandbox)
/// name, for every record whose owner is dead and is not `me`. `teardown`
/// does the backend's part (kill the processes, empty and remove the
/// cgroups, remove the paths), given the record and the sandbox's
/// directory, and says what it could not remove; the directory is then
/// removed with [`remove_shallow`].
pub fn reap_records(
    dir: &Path,
    me: Owner,
    mut teardown: impl FnMut(&Record, &Path) -> Result<(), String>,
) -> ReapReport {
    let mut report = ReapReport::default();
    let Ok(entries) = fs::read_dir(dir) else {
        return report;
    };
    for e in entries.flatten() {
        let sandbox_dir = e.path();
        if !sandbox_dir.is_dir() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rec) = Record::read(&sandbox_dir) else {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > RECORDLESS_GRACE);
            if old {
                if remove_shallow(&sandbox_dir) {
                    report.reaped.push(name);
                } else {
                    report
                        .failed
                        .push(format!("{}: not empty", sandbox_dir.display()));
                }
            }
            continue;
        };
        if rec.owner == me || rec.owner.is_alive() {
            continue;
        }
        match teardown(&rec, &sandbox_dir) {
            Ok(()) if remove_shallow(&sandbox_dir) => report.reaped.push(rec.id),
            Ok(()) => report.failed.push(format!(
                "{} {}: {} is not empty",
                rec.backend,
                rec.id,
                sandbox_dir.display()
            )),
            Err(why) => report
                .failed
                .push(format!("{} {}: {why}", rec.backend, rec.id)),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-record-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_record_round_trips_and_reads_older_fields_by_default() {
        let d = temp_dir("round-trip");
        let mut r = Record::new("qemu", "0123456789abcdef", Owner::current().unwrap());
        r.add_process(std::process::id() as i32);
        r.paths.push(d.join("x"));
        r.write(&d).unwrap();
        assert_eq!(Record::read(&d), Some(r));
        fs::write(
            d.join(FILE),
            br#"{"backend":"jail","id":"a","owner":{"pid":1,"start":2}}"#,
        )
        .unwrap();
        let old = Record::read(&d).unwrap();
        assert!(old.processes.is_empty() && old.cgroups.is_empty());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn reaping_skips_live_owners_and_removes_what_dead_ones_left() {
        let root = temp_dir("reap");
        let me = Owner::current().unwrap();
        // A dead owner: a process that has exited (pid 0 never matches).
        let dead = Owner { pid: 0, start: 1 };
        for (id, owner) in [("live", me), ("dead", dead)] {
            let d = root.join(id);
            fs::create_dir_all(&d).unwrap();
            let mut r = Record::new("test", id, owner);
            let leftover = root.join(format!("{id}.left"));
            fs::write(&leftover, b"x").unwrap();
            r.paths.push(leftover);
            r.write(&d).unwrap();
        }
        let mut torn = Vec::new();
        let report = reap_records(&root, Owner { pid: -1, start: 0 }, |r, _| {
            torn.push(r.id.clone());
            r.kill_and_remove_paths();
            Ok(())
        });
        assert_eq!(torn, ["dead"], "only the dead owner's sandbox is torn down");
        assert_eq!(report.reaped, ["dead"]);
        assert!(!root.join("dead").exists() && !root.join("dead.left").exists());
        assert!(root.join("live").exists() && root.join("live.left").exists());
        fs::remove_dir_all(&root).unwrap();
    }
}

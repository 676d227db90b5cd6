//! Records of live jails on disk, and the reaping of those whose owner died.
//! A record names the owning process and the jail's init by pid *and* start
//! time, so that a recycled pid is never mistaken for either.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::cgroup::{Cgroup, Layout};
use crate::procfs::start_time;
use crate::ReapReport;

/// The record's file name inside a jail's directory.
pub const FILE: &str = "record.json";

/// A process identified beyond pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: i32,
    pub start: u64,
}

impl Owner {
    pub fn current() -> io::Result<Self> {
        let pid = std::process::id() as i32;
        let start = start_time(pid as u32)
            .ok_or_else(|| io::Error::other("no start time in /proc/self/stat"))?;
        Ok(Self { pid, start })
    }

    pub fn of(pid: i32) -> Option<Self> {
        Some(Self {
            pid,
            start: start_time(pid as u32)?,
        })
    }

    pub fn is_alive(&self) -> bool {
        start_time(self.pid as u32) == Some(self.start)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub owner: Owner,
    pub init: Option<Owner>,
    pub cgroups: Vec<PathBuf>,
}

impl Record {
    pub fn new(id: &str, owner: Owner, cgroups: Vec<PathBuf>) -> Self {
        Self {
            id: id.to_owned(),
            owner,
            init: None,
            cgroups,
        }
    }

    pub fn set_pid(&mut self, pid: i32) {
        self.init = Owner::of(pid).or(Some(Owner { pid, start: 0 }));
    }

    /// Writes atomically (temp file + rename).
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join(".record.tmp");
        fs::write(&tmp, serde_json::to_vec(self).map_err(io::Error::other)?)?;
        fs::rename(&tmp, dir.join(FILE))
    }
}

/// A directory without a record is only reaped once it is this old: a
/// live process writes the record right after creating the directory.
const RECORDLESS_GRACE: Duration = Duration::from_secs(60);

/// Destroys every recorded jail whose owner is dead.
pub fn reap(jails: &Path, layout: &Layout, me: Owner) -> ReapReport {
    let mut report = ReapReport::default();
    let Ok(entries) = fs::read_dir(jails) else {
        return report;
    };
    for e in entries.flatten() {
        let dir = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let rec: Option<Record> = fs::read(dir.join(FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let Some(rec) = rec else {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > RECORDLESS_GRACE);
            if old {
                super::remove_jail_dir(&dir);
                report.reaped.push(name);
            }
            continue;
        };
        if rec.owner == me || rec.owner.is_alive() {
            continue;
        }
        let pid = rec.init.filter(Owner::is_alive).map(|o| o.pid);
        let cg = Cgroup::from_dirs(layout, rec.cgroups.clone());
        if super::teardown(pid, &cg, &dir, true) {
            report.reaped.push(rec.id);
        } else {
            report.failed.push(format!(
                "{}: cgroup {:?} could not be emptied",
                rec.id, rec.cgroups
            ));
        }
    }
    report
}

//! Confinement of one VMM by Firecracker's jailer: the uid and gid it runs
//! as (one per live sandbox, claimed from the configured range so that two
//! VMMs never share one), its chroot (`<base>/firecracker/<id>/root`, where
//! every file the VM needs is hard-linked before the jailer starts), its
//! cgroups (v1 here: `memory.limit_in_bytes` and `cpu.cfs_quota_us` under
//! `<parent>/<id>`; v2: `memory.max` and `cpu.max`), a pid namespace of its
//! own (`--new-pid-ns`) and a network namespace of its own (unshared in the
//! jailer's child before `exec`, so there is nothing to clean up). The
//! jailer copies the Firecracker binary into the chroot itself (on purpose:
//! no two VMMs share its pages), drops to the uid/gid and execs it.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use super::config::{IdRange, JailerConfig, VmResources};
use crate::jail::CgroupLayout;
use crate::SandboxId;

/// The name of the jailer's `--exec-file` in the chroot path
/// (`<base>/<exec-file name>/<id>/root`). The binary Kiln is given may be
/// called anything; the jailer uses its file name.
pub(crate) fn exec_name(firecracker: &Path) -> OsString {
    firecracker
        .file_name()
        .map_or_else(|| "firecracker".into(), |n| n.to_owned())
}

/// One VMM's jail, decided before the jailer runs.
#[derive(Debug, Clone)]
pub(crate) struct Jail {
    pub uid: u32,
    pub gid: u32,
    /// `<base>/<exec name>/<id>`: removed whole at teardown.
    pub dir: PathBuf,
    /// `<dir>/root`: the VMM's `/`.
    pub root: PathBuf,
    /// The cgroup directories the jailer will create.
    pub cgroups: Vec<PathBuf>,
    /// `--cgroup file=value` arguments.
    pub cgroup_args: Vec<String>,
    pub cgroup_version: u8,
    /// The claim file holding `uid`.
    pub claim: PathBuf,
}

/// Why a jail could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Every id of the range belongs to a live sandbox.
    #[error("every uid of the jail range {first}..{end} is claimed by a live sandbox: widen the range or reap dead ones", first = range.first, end = u64::from(range.first) + u64::from(range.count))]
    IdsExhausted { range: IdRange },
    /// The claims directory is unusable.
    #[error("cannot claim a jail uid under {dir}: {source}")]
    Claim {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The chroot base cannot be resolved.
    #[error("the jailer's chroot base {path} cannot be resolved: {source}")]
    ChrootBase {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No cgroup hierarchy the jailer could use.
    #[error("the jailer needs cgroups: {0}")]
    Cgroups(#[source] crate::jail::CgroupError),
}

/// Claims a free id of `range` for `id` by creating `<claims>/<n>`
/// exclusively; probing starts at an offset derived from the (random) id so
/// that concurrent creators rarely collide.
fn claim_id(claims: &Path, range: IdRange, id: &SandboxId) -> Result<(u32, PathBuf), JailError> {
    let dir = claims.to_owned();
    let claim_err = |source| JailError::Claim {
        dir: dir.clone(),
        source,
    };
    fs::create_dir_all(&dir).map_err(claim_err)?;
    let start = u64::from_str_radix(id.as_str(), 16).unwrap_or(0) % u64::from(range.count);
    for k in 0..u64::from(range.count) {
        let n = range.first + ((start + k) % u64::from(range.count)) as u32;
        let path = dir.join(n.to_string());
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => {
                io::Write::write_all(&mut &f, id.as_str().as_bytes()).map_err(claim_err)?;
                return Ok((n, path));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(claim_err(e)),
        }
    }
    Err(JailError::IdsExhausted { range })
}

impl Jail {
    /// Claims a uid and decides the paths and cgroups of `id`'s jail.
    /// Nothing but the claim exists yet.
    pub fn plan(
        config: &JailerConfig,
        claims: &Path,
        firecracker: &Path,
        id: &SandboxId,
        resources: VmResources,
    ) -> Result<Self, JailError> {
        let base =
            fs::canonicalize(&config.chroot_base).map_err(|source| JailError::ChrootBase {
                path: config.chroot_base.clone(),
                source,
            })?;
        let layout =
            CgroupLayout::detect(Path::new("/sys/fs/cgroup")).map_err(JailError::Cgroups)?;
        let (uid, claim) = claim_id(claims, config.ids, id)?;
        let dir = base.join(exec_name(firecracker)).join(id.as_str());
        let memory = (resources.memory_mib + config.vmm_memory_overhead_mib) << 20;
        let (cgroup_version, cgroups, cgroup_args) = match &layout {
            CgroupLayout::V1 {
                memory: mem, cpu, ..
            } => {
                let mut dirs = vec![mem.join(&config.parent_cgroup).join(id.as_str())];
                let mut args = vec![format!("memory.limit_in_bytes={memory}")];
                if let (Some(cpu), true) = (cpu, resources.cpu_millis > 0) {
                    dirs.push(cpu.join(&config.parent_cgroup).join(id.as_str()));
                    args.push(format!("cpu.cfs_period_us={CPU_PERIOD_US}"));
                    args.push(format!(
                        "cpu.cfs_quota_us={}",
                        cpu_quota_us(resources.cpu_millis)
                    ));
                }
                (1, dirs, args)
            }
            CgroupLayout::V2 { root } => {
                let mut args = vec![format!("memory.max={memory}")];
                if resources.cpu_millis > 0 {
                    args.push(format!(
                        "cpu.max={} {CPU_PERIOD_US}",
                        cpu_quota_us(resources.cpu_millis)
                    ));
                }
                (
                    2,
                    vec![root.join(&config.parent_cgroup).join(id.as_str())],
                    args,
                )
            }
        };
        Ok(Self {
            uid,
            gid: uid,
            root: dir.join("root"),
            dir,
            cgroups,
            cgroup_args,
            cgroup_version,
            claim,
        })
    }

    /// The jailer's arguments, up to and including the `--` before
    /// Firecracker's own.
    pub fn args(&self, config: &JailerConfig, firecracker: &Path, id: &SandboxId) -> Vec<OsString> {
        let base = self
            .dir
            .parent()
            .and_then(Path::parent)
            .expect("the jail directory is <base>/<exec name>/<id>");
        let mut args: Vec<OsString> = vec![
            "--id".into(),
            id.as_str().into(),
            "--exec-file".into(),
            firecracker.into(),
            "--uid".into(),
            self.uid.to_string().into(),
            "--gid".into(),
            self.gid.to_string().into(),
            "--chroot-base-dir".into(),
            base.into(),
            "--cgroup-version".into(),
            self.cgroup_version.to_string().into(),
            "--parent-cgroup".into(),
            config.parent_cgroup.clone().into(),
        ];
        for c in &self.cgroup_args {
            args.push("--cgroup".into());
            args.push(c.into());
        }
        if config.new_pid_ns {
            args.push("--new-pid-ns".into());
        }
        args.push("--".into());
        args
    }

    /// Makes `source` reachable inside the chroot as `/<name>` by a hard
    /// link (the jailer's chroot sees nothing else of the host).
    pub fn link_in(&self, source: &Path, name: &str) -> io::Result<PathBuf> {
        let target = self.root.join(name);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::hard_link(source, &target)?;
        Ok(target)
    }

    /// Whether the VMM's uid/gid may read `path` (a linked file keeps its
    /// owner and mode).
    pub fn can_read(&self, path: &Path) -> bool {
        fs::metadata(path).is_ok_and(|m| {
            let mode = m.mode();
            (m.uid() == self.uid && mode & 0o400 != 0)
                || (m.gid() == self.gid && mode & 0o040 != 0)
                || mode & 0o004 != 0
        })
    }

    /// Whether the VMM's uid/gid may connect to the socket at `path`
    /// (connecting needs write permission).
    pub fn can_connect(&self, path: &Path) -> bool {
        fs::metadata(path).is_ok_and(|m| {
            let mode = m.mode();
            (m.uid() == self.uid && mode & 0o200 != 0)
                || (m.gid() == self.gid && mode & 0o020 != 0)
                || mode & 0o002 != 0
        })
    }

    /// Creates a file (or directory) inside the chroot owned by the VMM.
    pub fn own(&self, path: &Path) -> io::Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
    }
}

/// CFS period used for CPU quotas: the kernel's default, 100 ms.
const CPU_PERIOD_US: u64 = 100_000;

/// The CFS quota for `millis` thousandths of a CPU (at least 1 ms, the
/// kernel's minimum).
fn cpu_quota_us(millis: u64) -> u64 {
    (millis * CPU_PERIOD_US / 1000).max(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_hand_out_each_id_once_and_say_when_none_is_left() {
        let dir = std::env::temp_dir().join(format!("kiln-fc-claims-{}", std::process::id()));
        let range = IdRange {
            first: 5000,
            count: 3,
        };
        let mut got = Vec::new();
        for _ in 0..3 {
            let (n, path) = claim_id(&dir, range, &SandboxId::random()).unwrap();
            assert!(range.contains(n));
            assert!(path.exists());
            got.push(n);
        }
        got.sort_unstable();
        assert_eq!(got, vec![5000, 5001, 5002]);
        let e = claim_id(&dir, range, &SandboxId::random()).unwrap_err();
        assert!(matches!(e, JailError::IdsExhausted { .. }), "{e}");
        assert!(e.to_string().contains("5000..5003"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cpu_quotas_follow_the_millis() {
        assert_eq!(cpu_quota_us(1000), 100_000);
        assert_eq!(cpu_quota_us(250), 25_000);
        assert_eq!(cpu_quota_us(1), 1000);
    }
}

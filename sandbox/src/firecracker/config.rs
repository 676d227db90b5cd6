//! How Kiln runs Firecracker on this host: where the binaries are, whether
//! each VMM is jailed and how (chroot base, a uid/gid per sandbox from a
//! configured range, cgroups, namespaces), where the per-sandbox records
//! live, and how long to wait. Firecracker is an external program, so
//! [`FirecrackerConfig::check`] tells before the first VM, naming the
//! setting to change, when the binaries or KVM are not usable.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::models::LogLevel;
use crate::SandboxSpec;

/// `KILN_FIRECRACKER_BIN`: the `firecracker` binary.
pub const FIRECRACKER_BIN_VAR: &str = "KILN_FIRECRACKER_BIN";
/// `KILN_JAILER_BIN`: the `jailer` binary.
pub const JAILER_BIN_VAR: &str = "KILN_JAILER_BIN";

/// Settings of the Firecracker layer.
#[derive(Debug, Clone)]
pub struct FirecrackerConfig {
    /// The `firecracker` binary (`KILN_FIRECRACKER_BIN`).
    pub firecracker_bin: PathBuf,
    /// The `jailer` binary (`KILN_JAILER_BIN`); used when `jailer` is set.
    pub jailer_bin: PathBuf,
    /// Run each VMM under the jailer; `None` runs it directly as our child
    /// (tests, development).
    pub jailer: Option<JailerConfig>,
    /// Per-sandbox records (`<state_dir>/firecracker/<id>/record.json`) and
    /// the files of unjailed VMs beside them; uid claims in
    /// `<state_dir>/firecracker-uids/`.
    pub state_dir: PathBuf,
    /// How long Firecracker may take, from spawn, to accept connections on
    /// its API socket.
    pub api_ready_timeout: Duration,
    /// How long one API call may take (snapshot create and load included).
    pub api_timeout: Duration,
    /// Firecracker's own log level (`--level`); the log is the file
    /// `firecracker.log` in the VM's directory.
    pub log_level: LogLevel,
}

/// How the jailer confines each VMM.
#[derive(Debug, Clone)]
pub struct JailerConfig {
    /// `--chroot-base-dir`; each VM gets `<base>/firecracker/<id>/root`.
    /// Must exist, and be on the same filesystem as the kernel, the disks
    /// and the snapshot files, which are hard-linked into the chroot.
    pub chroot_base: PathBuf,
    /// Uids (and the same gids) handed out one per live sandbox.
    pub ids: IdRange,
    /// `--parent-cgroup`: the VMs' groups are `<parent>/<id>` in each
    /// hierarchy used (memory and cpu).
    pub parent_cgroup: String,
    /// `--new-pid-ns`: Firecracker is pid 1 of a namespace of its own.
    pub new_pid_ns: bool,
    /// A network namespace of its own per VMM (only loopback).
    pub own_netns: bool,
    /// Host memory allowed on top of the guest's, for the VMM itself (its
    /// heap, page tables, device queues); Firecracker's own target is 5 MiB
    /// of overhead.
    pub vmm_memory_overhead_mib: u64,
}

/// A contiguous range of ids: `first`, `first + 1`, ... `first + count - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub first: u32,
    pub count: u32,
}

impl IdRange {
    pub fn contains(&self, id: u32) -> bool {
        id >= self.first && id - self.first < self.count
    }
}

impl Default for JailerConfig {
    fn default() -> Self {
        Self {
            chroot_base: PathBuf::from("/srv/jailer"),
            ids: IdRange {
                first: 900_000,
                count: 10_000,
            },
            parent_cgroup: "kiln-firecracker".into(),
            new_pid_ns: true,
            own_netns: true,
            vmm_memory_overhead_mib: 64,
        }
    }
}

impl FirecrackerConfig {
    /// Defaults, with the binaries from `KILN_FIRECRACKER_BIN` and
    /// `KILN_JAILER_BIN` (else `firecracker` and `jailer` on `PATH`), jailed.
    pub fn from_env() -> Self {
        let var = |name: &str, default: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from(default), PathBuf::from)
        };
        Self {
            firecracker_bin: var(FIRECRACKER_BIN_VAR, "firecracker"),
            jailer_bin: var(JAILER_BIN_VAR, "jailer"),
            jailer: Some(JailerConfig::default()),
            state_dir: PathBuf::from("/run/kiln"),
            api_ready_timeout: Duration::from_secs(5),
            api_timeout: Duration::from_secs(30),
            log_level: LogLevel::Info,
        }
    }

    /// The directory of Kiln's Firecracker records and files.
    pub fn layer_dir(&self) -> PathBuf {
        self.state_dir.join("firecracker")
    }

    /// Whether Firecracker can run here as configured: the binaries exist
    /// and are executable (resolved on `PATH` when given by name), `/dev/kvm`
    /// opens for reading and writing, the chroot base exists and the id range
    /// is not empty. Returns the binaries' resolved paths.
    pub fn check(&self) -> Result<Binaries, PreflightError> {
        let firecracker =
            resolve(&self.firecracker_bin).ok_or_else(|| PreflightError::FirecrackerMissing {
                path: self.firecracker_bin.clone(),
            })?;
        let jailer = match &self.jailer {
            None => None,
            Some(jail) => {
                let jailer =
                    resolve(&self.jailer_bin).ok_or_else(|| PreflightError::JailerMissing {
                        path: self.jailer_bin.clone(),
                    })?;
                if !jail.chroot_base.is_dir() {
                    return Err(PreflightError::ChrootBase {
                        path: jail.chroot_base.clone(),
                    });
                }
                if jail.ids.count == 0 || jail.ids.first == 0 {
                    return Err(PreflightError::IdRange { range: jail.ids });
                }
                Some(jailer)
            }
        };
        kvm_usable()?;
        Ok(Binaries {
            firecracker,
            jailer,
        })
    }
}

/// The binaries [`FirecrackerConfig::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    pub firecracker: PathBuf,
    /// Set when jailing.
    pub jailer: Option<PathBuf>,
}

/// Why Firecracker cannot run here as configured.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// The configured Firecracker binary is not an executable file.
    #[error("the Firecracker binary {path} is not an executable file: set firecracker.bin (--firecracker-bin, KILN_FIRECRACKER_BIN) to the path of `firecracker`")]
    FirecrackerMissing { path: PathBuf },
    /// The configured jailer binary is not an executable file.
    #[error("the jailer binary {path} is not an executable file: set firecracker.jailer_bin (--jailer-bin, KILN_JAILER_BIN) to the path of `jailer`, or run Firecracker unjailed (firecracker.jailed = false)")]
    JailerMissing { path: PathBuf },
    /// `/dev/kvm` cannot be opened.
    #[error("/dev/kvm cannot be opened for reading and writing ({source}): Firecracker needs KVM; run on a host with KVM, as a user in its group, or choose another backend (backend.kind / --backend / KILN_BACKEND: jail or qemu)")]
    Kvm {
        #[source]
        source: std::io::Error,
    },
    /// The jailer's chroot base directory does not exist.
    #[error("the jailer's chroot base {path} is not a directory: create it or set firecracker.chroot_base (--firecracker-chroot-base, KILN_FIRECRACKER_CHROOT_BASE) to one")]
    ChrootBase { path: PathBuf },
    /// The uid/gid range cannot hand out any id.
    #[error("the jail id range {range:?} is empty or starts at 0 (root): set firecracker.uid_first and firecracker.uid_count (--firecracker-uid-first, --firecracker-uid-count) to a range of unused, unprivileged ids")]
    IdRange { range: IdRange },
}

/// `prog` as an executable file: a path as given, a bare name on `PATH`.
fn resolve(prog: &Path) -> Option<PathBuf> {
    let executable = |p: &Path| {
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if prog.components().count() > 1 {
        return executable(prog).then(|| prog.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| executable(p))
}

/// Whether `/dev/kvm` opens read-write (what Firecracker does first).
pub fn kvm_usable() -> Result<(), PreflightError> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|source| PreflightError::Kvm { source })
}

/// The machine a VM gets, and the host limits of its VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmResources {
    /// 1 to 32.
    pub vcpus: u8,
    /// Guest RAM.
    pub memory_mib: u64,
    /// Host CPU quota of the VMM (jailed), in thousandths of a CPU; 0 for
    /// none.
    pub cpu_millis: u64,
}

impl VmResources {
    /// A sandbox's limits as a machine: RAM is the job's memory plus
    /// `guest_overhead_mib` (the guest kernel and agent), vCPUs follow the
    /// CPU quota (rounded up, at most `max_vcpus`), and the VMM's CPU quota
    /// is the sandbox's.
    pub fn for_sandbox(spec: &SandboxSpec, guest_overhead_mib: u64, max_vcpus: u8) -> Self {
        let vcpus = spec
            .cpu_millis
            .div_ceil(1000)
            .clamp(1, u64::from(max_vcpus.clamp(1, 32)));
        Self {
            vcpus: vcpus as u8,
            memory_mib: spec.memory_mb + guest_overhead_mib,
            cpu_millis: spec.cpu_millis,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_name_the_setting() {
        let mut cfg = FirecrackerConfig::from_env();
        cfg.firecracker_bin = "/nonexistent/firecracker".into();
        let e = cfg.check().unwrap_err().to_string();
        assert!(e.contains("KILN_FIRECRACKER_BIN"), "{e}");
        assert!(e.contains("/nonexistent/firecracker"), "{e}");

        cfg.firecracker_bin = "/bin/true".into();
        cfg.jailer_bin = "no-such-jailer-on-path".into();
        let e = cfg.check().unwrap_err().to_string();
        assert!(e.contains("KILN_JAILER_BIN"), "{e}");

        // A file that is not executable is not a binary.
        let plain = std::env::temp_dir().join(format!("kiln-fc-plain-{}", std::process::id()));
        fs::write(&plain, "not a program").unwrap();
        fs::set_permissions(&plain, fs::Permissions::from_mode(0o644)).unwrap();
        cfg.firecracker_bin = plain.clone();
        let result = cfg.check();
        fs::remove_file(&plain).unwrap();
        assert!(
            matches!(result, Err(PreflightError::FirecrackerMissing { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn a_sandbox_becomes_a_machine() {
        let spec = SandboxSpec::for_job(&kiln_protocol::Limits::default(), "python");
        let r = VmResources::for_sandbox(
            &SandboxSpec {
                memory_mb: 256,
                cpu_millis: 1500,
                ..spec.clone()
            },
            64,
            4,
        );
        assert_eq!(
            r,
            VmResources {
                vcpus: 2,
                memory_mib: 320,
                cpu_millis: 1500
            }
        );
        let tiny = VmResources::for_sandbox(
            &SandboxSpec {
                cpu_millis: 0,
                ..spec.clone()
            },
            0,
            4,
        );
        assert_eq!(tiny.vcpus, 1);
        let wide = VmResources::for_sandbox(
            &SandboxSpec {
                cpu_millis: 64_000,
                ..spec
            },
            0,
            200,
        );
        assert_eq!(wide.vcpus, 32);
    }

    #[test]
    fn id_ranges_contain_their_ids_only() {
        let r = IdRange {
            first: 10,
            count: 3,
        };
        assert!(r.contains(10) && r.contains(12));
        assert!(!r.contains(9) && !r.contains(13));
    }
}

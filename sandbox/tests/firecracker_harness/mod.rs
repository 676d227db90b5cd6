//! What the Firecracker tests share: finding Firecracker through the
//! documented variables (or saying why a test was skipped), one private
//! corner of the host per test (state directory, chroot base, cgroup parent,
//! uid range), talking to the test guest, and finding anything a test left.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_sandbox::firecracker::{
    adopt_orphaned_vmms, kvm_usable, BootSpec, FirecrackerConfig, FirecrackerVm, IdRange,
    JailerConfig, LogLevel, VmResources, FIRECRACKER_BIN_VAR, JAILER_BIN_VAR,
};
use kiln_test_guest::Command;

/// How long one guest command may take (the guest is emulated, the machine
/// shared).
pub const GUEST: Duration = Duration::from_secs(30);

/// Waits and bounds for the host side (processes gone, files written).
pub const HOST: Duration = Duration::from_secs(20);

const REQUIRE_VAR: &str = "KILN_REQUIRE_FIRECRACKER";

/// Firecracker and its jailer, from `KILN_FIRECRACKER_BIN` and
/// `KILN_JAILER_BIN`, with `/dev/kvm` usable; `Err` says what is missing.
pub fn binaries() -> Result<(PathBuf, PathBuf), String> {
    let var = |name: &str| -> Result<PathBuf, String> {
        let path = std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| format!("{name} is not set"))?;
        if !path.is_file() {
            return Err(format!("{name}={} is not a file", path.display()));
        }
        Ok(path)
    };
    let fc = var(FIRECRACKER_BIN_VAR)?;
    let jailer = var(JAILER_BIN_VAR)?;
    kvm_usable().map_err(|e| e.to_string())?;
    Ok((fc, jailer))
}

/// A scope for `test` when Firecracker can run here. Otherwise prints that
/// the test was skipped and why and returns `None`, or fails when
/// `KILN_REQUIRE_FIRECRACKER=1` (as `scripts/test.sh` sets it).
pub fn scope(test: &str) -> Option<Scope> {
    match binaries() {
        Ok((firecracker, jailer)) => Some(Scope::new(test, firecracker, jailer)),
        Err(why) if std::env::var(REQUIRE_VAR).as_deref() == Ok("1") => {
            panic!("{REQUIRE_VAR}=1 but Firecracker cannot run: {why}")
        }
        Err(why) => {
            eprintln!(
                "SKIPPED {test}: {why} (point {FIRECRACKER_BIN_VAR} and {JAILER_BIN_VAR} at Firecracker's binaries; {REQUIRE_VAR}=1 makes this a failure)"
            );
            None
        }
    }
}

/// One test's corner of the host.
pub struct Scope {
    pub test: String,
    pub dir: PathBuf,
    pub parent_cgroup: String,
    pub ids: IdRange,
    pub firecracker: PathBuf,
    pub jailer: PathBuf,
}

const CGROUP_ROOTS: &[&str] = &[
    "/sys/fs/cgroup/memory",
    "/sys/fs/cgroup/cpu",
    "/sys/fs/cgroup/pids",
    "/sys/fs/cgroup/unified",
];

impl Scope {
    pub fn new(test: &str, firecracker: PathBuf, jailer: PathBuf) -> Self {
        Self::with_tag(
            &format!("kfc-{}-{test}", std::process::id()),
            firecracker,
            jailer,
        )
    }

    /// The scope named `tag` (directory, cgroup parent, uid range), made
    /// afresh: a child process given the tag works in its parent's scope.
    pub fn with_tag(tag: &str, firecracker: PathBuf, jailer: PathBuf) -> Self {
        // Jailed VMMs are orphaned by the jailer's exit; adopt them so that
        // teardown can reap them (this machine's init does not).
        adopt_orphaned_vmms().expect("PR_SET_CHILD_SUBREAPER");
        let tag = tag.to_owned();
        let dir = std::env::temp_dir().join(&tag);
        let _ = fs::remove_dir_all(&dir);
        for d in ["state", "jail", "snapshots", "pages"] {
            fs::create_dir_all(dir.join(d)).expect("scope directory");
        }
        // The page server's sockets are 0o666 (jailed VMMs connect under
        // their own uids); only root may reach them here.
        fs::set_permissions(
            dir.join("pages"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod pages");
        // A uid range per test, so that parallel tests never share ids.
        let hash = tag
            .bytes()
            .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        Self {
            test: tag.clone(),
            parent_cgroup: tag,
            ids: IdRange {
                first: 2_000_000 + (hash % 1000) * 100,
                count: 100,
            },
            dir,
            firecracker,
            jailer,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn chroot_base(&self) -> PathBuf {
        self.dir.join("jail")
    }

    /// A page server socket path (in a root-only directory).
    pub fn page_socket(&self, name: &str) -> PathBuf {
        self.dir.join("pages").join(name)
    }

    /// The layer's configuration for this scope, jailed or not.
    pub fn config(&self, jailed: bool) -> FirecrackerConfig {
        let mut config = FirecrackerConfig::from_env();
        config.firecracker_bin = self.firecracker.clone();
        config.jailer_bin = self.jailer.clone();
        config.state_dir = self.state_dir();
        config.log_level = LogLevel::Info;
        config.api_ready_timeout = HOST;
        config.jailer = jailed.then(|| JailerConfig {
            chroot_base: self.chroot_base(),
            ids: self.ids,
            parent_cgroup: self.parent_cgroup.clone(),
            new_pid_ns: true,
            own_netns: true,
            vmm_memory_overhead_mib: 32,
        });
        config
    }

    /// Everything this scope's VMs left: records, claims, chroots, cgroups,
    /// processes rooted or named in the scope, mounts of it.
    pub fn leftovers(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (what, dir) in [("state", "firecracker"), ("uid claim", "firecracker-uids")] {
            v.extend(
                fs::read_dir(self.state_dir().join(dir))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| format!("{what} {}", e.path().display())),
            );
        }
        for e in fs::read_dir(self.chroot_base())
            .into_iter()
            .flatten()
            .flatten()
        {
            v.extend(
                fs::read_dir(e.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|j| format!("jail {}", j.path().display())),
            );
        }
        for root in CGROUP_ROOTS {
            let parent = Path::new(root).join(&self.parent_cgroup);
            v.extend(
                fs::read_dir(&parent)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| format!("cgroup {}", e.path().display())),
            );
        }
        v.extend(self.processes().into_iter().map(|p| format!("process {p}")));
        let needle = self.dir.to_string_lossy().into_owned();
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        v.extend(
            mounts
                .lines()
                .filter(|l| l.contains(&needle))
                .map(|l| format!("mount {l}")),
        );
        v
    }

    /// Processes (zombies included) rooted in the scope or naming it.
    pub fn processes(&self) -> Vec<u32> {
        let needle = self.dir.to_string_lossy().into_owned();
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                if pid == std::process::id() {
                    return None;
                }
                let rooted = rooted_under(pid, &self.chroot_base());
                let named = fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle));
                (rooted || named).then_some(pid)
            })
            .collect()
    }

    /// Waits (bounded) until nothing is left; returns what stayed.
    pub fn wait_clean(&self) -> Vec<String> {
        kiln_tests::wait_empty(HOST, || self.leftovers())
    }

    /// A bare test-guest machine.
    pub fn boot_spec(&self, resources: VmResources) -> BootSpec {
        BootSpec::new(kiln_test_guest::elf(), resources)
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        // Whatever a failed test left: its processes by pid (a dropped VM's
        // own teardown may be racing us; both only kill and remove), then
        // its cgroups, then its files, each retried for a bounded time.
        let deadline = std::time::Instant::now() + HOST;
        loop {
            let procs = self.processes();
            for &pid in &procs {
                // SAFETY: kill has no memory-safety preconditions; the pid
                // was just found rooted in or naming this scope.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            let mut left = !procs.is_empty();
            for root in CGROUP_ROOTS {
                let parent = Path::new(root).join(&self.parent_cgroup);
                for e in fs::read_dir(&parent).into_iter().flatten().flatten() {
                    let _ = fs::remove_dir(e.path());
                }
                let _ = fs::remove_dir(&parent);
                left |= parent.exists();
            }
            let _ = fs::remove_dir_all(&self.dir);
            left |= self.dir.exists();
            if !left || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The default test machine: one vCPU, 128 MiB, no CPU quota.
pub fn small() -> VmResources {
    VmResources {
        vcpus: 1,
        memory_mib: 128,
        cpu_millis: 0,
    }
}

/// Waits for the guest's ready line.
pub async fn ready(vm: &FirecrackerVm) {
    let line = vm
        .console()
        .wait_for(GUEST, |l| l == kiln_test_guest::READY)
        .await;
    assert!(
        line.is_ok(),
        "the test guest did not say it was ready: {:?}; console: {:?}; log: {}",
        line,
        vm.console().tail(),
        fs::read_to_string(vm.log_path()).unwrap_or_default()
    );
}

/// Sends a command to the test guest and returns its answer.
pub async fn ask(vm: &FirecrackerVm, command: Command) -> String {
    vm.console()
        .request(&command.line(), GUEST)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the test guest did not answer {:?}: {e}; console: {:?}",
                command.line(),
                vm.console().tail()
            )
        })
}

/// Writes `pages` pattern pages for `seed` and checks the guest's sum.
pub async fn write_pattern(vm: &FirecrackerVm, seed: u64, pages: u64) {
    let reply = ask(vm, Command::Write { seed, pages }).await;
    let (n, sum) = kiln_test_guest::parse_wrote(&reply).unwrap();
    assert_eq!(n, pages);
    assert_eq!(sum, kiln_test_guest::pattern::checksum(seed, pages));
}

/// Asserts that the guest reads back `pages` intact pattern pages of `seed`.
pub async fn assert_pattern(vm: &FirecrackerVm, seed: u64, pages: u64) {
    let reply = ask(vm, Command::Check { seed, pages }).await;
    let report = kiln_test_guest::parse_check(&reply).unwrap();
    assert_eq!(
        (report.ok, report.bad, report.sum),
        (pages, 0, kiln_test_guest::pattern::checksum(seed, pages)),
        "the guest's pattern is not intact: {reply}"
    );
}

/// The guest's tick count.
pub async fn ticks(vm: &FirecrackerVm) -> u64 {
    kiln_test_guest::parse_count(&ask(vm, Command::Count).await).unwrap()
}

/// Whether the root directory of `pid` is a jail under `base`
/// (`<base>/<exec name>/<id>/root`), compared by device and inode: the link
/// `/proc/<pid>/root` of a process in another mount namespace reads `/`.
pub fn rooted_under(pid: u32, base: &Path) -> bool {
    let Ok(theirs) = fs::metadata(format!("/proc/{pid}/root/")) else {
        return false;
    };
    fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|exec| fs::read_dir(exec.path()).into_iter().flatten().flatten())
        .filter_map(|jail| fs::metadata(jail.path().join("root")).ok())
        .any(|m| m.dev() == theirs.dev() && m.ino() == theirs.ino())
}

/// Whether the root directory of `pid` is `root` (by device and inode).
pub fn has_root(pid: u32, root: &Path) -> bool {
    match (
        fs::metadata(format!("/proc/{pid}/root/")),
        fs::metadata(root),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether `pid` still exists (zombies included).
pub fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

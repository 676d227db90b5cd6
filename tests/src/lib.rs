//! Shared harness of Kiln's black-box tests (in `tests/tests/`): where the
//! built binaries are, how to run `kiln` and read its result, and how to
//! check that nothing was left on the host. The tests drive the real
//! binaries; nothing here stands in for a real component.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kiln_protocol::JobResult;

pub mod broker;
pub mod images;
pub mod netlab;
pub mod openapi;
pub mod registry;
pub mod server;

/// The directory holding the built binaries (`target/debug`), found from the
/// running test executable (`target/debug/deps/<test>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("target dir")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// Path of a workspace binary, with a clear message if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`)",
        p.display()
    );
    p
}

/// One test's private corner of the host: its own state directory and its
/// own parent cgroup, so that parallel tests never reap or count each
/// other's sandboxes. Removes both (when empty) on drop.
pub struct Scope {
    pub state_dir: PathBuf,
    pub cgroup_parent: String,
}

const CGROUP_ROOTS: &[&str] = &[
    "/sys/fs/cgroup",
    "/sys/fs/cgroup/memory",
    "/sys/fs/cgroup/pids",
    "/sys/fs/cgroup/cpu",
    "/sys/fs/cgroup/cpuacct",
];

impl Scope {
    pub fn new(test: &str) -> Self {
        let tag = format!("kiln-test-{}-{test}", std::process::id());
        let state_dir = std::env::temp_dir().join(&tag);
        std::fs::create_dir_all(&state_dir).expect("state dir");
        Self {
            state_dir,
            cgroup_parent: tag,
        }
    }

    /// `kiln run <args>` with this scope's flags, `--json` and stdin closed;
    /// returns the parsed result and the exit code.
    pub fn run_json(&self, args: &[&str]) -> (JobResult, i32) {
        let out = self.run(args, &["--json", "--no-stdin"]);
        let r: JobResult = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "kiln run did not print a JobResult ({e}); stdout: {} stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (r, out.status.code().unwrap_or(-1))
    }

    /// `kiln run <extra> <scope flags> <args>` to completion, stdin closed.
    pub fn run(&self, args: &[&str], extra: &[&str]) -> Output {
        self.command(args, extra)
            .stdin(Stdio::null())
            .output()
            .expect("spawning kiln")
    }

    /// The `kiln run` command, for tests that need to control it.
    pub fn command(&self, args: &[&str], extra: &[&str]) -> Command {
        let mut c = Command::new(bin("kiln"));
        c.arg("run")
            .args(extra)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .args(args);
        c
    }

    /// Everything this scope's sandboxes left: cgroups under its parent and
    /// entries in its state directory.
    pub fn leftovers(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for root in CGROUP_ROOTS {
            if let Ok(rd) = std::fs::read_dir(Path::new(root).join(&self.cgroup_parent)) {
                v.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.state_dir.join("jails")) {
            v.extend(rd.flatten().map(|e| e.path()));
        }
        v
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        for root in CGROUP_ROOTS {
            let _ = std::fs::remove_dir(Path::new(root).join(&self.cgroup_parent));
        }
        // The test's own files go too, unless sandboxes were left: then
        // their records stay for `kiln reap` and for whoever debugs it.
        if self.leftovers().is_empty() {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
    }
}

/// Calls `cond` every 100 ms until it holds or `within` has passed;
/// whether it held.
pub fn wait_until(within: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + within;
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    cond()
}

/// Calls `probe` every 20 ms until it returns nothing or `within` has
/// passed; returns its last answer (empty unless something stayed).
pub fn wait_empty<T>(within: std::time::Duration, mut probe: impl FnMut() -> Vec<T>) -> Vec<T> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = probe();
        if left.is_empty() || std::time::Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits (bounded) until no process's command line mentions `needle`;
/// returns the pids of those still there.
pub fn wait_processes_gone(needle: &str, within: std::time::Duration) -> Vec<i32> {
    wait_empty(within, || processes_matching(needle))
}

/// Pids of processes whose command line mentions `needle`.
pub fn processes_matching(needle: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) {
                v.push(pid);
            }
        }
    }
    v
}

/// Whether the microVM guest's kernel and image exist (from
/// `KILN_GUEST_KERNEL`/`KILN_GUEST_ROOTFS` or the build cache). Without
/// them a guest test prints SKIPPED and why, or fails when
/// `KILN_REQUIRE_GUEST=1` (as the test command sets it).
pub fn has_guest() -> bool {
    let cache = PathBuf::from(
        std::env::var("KILN_GUEST_CACHE").unwrap_or_else(|_| "/var/cache/kiln/guest".into()),
    );
    let found = |prefix: &str, file: &str| {
        std::fs::read_dir(&cache)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.file_name().to_string_lossy().starts_with(prefix) && e.path().join(file).is_file()
            })
    };
    let ok = (std::env::var_os("KILN_GUEST_KERNEL").is_some() || found("kernel-", "vmlinux"))
        && (std::env::var_os("KILN_GUEST_ROOTFS").is_some() || found("rootfs-", "rootfs.ext4"));
    if !ok {
        let msg = "no guest kernel/rootfs: build them with deploy/guest/build.sh";
        if std::env::var("KILN_REQUIRE_GUEST").as_deref() == Ok("1") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
    }
    ok
}

//! Every jail's agent runs from an executable inode of its own: one jail's
//! agent (were a job to take it over) can neither watch other jails being
//! started (each start opens the binary to exec it) nor lock the binary
//! against them, and neither can anything else that reaches the file. The
//! host here plays the watcher, through `/proc/<agent>/exe`, exactly the
//! handle an agent has on itself. Needs root and the built `kiln-agent`.

use std::fs::File;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use kiln_protocol::RuntimeTable;
use kiln_sandbox::jail::{JailBackend, JailConfig};
use kiln_sandbox::{Backend, Sandbox, SandboxSpec};
use kiln_tests::Scope;

fn watch(path: &str) -> OwnedFd {
    // SAFETY: inotify_init1 has no memory arguments.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: inotify_init1 returned a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let c = std::ffi::CString::new(path).unwrap();
    // SAFETY: a NUL-terminated path.
    let wd = unsafe {
        libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_OPEN | libc::IN_ACCESS)
    };
    assert!(
        wd >= 0,
        "watching {path}: {}",
        std::io::Error::last_os_error()
    );
    fd
}

/// Drains the watch; whether anything had arrived.
fn saw_events(fd: &OwnedFd) -> bool {
    let mut buf = [0u8; 4096];
    // SAFETY: reading into a valid buffer.
    unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) > 0 }
}

fn lock(path: &str) -> (File, bool) {
    let f = File::open(path).unwrap();
    // SAFETY: flock on a descriptor we own.
    let ok = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    (f, ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_jails_agent_runs_from_an_inode_of_its_own() {
    let scope = Scope::new("sb-agent-exe");
    let mut cfg = JailConfig::new(kiln_tests::bin("kiln-agent"), RuntimeTable::default());
    cfg.state_dir = scope.state_dir.clone();
    cfg.cgroup_parent = scope.cgroup_parent.clone();
    let backend = JailBackend::new(cfg).unwrap();
    let spec = SandboxSpec::for_job(&Default::default(), "bash");

    let a = backend.create(&spec).await.unwrap();
    let exe_a = format!("/proc/{}/exe", a.pid());
    let (_held, ok) = lock(&exe_a);
    assert!(ok, "locking jail A's agent binary");
    let w = watch(&exe_a);

    let b = backend.create(&spec).await.unwrap();
    let exe_b = format!("/proc/{}/exe", b.pid());
    assert!(
        !saw_events(&w),
        "a watch on one jail's agent binary saw another jail start"
    );
    let (_b, ok) = lock(&exe_b);
    assert!(ok, "a lock on one jail's agent binary held another's");

    // The watch and the lock do work on jail A's own binary.
    std::fs::read(&exe_a).unwrap();
    assert!(saw_events(&w), "the watch missed an open of its own file");
    assert!(!lock(&exe_a).1, "the lock did not hold on its own file");

    a.destroy().await;
    b.destroy().await;
    let left = kiln_tests::wait_empty(std::time::Duration::from_secs(10), || scope.leftovers());
    assert!(left.is_empty(), "left behind: {left:?}");
}

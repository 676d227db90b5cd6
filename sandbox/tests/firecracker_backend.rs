//! The firecracker backend's own machinery on a real Firecracker, with
//! Kiln's test guest standing in for Linux (this host's KVM cannot boot a
//! Linux guest, so the agent never runs here; `tests/tests/firecracker_linux.rs`
//! runs the whole path on a KVM host). What runs for real: a template made
//! from a booted guest and published through the backend into the real
//! store, restores through the backend's own restore path and its page
//! server (the first records the working set, the next prefetches it; the
//! `File` backend too), each restored VM on a vsock socket of its own, the
//! boot path up to the agent (the ready signal reaching the host from
//! inside the jail), a failed template build, and reaping after a
//! SIGKILLed owner. Needs root, `KILN_FIRECRACKER_BIN` and
//! `KILN_JAILER_BIN` (else each test says it was skipped and why;
//! `KILN_REQUIRE_FIRECRACKER=1` makes that a failure).

mod firecracker_harness;

use std::ffi::CString;
use std::fs;
use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use firecracker_harness::{
    assert_pattern, exists, ready, scope, write_pattern, Scope, GUEST, HOST,
};
use kiln_protocol::{Limits, RuntimeTable};
use kiln_sandbox::firecracker::{
    FirecrackerBackend, FirecrackerBackendConfig, FirecrackerVm, MemorySource,
};
use kiln_sandbox::settings::{BackendKind, BackendSettings, MemoryMode};
use kiln_sandbox::{AnyBackend, Backend, SandboxSpec};
use kiln_snapshotter::{RestoreEnd, RestoreOutcome, ServeMode};

const PAGES: u64 = 256;
const SEED: u64 = 0xbac0;

/// A sandbox of 64 MiB and one CPU warming Python: a 128 MiB machine with
/// the backend's 64 MiB of guest overhead.
fn spec() -> SandboxSpec {
    SandboxSpec {
        memory_mb: 64,
        cpu_millis: 1000,
        ..SandboxSpec::for_job(&Limits::default(), "python")
    }
}

/// The test guest as the guest "kernel" and a small file as its "image",
/// in the scope (on the chroot base's filesystem, world-readable).
fn guest_files(scope: &Scope) -> (PathBuf, PathBuf) {
    let kernel = scope.dir.join("vmlinux");
    let rootfs = scope.dir.join("rootfs.img");
    fs::copy(kiln_test_guest::elf(), &kernel).unwrap();
    fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
    for f in [&kernel, &rootfs] {
        fs::set_permissions(f, fs::Permissions::from_mode(0o644)).unwrap();
    }
    (kernel, rootfs)
}

fn config(scope: &Scope, jailed: bool, memory: MemoryMode) -> FirecrackerBackendConfig {
    let (kernel, rootfs) = guest_files(scope);
    let mut cfg = FirecrackerBackendConfig::new(
        scope.config(jailed),
        kernel,
        rootfs,
        RuntimeTable::default(),
    );
    cfg.templates = Some(scope.dir.join("store"));
    cfg.memory = memory;
    cfg
}

/// What the scope holds besides the page server's sockets of a live
/// backend (which go with the backend).
fn leftovers_but_pages(scope: &Scope) -> Vec<String> {
    kiln_tests::wait_empty(HOST, || {
        scope
            .leftovers()
            .into_iter()
            .filter(|l| !l.contains("/kiln-pages/"))
            .collect()
    })
}

/// Collects progress lines.
#[derive(Default)]
struct Progress(Mutex<Vec<String>>);

impl Progress {
    fn line(&self, l: &str) {
        self.0.lock().unwrap().push(l.to_owned());
    }
    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// Boots the test guest on the machine a sandbox of `spec()` gets, writes
/// the pattern and publishes it as the template of `spec()`.
async fn publish_test_guest(backend: &FirecrackerBackend, progress: &Progress) -> String {
    let boot = backend.boot_spec(&spec()).await.expect("the machine");
    let vm = FirecrackerVm::start(&backend.config().vmm, &boot)
        .await
        .expect("booting the test guest on a sandbox's machine");
    ready(&vm).await;
    write_pattern(&vm, SEED, PAGES).await;
    let info = backend
        .publish_template(&spec(), vm, &|l| progress.line(l))
        .await
        .expect("publishing the template");
    info.id
}

/// Waits (bounded) for the page server's report of the ended restore of
/// the VMM `pid`.
fn ended_restore(backend: &FirecrackerBackend, pid: u32) -> kiln_snapshotter::RestoreReport {
    let server = backend.page_server().expect("a page server");
    let deadline = Instant::now() + HOST;
    loop {
        if let Some(r) = server
            .recent_restores()
            .into_iter()
            .find(|r| r.vmm_pid == Some(pid as i32))
        {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "the restore of VMM {pid} never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn live_restore(backend: &FirecrackerBackend, pid: u32) -> kiln_snapshotter::RestoreInfo {
    let server = backend.page_server().expect("a page server");
    server
        .restores()
        .into_iter()
        .find(|r| r.vmm_pid == pid as i32)
        .unwrap_or_else(|| panic!("no live restore of VMM {pid}: {:?}", server.restores()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_are_published_and_restored_through_the_backends_page_server() {
    let Some(scope) = scope("be-restore") else {
        return;
    };
    let backend = FirecrackerBackend::new(config(&scope, true, MemoryMode::Prefetch))
        .expect("the backend starts");
    assert!(backend.capabilities().templates);
    assert!(!backend.capabilities().reset && !backend.capabilities().resize);
    assert!(backend.templates().unwrap().is_empty());
    assert!(
        backend.restore_vm(&spec()).await.unwrap().is_none(),
        "no template yet"
    );

    // Publish: the template VM goes, its files with it; the store has them.
    let progress = Progress::default();
    let id = publish_test_guest(&backend, &progress).await;
    assert!(id.starts_with("firecracker-python-1cpu-128m-"), "{id}");
    assert!(
        progress.lines().iter().any(|l| l.contains("publishing")),
        "{:?}",
        progress.lines()
    );
    let listed = backend.templates().unwrap();
    assert_eq!(listed.len(), 1);
    let t = &listed[0];
    assert!(t.current && !t.working_set, "{t:?}");
    assert_eq!(t.memory_bytes, 128 << 20);
    assert_eq!(t.inputs["backend"], "firecracker");
    assert_eq!(t.inputs["root_drive"], "/rootfs");
    assert!(t.inputs["vmm"].starts_with("Firecracker v"), "{t:?}");
    let template_dir = t.dir.clone();
    assert_eq!(leftovers_but_pages(&scope), Vec::<String>::new());

    // The first restore records the pages its guest touches.
    let first = backend
        .restore_vm(&spec())
        .await
        .unwrap()
        .expect("a template");
    assert_eq!(first.template, id);
    assert_eq!(first.memory, MemorySource::PageServer(ServeMode::Record));
    let uds = first.vm.vsock_uds().unwrap();
    assert!(
        uds.starts_with(first.vm.paths().root()),
        "{}",
        uds.display()
    );
    tokio::net::UnixStream::connect(&uds)
        .await
        .expect("the restored vsock device listens on this VM's own socket");
    assert_pattern(&first.vm, SEED, PAGES).await;
    let live = live_restore(&backend, first.vm.pid());
    assert_eq!(live.mode, ServeMode::Record);
    assert_eq!(Some((live.vmm_uid, live.vmm_uid)), first.vm.jail_ids());
    // A second restore at the same time: its own VMM, socket and jail.
    let second = backend
        .restore_vm(&spec())
        .await
        .unwrap()
        .expect("a template");
    assert_ne!(second.vm.vsock_uds().unwrap(), uds);
    assert_ne!(second.vm.jail_ids(), first.vm.jail_ids());
    assert_pattern(&second.vm, SEED, PAGES).await;
    let pid = first.vm.pid();
    assert!(first.vm.destroy().await.is_clean());
    let recorded = ended_restore(&backend, pid);
    assert_eq!(
        recorded.outcome,
        RestoreOutcome::Ended(RestoreEnd::VmmExited)
    );
    assert!(second.vm.destroy().await.is_clean());
    assert!(
        kiln_tests::wait_empty(HOST, || {
            if backend.templates().unwrap()[0].working_set {
                vec![]
            } else {
                vec![()]
            }
        })
        .is_empty(),
        "the recording restores wrote the template's working set"
    );

    // Later restores prefetch it.
    let third = backend
        .restore_vm(&spec())
        .await
        .unwrap()
        .expect("a template");
    assert_eq!(third.memory, MemorySource::PageServer(ServeMode::Prefetch));
    let deadline = Instant::now() + HOST;
    while live_restore(&backend, third.vm.pid()).metrics.prefetch_ns == 0 {
        assert!(Instant::now() < deadline, "the prefetch did not finish");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_pattern(&third.vm, SEED, PAGES).await;
    let replayed = live_restore(&backend, third.vm.pid()).metrics;
    eprintln!(
        "recorded restore: {} faults; prefetching restore: {} faults, {} pages prefetched",
        recorded.metrics.faults_served, replayed.faults_served, replayed.prefetch_pages
    );
    assert!(replayed.prefetch_pages >= PAGES);
    assert!(
        replayed.faults_served * 10 <= recorded.metrics.faults_served,
        "prefetch left {} faults of the recorded {}",
        replayed.faults_served,
        recorded.metrics.faults_served
    );
    assert!(third.vm.destroy().await.is_clean());

    // `snapshot.memory = file`: Firecracker maps the store's memory file,
    // hard-linked into the jail.
    let by_file = FirecrackerBackend::new(config(&scope, true, MemoryMode::File)).unwrap();
    assert!(by_file.page_server().is_none());
    let restored = by_file
        .restore_vm(&spec())
        .await
        .unwrap()
        .expect("a template");
    assert_eq!(restored.memory, MemorySource::File);
    assert_eq!(
        fs::metadata(template_dir.join("memory")).unwrap().nlink(),
        2
    );
    assert_pattern(&restored.vm, SEED, PAGES).await;
    assert!(restored.vm.destroy().await.is_clean());
    assert_eq!(
        fs::metadata(template_dir.join("memory")).unwrap().nlink(),
        1
    );

    // Dropping the backend stops its page server and removes its sockets.
    let pages = scope.chroot_base().join("kiln-pages");
    assert_eq!(fs::read_dir(&pages).unwrap().count(), 1);
    drop(backend);
    drop(by_file);
    assert_eq!(fs::read_dir(&pages).unwrap().count(), 0);
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

/// Acts as the jailed VMM on behalf of its guest: in a child process that
/// enters the VM's chroot as the VM's uid (as the jailed Firecracker runs),
/// connects to the ready socket where the guest's agent would announce
/// itself, and says `ready`. Returns the child's exit status (0: heard).
fn say_ready_as_the_jailed_vmm(root: &Path, uid: u32, gid: u32) -> i32 {
    let root = CString::new(root.as_os_str().as_encoded_bytes()).unwrap();
    let slash = CString::new("/").unwrap();
    // SAFETY: a zeroed sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(b"/run/vsock.sock_1023") {
        *d = *s as libc::c_char;
    }
    // SAFETY: the child only makes async-signal-safe system calls on
    // memory prepared before the fork, then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: see above; every pointer is to memory of this process.
        unsafe {
            let code = if libc::chroot(root.as_ptr()) != 0 || libc::chdir(slash.as_ptr()) != 0 {
                2
            } else if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                3
            } else {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if fd < 0 || libc::connect(fd, std::ptr::addr_of!(addr).cast(), len) != 0 {
                    4
                } else if libc::write(fd, b"ready\n".as_ptr().cast(), 6) != 6 {
                    5
                } else {
                    0
                }
            };
            libc::_exit(code);
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    libc::WEXITSTATUS(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_guests_ready_signal_reaches_the_host_and_a_silent_agent_fails_the_boot_cleanly() {
    let Some(scope) = scope("be-boot") else {
        return;
    };
    let mut cfg = config(&scope, true, MemoryMode::Prefetch);
    cfg.templates = None;
    cfg.boot_timeout = Duration::from_secs(15);
    let backend = FirecrackerBackend::new(cfg).unwrap();
    assert!(!backend.capabilities().templates);
    let jails = scope.chroot_base().join("firecracker");
    let creating = tokio::spawn({
        let backend = backend.clone();
        async move { backend.create(&spec()).await.map(|_| ()) }
    });
    // The host listens for the agent's ready signal in the VM's root, on a
    // socket given to the VM's uid.
    let mut heard = None;
    let deadline = Instant::now() + GUEST;
    while heard.is_none() {
        assert!(Instant::now() < deadline, "no ready socket appeared");
        for jail in fs::read_dir(&jails).into_iter().flatten().flatten() {
            let root = jail.path().join("root");
            let socket = root.join("run/vsock.sock_1023");
            if let Ok(m) = fs::symlink_metadata(&socket) {
                assert_ne!(m.uid(), 0, "the ready socket belongs to the jailed uid");
                heard = Some(say_ready_as_the_jailed_vmm(&root, m.uid(), m.gid()));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(heard, Some(0), "the jailed uid could not say ready");
    // Past the ready signal, the host connects to the agent, which the
    // test guest does not have: the boot fails at that step, naming it.
    let e = creating.await.unwrap().unwrap_err().to_string();
    assert!(e.contains("did not listen"), "{e}");
    assert!(!e.contains("say ready"), "{e}");
    assert_eq!(leftovers_but_pages(&scope), Vec::<String>::new());
    // A sandbox with internet access is refused up front, by name.
    let e = backend
        .create(&SandboxSpec {
            allow_internet: true,
            ..spec()
        })
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("allow_internet"), "{e}");
    drop(backend);
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_builds_run_one_at_a_time_and_a_failed_one_leaves_nothing() {
    let Some(scope) = scope("be-build") else {
        return;
    };
    let mut cfg = config(&scope, true, MemoryMode::Prefetch);
    // The test guest never says ready: every build fails at its boot.
    cfg.boot_timeout = Duration::from_secs(3);
    let backend = FirecrackerBackend::new(cfg).unwrap();
    let (a, b) = (Progress::default(), Progress::default());
    let (the_spec, say_a, say_b) = (spec(), |l: &str| a.line(l), |l: &str| b.line(l));
    let (ra, rb) = tokio::join!(
        backend.prepare_template(&the_spec, &say_a),
        backend.prepare_template(&the_spec, &say_b),
    );
    for r in [&ra, &rb] {
        let e = r.as_ref().map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("did not say ready"), "{e}");
    }
    // The second caller waited for the first build instead of booting a
    // second template VM alongside it.
    let (a, b) = (a.lines(), b.lines());
    assert!(
        b.iter().any(|l| l.contains("waiting for the build"))
            != a.iter().any(|l| l.contains("waiting for the build")),
        "{a:?} / {b:?}"
    );
    assert!(a.iter().chain(&b).any(|l| l.contains("booting a VM")));
    assert!(backend.templates().unwrap().is_empty());
    let store = scope.dir.join("store");
    for sub in ["snapshots", "staging"] {
        assert_eq!(fs::read_dir(store.join(sub)).unwrap().count(), 0, "{sub}");
    }
    assert_eq!(leftovers_but_pages(&scope), Vec::<String>::new());
    drop(backend);
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

/// The settings of the reaping test's owner: the real entry point, in the
/// scope's corner of the host.
fn settings(scope: &Scope) -> BackendSettings {
    let mut s = BackendSettings::default();
    s.backend.kind = BackendKind::Firecracker;
    s.backend.state_dir = scope.state_dir();
    s.guest.kernel = Some(scope.dir.join("vmlinux"));
    s.guest.rootfs = Some(scope.dir.join("rootfs.img"));
    s.firecracker.bin.clone_from(&scope.firecracker);
    s.firecracker.jailer_bin.clone_from(&scope.jailer);
    s.firecracker.chroot_base = scope.chroot_base();
    s.firecracker.uid_first = scope.ids.first;
    s.firecracker.uid_count = scope.ids.count;
    s.firecracker.cgroup_parent.clone_from(&scope.parent_cgroup);
    s.snapshot.store = scope.dir.join("store");
    s
}

const OWNER_VAR: &str = "KILN_TEST_FC_BACKEND_OWNER";

/// Entry point of the owner child of the reaping test: opens the backend
/// through the settings, publishes a template and restores a sandbox's VM
/// from it (its page server recording), reports, and waits to be killed.
#[test]
fn backend_owner_child() {
    let Ok(tag) = std::env::var(OWNER_VAR) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let scope = Scope::with_tag(
            &tag,
            std::env::var_os("KILN_FIRECRACKER_BIN").unwrap().into(),
            std::env::var_os("KILN_JAILER_BIN").unwrap().into(),
        );
        guest_files(&scope);
        let AnyBackend::Firecracker(backend) = settings(&scope)
            .open(RuntimeTable::default())
            .expect("opening the backend")
        else {
            panic!("not the firecracker backend");
        };
        publish_test_guest(&backend, &Progress::default()).await;
        let restored = backend.restore_vm(&spec()).await.unwrap().unwrap();
        assert_pattern(&restored.vm, SEED, 16).await;
        println!("OWNED {} {}", restored.vm.id(), restored.vm.pid());
        println!("OWNER READY");
        std::mem::forget(scope);
        std::mem::forget(restored);
        std::mem::forget(backend);
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_sigkilled_owner_left_is_reaped_by_the_settings() {
    let Some(scope) = scope("be-reap") else {
        return;
    };
    let tag = format!("kfc-{}-be-reap-child", std::process::id());
    let child_scope = Scope::with_tag(&tag, scope.firecracker.clone(), scope.jailer.clone());
    let mut child = Process::new(std::env::current_exe().unwrap())
        .args([
            "backend_owner_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(OWNER_VAR, &tag)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut owned = None;
    let deadline = Instant::now() + GUEST * 3;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("OWNER READY") => break,
            Ok(line) => {
                if let Some(rest) = line.split("OWNED ").nth(1) {
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    owned = Some((f[0].to_owned(), f[1].parse::<u32>().unwrap()));
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the owner child did not restore its sandbox in time");
            }
        }
    }
    let (vm_id, vmm) = owned.expect("the owner reported its VM");
    child.kill().unwrap();
    child.wait().unwrap();
    let pages = child_scope.chroot_base().join("kiln-pages");
    assert_eq!(
        fs::read_dir(&pages).unwrap().count(),
        1,
        "the owner's sockets"
    );
    assert!(exists(vmm), "the jailed VMM outlives its owner");

    let report = settings(&child_scope).reap_all();
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(report.reaped.contains(&vm_id), "{report:?}");
    assert!(
        report
            .reaped
            .iter()
            .any(|r| r.starts_with("page server sockets")),
        "{report:?}"
    );
    assert!(!exists(vmm), "the VMM was killed and reaped");
    assert_eq!(fs::read_dir(&pages).unwrap().count(), 0);
    assert_eq!(child_scope.wait_clean(), Vec::<String>::new());
    // The template stays: it is the store's, not the dead owner's.
    let store = child_scope.dir.join("store/snapshots");
    assert_eq!(fs::read_dir(store).unwrap().count(), 1);
    let again = settings(&child_scope).reap_all();
    assert!(
        again.reaped.is_empty() && again.failed.is_empty(),
        "{again:?}"
    );
    drop(child_scope);
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

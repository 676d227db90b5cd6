//! Snapshots of real Firecracker VMs (with Kiln's test guest) and restores
//! from them: through Kiln's userfaultfd page server
//! (`kiln_snapshotter::PageServer`, lazily, recording a working set, and
//! prefetching it), through the `File` backend, ten at once from one
//! snapshot, and with one VMM SIGKILLed while its guest faults its pages
//! in. The guest checks its memory pattern after every restore. Needs root,
//! `KILN_FIRECRACKER_BIN` and `KILN_JAILER_BIN` (else each test says it was
//! skipped and why; `KILN_REQUIRE_FIRECRACKER=1` makes that a failure).

mod firecracker_harness;

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use firecracker_harness::{
    ask, assert_pattern, exists, ready, scope, small, ticks, write_pattern, Scope, GUEST, HOST,
};
use kiln_sandbox::firecracker::{
    FirecrackerVm, InstanceState, MemoryBackend, RestoreSpec, Snapshot,
};
use kiln_snapshotter::{
    PageServer, PageServerConfig, RestoreEnd, RestoreOutcome, ServeMode, SnapshotSource,
};
use kiln_test_guest::Command;

/// Pattern pages written before the snapshot.
const PAGES: u64 = 256;
const SEED: u64 = 0x5eed;

/// Boots a guest (jailed or not), writes the pattern, snapshots it into
/// `<scope>/snapshots/<name>` and destroys it.
async fn snapshot_of_a_guest(scope: &Scope, name: &str, jailed: bool) -> Snapshot {
    let vm = FirecrackerVm::start(&scope.config(jailed), &scope.boot_spec(small()))
        .await
        .expect("boot");
    ready(&vm).await;
    write_pattern(&vm, SEED, PAGES).await;
    let snapshot = vm
        .snapshot(&scope.dir.join("snapshots").join(name))
        .await
        .expect("snapshot");
    assert_eq!(vm.info().await.unwrap().state, InstanceState::Paused);
    assert!(vm.destroy().await.is_clean());
    for f in [&snapshot.vmstate, &snapshot.memory] {
        let m = std::fs::metadata(f).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o444), "{}", f.display());
    }
    assert_eq!(
        std::fs::metadata(&snapshot.memory).unwrap().len(),
        small().memory_mib << 20
    );
    snapshot
}

fn restore_spec(snapshot: &Snapshot, backend: MemoryBackend) -> RestoreSpec {
    RestoreSpec {
        snapshot: snapshot.clone(),
        backend,
        resume: true,
        cpu_millis: 0,
    }
}

/// A page server whose sockets jailed VMMs (other uids) may connect to;
/// the scope keeps them in a root-only directory.
fn page_server() -> PageServer {
    PageServer::with_config(PageServerConfig {
        socket_mode: 0o666,
        ..PageServerConfig::default()
    })
    .expect("page server")
}

fn listen(server: &PageServer, socket: &Path, snapshot: &Snapshot, mode: ServeMode) {
    server
        .listen(socket, SnapshotSource::new(&snapshot.memory, mode))
        .expect("listen");
}

/// The page server's live restore of the VMM `pid`.
fn live_restore(server: &PageServer, pid: u32) -> kiln_snapshotter::RestoreInfo {
    server
        .restores()
        .into_iter()
        .find(|r| r.vmm_pid == pid as i32)
        .unwrap_or_else(|| panic!("no live restore for VMM {pid}: {:?}", server.restores()))
}

/// Waits (bounded) for the page server's report of the ended restore of
/// the VMM `pid`.
fn ended_restore(server: &PageServer, pid: u32) -> kiln_snapshotter::RestoreReport {
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
            "the page server never ended the restore of VMM {pid}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uffd_restore_gets_every_page_from_kilns_page_server() {
    let Some(scope) = scope("uffd") else { return };
    let snapshot = snapshot_of_a_guest(&scope, "uffd", true).await;
    let server = page_server();
    let socket = scope.page_socket("lazy.sock");
    listen(&server, &socket, &snapshot, ServeMode::Lazy);

    let vm = FirecrackerVm::restore(
        &scope.config(true),
        &restore_spec(&snapshot, MemoryBackend::Uffd { socket }),
    )
    .await
    .expect("restore through the page server");
    assert_eq!(vm.info().await.unwrap().state, InstanceState::Running);
    assert!(vm.restore_timings().is_some());
    assert_pattern(&vm, SEED, PAGES).await;
    // It runs on: its clock ticks.
    let t = ticks(&vm).await;
    let deadline = Instant::now() + GUEST;
    while ticks(&vm).await <= t && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ticks(&vm).await > t);

    // Every page the guest touched came from Kiln: the restore is the VMM's,
    // and it served at least the pattern's pages.
    let live = live_restore(&server, vm.pid());
    let (uid, _) = vm.jail_ids().unwrap();
    assert_eq!(live.vmm_uid, uid);
    assert_eq!(live.guest_bytes, small().memory_mib << 20);
    let served = live.metrics.faults_served + live.metrics.zero_pages_served;
    eprintln!(
        "page server: {served} faults served for the restore of VMM {}",
        vm.pid()
    );
    assert!(
        served >= PAGES,
        "only {served} faults served for {PAGES} pattern pages"
    );
    assert!(live.metrics.fault_bytes >= PAGES * 4096);

    let pid = vm.pid();
    assert!(vm.destroy().await.is_clean());
    let ended = ended_restore(&server, pid);
    assert_eq!(ended.outcome, RestoreOutcome::Ended(RestoreEnd::VmmExited));
    assert_eq!(server.metrics().snapshot().restores_active, 0);
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_backend_restore_keeps_the_pattern() {
    let Some(scope) = scope("file") else { return };
    let snapshot = snapshot_of_a_guest(&scope, "file", true).await;
    let vm = FirecrackerVm::restore(
        &scope.config(true),
        &restore_spec(&snapshot, MemoryBackend::File),
    )
    .await
    .expect("restore from the memory file");
    // Linked into the jail, not copied.
    assert_eq!(std::fs::metadata(&snapshot.memory).unwrap().nlink(), 2);
    assert_pattern(&vm, SEED, PAGES).await;
    // The restored guest can change its memory; the snapshot stays as it was.
    write_pattern(&vm, SEED + 1, PAGES).await;
    assert!(vm.destroy().await.is_clean());
    assert_eq!(std::fs::metadata(&snapshot.memory).unwrap().nlink(), 1);
    let again = FirecrackerVm::restore(
        &scope.config(false),
        &restore_spec(&snapshot, MemoryBackend::File),
    )
    .await
    .expect("a second restore, unjailed");
    assert_pattern(&again, SEED, PAGES).await;
    assert!(again.destroy().await.is_clean());
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_restores_of_one_snapshot_run_at_once() {
    let Some(scope) = scope("ten") else { return };
    let snapshot = snapshot_of_a_guest(&scope, "ten", false).await;
    let server = page_server();
    let socket = scope.page_socket("ten.sock");
    listen(&server, &socket, &snapshot, ServeMode::Lazy);

    // Half of them jailed, half not; all from the one socket.
    let restores = (0..10).map(|i| {
        let config = scope.config(i % 2 == 0);
        let spec = restore_spec(
            &snapshot,
            MemoryBackend::Uffd {
                socket: socket.clone(),
            },
        );
        async move { FirecrackerVm::restore(&config, &spec).await }
    });
    let vms: Vec<FirecrackerVm> = futures_join(restores)
        .await
        .into_iter()
        .map(|r| r.expect("restore"))
        .collect();
    let checks = vms.iter().map(|vm| assert_pattern(vm, SEED, PAGES));
    futures_join(checks).await;

    let mut pids: Vec<u32> = vms.iter().map(FirecrackerVm::pid).collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 10);
    assert_eq!(server.restores().len(), 10);
    for vm in &vms {
        assert!(live_restore(&server, vm.pid()).metrics.faults_served >= PAGES);
    }
    for vm in vms {
        assert!(vm.destroy().await.is_clean());
    }
    let active = kiln_tests::wait_empty(HOST, || {
        let n = server.metrics().snapshot().restores_active;
        if n == 0 {
            vec![]
        } else {
            vec![n]
        }
    });
    assert!(active.is_empty(), "restores still active: {active:?}");
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_killed_mid_restore_leaves_the_others_going() {
    let Some(scope) = scope("midkill") else {
        return;
    };
    let snapshot = snapshot_of_a_guest(&scope, "midkill", false).await;
    let server = page_server();
    let socket = scope.page_socket("midkill.sock");
    listen(&server, &socket, &snapshot, ServeMode::Lazy);
    let mut vms = Vec::new();
    for i in 0..3 {
        let vm = FirecrackerVm::restore(
            &scope.config(i == 0),
            &restore_spec(
                &snapshot,
                MemoryBackend::Uffd {
                    socket: socket.clone(),
                },
            ),
        )
        .await
        .expect("restore");
        vms.push(vm);
    }
    // All three start faulting their pattern in; the first VMM dies
    // while its guest is at it.
    let check = Command::Check {
        seed: SEED,
        pages: PAGES,
    }
    .line();
    for vm in &vms {
        vm.console().send_line(&check).await.unwrap();
    }
    let victim = vms[0].pid();
    // SAFETY: kill has no memory-safety preconditions; `victim` is the
    // VMM we started (its pidfd is held by the VM, so the pid is not reused).
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };

    for vm in &vms[1..] {
        let reply = vm
            .console()
            .next_line(GUEST)
            .await
            .expect("the survivors answer");
        let report = kiln_test_guest::parse_check(&reply).unwrap();
        assert_eq!((report.ok, report.bad), (PAGES, 0), "{reply}");
    }
    let ended = ended_restore(&server, victim);
    assert_eq!(ended.outcome, RestoreOutcome::Ended(RestoreEnd::VmmExited));
    assert!(!vms[0].is_running());
    // The survivors go on after their neighbour's death.
    for vm in &vms[1..] {
        assert_eq!(ask(vm, Command::Echo("on".into())).await, "echo on");
    }
    for vm in vms {
        let pid = vm.pid();
        let report = vm.destroy().await;
        assert!(report.is_clean(), "{report:?}");
        // The page server learns of the exit from the VMM's pidfd on its
        // own thread, a moment after `destroy` has reaped the VMM.
        ended_restore(&server, pid);
    }
    assert!(!exists(victim));
    assert_eq!(server.metrics().snapshot().restores_active, 0);
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_working_set_cuts_the_next_restores_faults_by_nine_tenths() {
    let Some(scope) = scope("prefetch") else {
        return;
    };
    let snapshot = snapshot_of_a_guest(&scope, "prefetch", false).await;
    let server = page_server();
    let record = scope.page_socket("record.sock");
    listen(&server, &record, &snapshot, ServeMode::Record);
    let vm = FirecrackerVm::restore(
        &scope.config(false),
        &restore_spec(&snapshot, MemoryBackend::Uffd { socket: record }),
    )
    .await
    .expect("recording restore");
    assert_pattern(&vm, SEED, PAGES).await;
    let pid = vm.pid();
    assert!(vm.destroy().await.is_clean());
    let recorded = ended_restore(&server, pid).metrics;
    let ws = kiln_snapshotter::working_set::default_path(&snapshot.memory);
    assert!(ws.is_file(), "the working set {} was written", ws.display());

    let prefetch = scope.page_socket("prefetch.sock");
    listen(&server, &prefetch, &snapshot, ServeMode::Prefetch);
    let vm = FirecrackerVm::restore(
        &scope.config(false),
        &restore_spec(&snapshot, MemoryBackend::Uffd { socket: prefetch }),
    )
    .await
    .expect("prefetching restore");
    // Let the prefetch finish before the guest reads its pattern.
    let deadline = Instant::now() + HOST;
    while live_restore(&server, vm.pid()).metrics.prefetch_ns == 0 {
        assert!(Instant::now() < deadline, "the prefetch did not finish");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_pattern(&vm, SEED, PAGES).await;
    let replayed = live_restore(&server, vm.pid()).metrics;
    eprintln!(
        "recorded restore: {} faults; replayed: {} faults, {} pages prefetched",
        recorded.faults_served, replayed.faults_served, replayed.prefetch_pages
    );
    assert!(replayed.prefetch_pages >= PAGES);
    assert!(
        replayed.faults_served * 10 <= recorded.faults_served,
        "prefetch left {} faults of the recorded {}",
        replayed.faults_served,
        recorded.faults_served
    );
    assert!(vm.destroy().await.is_clean());
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_vsock_device_moves_to_the_new_vms_socket() {
    let Some(scope) = scope("vsock") else { return };
    // Unjailed, the vsock socket's path names the VM's own directory, which
    // is gone by the time of the restore: without `vsock_override` the
    // restored device would bind the old path.
    let mut spec = scope.boot_spec(small());
    spec.vsock_cid = Some(7);
    let vm = FirecrackerVm::start(&scope.config(false), &spec)
        .await
        .expect("boot");
    ready(&vm).await;
    write_pattern(&vm, SEED, 16).await;
    let old = vm.vsock_uds().unwrap();
    let snapshot = vm
        .snapshot(&scope.dir.join("snapshots/vsock"))
        .await
        .expect("snapshot");
    assert_eq!(snapshot.machine.vsock_cid, Some(7));
    assert!(vm.destroy().await.is_clean());
    assert!(!old.exists());

    for jailed in [false, true] {
        let vm = FirecrackerVm::restore(
            &scope.config(jailed),
            &restore_spec(&snapshot, MemoryBackend::File),
        )
        .await
        .expect("restore with a vsock device");
        let uds = vm.vsock_uds().unwrap();
        assert_ne!(uds, old);
        tokio::net::UnixStream::connect(&uds)
            .await
            .expect("the restored device listens on the new VM's socket");
        let config = vm.api().vm_config().await.unwrap();
        assert_eq!(config.vsock.map(|v| v.guest_cid), Some(7));
        assert_pattern(&vm, SEED, 16).await;
        assert!(vm.destroy().await.is_clean());
    }
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

/// Runs futures concurrently on the current task and returns their outputs
/// in order (the workspace has no futures crate for `join_all`).
async fn futures_join<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

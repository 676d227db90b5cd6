//! The page server seen from the VMM's side, over real userfaultfd (root).

mod common;

use std::io::Read;
use std::os::fd::AsFd;
use std::time::Duration;

use common::*;
use kiln_snapshotter::guest::{self, GuestMemory, HandshakeFormat, RegionSpec};
use kiln_snapshotter::{
    PageServer, PageServerConfig, RestoreEnd, RestoreOutcome, ServeMode, SnapshotSource,
};

const LIMIT: Duration = Duration::from_secs(20);

fn server() -> PageServer {
    PageServer::with_config(PageServerConfig {
        handshake_timeout: Duration::from_millis(500),
        history: 64,
        ..PageServerConfig::default()
    })
    .unwrap()
}

/// A fresh [`server`] serving a memory file of `len` bytes (pattern `seed`)
/// lazily on `pages.sock`, all in a temporary directory named `name`.
struct Served {
    dir: TempDir,
    mem: std::path::PathBuf,
    file: Vec<u8>,
    server: PageServer,
    sock: std::path::PathBuf,
}

fn serve_lazily(name: &str, len: u64, seed: u64) -> Served {
    let dir = TempDir::new(name);
    let mem = dir.join("memory");
    let file = memory_file(&mem, len, seed);
    let server = server();
    let sock = dir.join("pages.sock");
    server
        .listen(&sock, SnapshotSource::new(&mem, ServeMode::Lazy))
        .unwrap();
    Served {
        dir,
        mem,
        file,
        server,
        sock,
    }
}

/// Three regions, listed out of address order, at non-zero file offsets.
fn three_regions() -> Vec<RegionSpec> {
    vec![
        RegionSpec {
            size: MIB,
            offset: 4 * MIB,
        },
        RegionSpec {
            size: 2 * MIB,
            offset: MIB,
        },
        RegionSpec {
            size: MIB / 2,
            offset: 7 * MIB,
        },
    ]
}

/// Entry point of the child-process VMM (see `common::child_vmm_main`).
#[test]
fn child_vmm() {
    child_vmm_main();
}

fn restore_and_check_every_page(format: HandshakeFormat) {
    let Served {
        dir: _dir,
        file,
        server,
        sock,
        ..
    } = serve_lazily("exact", 8 * MIB, 1);
    let regions = three_regions();
    let pages = shuffled_pages(&regions, 42);
    let total = pages.len() as u64;
    let guest = GuestMemory::restore(&sock, &regions, format).unwrap();
    let guest = within(LIMIT, move || {
        check_pages(&guest, &file, &pages);
        guest
    });
    assert!(wait_until(Duration::from_secs(2), || server.restores()[0]
        .metrics
        .faults_served
        == total));
    let live = server.restores();
    assert_eq!(live.len(), 1);
    assert_eq!(
        live[0].vmm_pid,
        std::process::id() as i32,
        "SO_PEERCRED names the VMM"
    );
    assert_eq!(live[0].metrics.faults_served, total, "one fault per page");
    assert_eq!(live[0].metrics.fault_bytes, total * PAGE);
    assert_eq!(server.metrics().snapshot().bytes_copied, total * PAGE);
    drop(guest);
}

#[test]
fn serves_every_byte_of_several_offset_regions_in_random_order() {
    restore_and_check_every_page(HandshakeFormat::Current);
}

#[test]
fn accepts_the_old_three_field_json() {
    restore_and_check_every_page(HandshakeFormat::ThreeField);
}

#[test]
fn removed_ranges_read_as_zeros_afterwards() {
    let Served {
        dir: _dir,
        file,
        server,
        sock,
        ..
    } = serve_lazily("remove", 4 * MIB, 2);
    let regions = vec![RegionSpec {
        size: 2 * MIB,
        offset: MIB,
    }];
    let guest = GuestMemory::restore(&sock, &regions, HandshakeFormat::Current).unwrap();
    let (zeroed, untouched_after) = within(LIMIT, move || {
        let all: Vec<(usize, u64)> = (0..(MIB / PAGE)).map(|p| (0, p * PAGE)).collect();
        // First megabyte: served from the file, then ballooned away.
        check_pages(&guest, &file, &all);
        guest.remove(0, 64 * PAGE, 16 * PAGE).unwrap();
        // Second megabyte: removed before it was ever touched.
        guest.remove(0, MIB, MIB / 2).unwrap();
        let mut buf = vec![0u8; PAGE as usize];
        let mut zeroed = 0;
        for p in (64..80).chain(256..384) {
            guest.read(0, p * PAGE, &mut buf);
            assert!(
                buf.iter().all(|b| *b == 0),
                "page {p} must read as zeros after a remove event"
            );
            zeroed += 1;
        }
        // Pages next to removed ranges keep their snapshot contents.
        let neighbours: Vec<(usize, u64)> = [63u64, 80, 384, 400]
            .iter()
            .map(|p| (0, p * PAGE))
            .collect();
        check_pages(&guest, &file, &neighbours);
        (zeroed, guest)
    });
    assert!(wait_until(Duration::from_secs(2), || server.restores()[0]
        .metrics
        .zero_pages_served
        == zeroed));
    let m = &server.restores()[0].metrics;
    assert_eq!(m.remove_events, 2);
    assert_eq!(
        m.zero_pages_served, zeroed,
        "every re-touched removed page was zero-filled"
    );
    drop(untouched_after);
}

#[test]
fn ten_concurrent_restores_survive_one_being_killed() {
    let Served {
        dir: _dir,
        mem,
        server,
        sock,
        ..
    } = serve_lazily("ten", 8 * MIB, 3);
    let regions = three_regions();
    let mut children = Children(
        (0..10u64)
            .map(|i| {
                spawn_child_vmm(
                    "child_vmm",
                    &ChildPlan {
                        socket: &sock,
                        memory: &mem,
                        regions: &regions,
                        seed: 100 + i,
                        per_mille: 1000,
                        stall_halfway: i == 3,
                    },
                )
            })
            .collect(),
    );
    let children = &mut children.0;
    let victim_pid = children[3].id() as i32;
    assert!(
        wait_for_line(&mut children[3], "HALFWAY", LIMIT),
        "the victim never got halfway; live: {:#?} ended: {:#?}",
        server.restores(),
        server.recent_restores()
    );
    assert!(
        server.restores().iter().any(|r| r.vmm_pid == victim_pid),
        "the victim's restore is live before the kill"
    );
    children[3].kill().unwrap();
    let _ = children[3].wait();
    for (i, child) in children.iter_mut().enumerate().filter(|(i, _)| *i != 3) {
        let status = wait_child(child, LIMIT).unwrap_or_else(|| panic!("child {i} hung"));
        assert!(status.success(), "child {i} failed: {status}");
    }
    assert!(
        wait_until(Duration::from_secs(5), || server.restores().is_empty()),
        "the server still holds restores: {:?}",
        server.restores()
    );
    let reports = server.recent_restores();
    assert_eq!(reports.len(), 10);
    let victim = reports
        .iter()
        .find(|r| r.vmm_pid == Some(victim_pid))
        .unwrap();
    assert_eq!(victim.outcome, RestoreOutcome::Ended(RestoreEnd::VmmExited));
    let total_pages = regions.iter().map(|r| r.size / PAGE).sum::<u64>();
    for r in reports.iter().filter(|r| r.vmm_pid != Some(victim_pid)) {
        assert_eq!(r.outcome, RestoreOutcome::Ended(RestoreEnd::VmmExited));
        assert_eq!(r.metrics.faults_served, total_pages);
    }
    let m = server.metrics().snapshot();
    assert_eq!(m.restores_active, 0);
    assert_eq!(m.restores_finished, 10);
}

#[test]
fn recording_then_prefetching_cuts_faults_by_ninety_percent() {
    let dir = TempDir::new("reap");
    let mem = dir.join("memory");
    memory_file(&mem, 16 * MIB, 4);
    let server = server();
    let (rec_sock, pre_sock) = (dir.join("record.sock"), dir.join("prefetch.sock"));
    server
        .listen(&rec_sock, SnapshotSource::new(&mem, ServeMode::Record))
        .unwrap();
    server
        .listen(&pre_sock, SnapshotSource::new(&mem, ServeMode::Prefetch))
        .unwrap();
    let regions = vec![
        RegionSpec {
            size: 4 * MIB,
            offset: 2 * MIB,
        },
        RegionSpec {
            size: 8 * MIB,
            offset: 8 * MIB,
        },
    ];
    let run = |sock: &std::path::Path| {
        let mut child = spawn_child_vmm(
            "child_vmm",
            &ChildPlan {
                socket: sock,
                memory: &mem,
                regions: &regions,
                seed: 7,
                per_mille: 500,
                stall_halfway: false,
            },
        );
        let status = wait_child(&mut child, LIMIT).expect("child VMM hung");
        assert!(status.success(), "child VMM failed: {status}");
        let pid = child.id() as i32;
        assert!(wait_until(Duration::from_secs(5), || server
            .recent_restores()
            .iter()
            .any(|r| r.vmm_pid == Some(pid))));
        server
            .recent_restores()
            .into_iter()
            .find(|r| r.vmm_pid == Some(pid))
            .unwrap()
    };
    let recorded = run(&rec_sock);
    assert_eq!(recorded.mode, Some(ServeMode::Record));
    assert_eq!(server.metrics().snapshot().working_sets_written, 1);
    let touched = plan_pages(&regions, 7, 500).len() as u64;
    assert_eq!(recorded.metrics.faults_served, touched);

    let prefetched = run(&pre_sock);
    assert_eq!(prefetched.mode, Some(ServeMode::Prefetch));
    // Every touched page was installed exactly once: by the prefetch, or
    // lazily when the VM got to it before the prefetch did.
    assert_eq!(
        prefetched.metrics.prefetch_pages + prefetched.metrics.faults_served,
        touched,
        "prefetch installed {} pages and faults {}",
        prefetched.metrics.prefetch_pages,
        prefetched.metrics.faults_served
    );
    eprintln!(
        "record: {} faults; prefetch: {} faults, {} pages prefetched in {:?}",
        recorded.metrics.faults_served,
        prefetched.metrics.faults_served,
        prefetched.metrics.prefetch_pages,
        Duration::from_nanos(prefetched.metrics.prefetch_ns)
    );
    // The serving threads' CPU clocks were read: some work was done, and
    // no more than their threads could do in the restore's wall time (one
    // thread recording; the prefetch may use the server's helpers too).
    let threads = PageServerConfig::default().prefetch_threads.max(1) as u128;
    for (r, threads) in [(&recorded, 1), (&prefetched, threads)] {
        assert!(r.metrics.cpu_ns > 0, "no CPU time counted: {r:?}");
        assert!(
            u128::from(r.metrics.cpu_ns) <= r.duration.as_nanos() * threads,
            "{} ns of CPU in {:?} on {threads} threads",
            r.metrics.cpu_ns,
            r.duration
        );
    }
    assert!(
        prefetched.metrics.faults_served * 10 <= recorded.metrics.faults_served,
        "prefetch took {} faults, recording took {}: expected at least 90% fewer",
        prefetched.metrics.faults_served,
        recorded.metrics.faults_served
    );
}

#[test]
fn bad_handshakes_get_a_clear_error_and_others_keep_being_served() {
    let Served {
        dir: _dir,
        file,
        server,
        sock,
        ..
    } = serve_lazily("bad", MIB, 5);

    let uffd = guest::userfaultfd().unwrap();
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let ok_region = r#"[{"base_host_virt_addr":1073741824,"size":65536,"offset":0}]"#;
    let cases: Vec<(&str, Vec<u8>, Option<std::os::fd::BorrowedFd<'_>>, &str)> = vec![
        ("garbage", b"\x00\xffnot json at all".to_vec(), Some(uffd.as_fd()), "not valid JSON"),
        ("truncated", br#"[{"base_host_virt_addr":1073741824,"si"#.to_vec(), Some(uffd.as_fd()), "truncated"),
        ("no fd", ok_region.as_bytes().to_vec(), None, "no file descriptor"),
        ("not a uffd", ok_region.as_bytes().to_vec(), Some(devnull.as_fd()), "not a userfaultfd"),
        (
            "overlap",
            br#"[{"base_host_virt_addr":1073741824,"size":65536,"offset":0},{"base_host_virt_addr":1073745920,"size":4096,"offset":131072}]"#.to_vec(),
            Some(uffd.as_fd()),
            "overlap",
        ),
        (
            "past end",
            br#"[{"base_host_virt_addr":1073741824,"size":65536,"offset":1044480}]"#.to_vec(),
            Some(uffd.as_fd()),
            "memory file has only",
        ),
    ];
    let regions = vec![RegionSpec {
        size: MIB / 4,
        offset: MIB / 2,
    }];
    for (i, (name, payload, fd, expected)) in cases.iter().enumerate() {
        let mut stream = guest::send_handshake(&sock, payload, *fd).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(
            reply.contains(expected),
            "{name}: reply {reply:?} should mention {expected:?}"
        );
        let reports = server.recent_restores();
        let RestoreOutcome::Refused(why) = &reports.last().unwrap().outcome else {
            panic!("{name}: expected a refusal, got {:?}", reports.last())
        };
        assert!(why.contains(expected), "{name}: {why}");
        assert_eq!(server.metrics().snapshot().handshakes_refused, i as u64 + 1);
        // A well-behaved restore right after is served in full.
        let guest = GuestMemory::restore(&sock, &regions, HandshakeFormat::Current).unwrap();
        let file = file.clone();
        let pages = shuffled_pages(&regions, i as u64);
        within(LIMIT, move || check_pages(&guest, &file, &pages));
    }
    // A sender that stops mid-message and keeps the socket open times out.
    let _stream = guest::send_handshake(&sock, b"[{", Some(uffd.as_fd())).unwrap();
    assert!(wait_until(Duration::from_secs(5), || server
        .metrics()
        .snapshot()
        .handshakes_refused
        == cases.len() as u64 + 1));
}

#[test]
fn prefetch_never_resurrects_removed_pages() {
    let dir = TempDir::new("prefetch-remove");
    let mem = dir.join("memory");
    let file = memory_file(&mem, 8 * MIB, 6);
    let regions = vec![RegionSpec {
        size: 4 * MIB,
        offset: 2 * MIB,
    }];
    // A working set covering the whole region, as a recording would write.
    let identity = kiln_snapshotter::memory::MemoryFile::open(&mem)
        .unwrap()
        .identity();
    let offsets = (0..4 * MIB / PAGE).map(|p| 2 * MIB + p * PAGE).collect();
    let ws = kiln_snapshotter::working_set::WorkingSet {
        page_size: PAGE as u32,
        identity,
        offsets,
    };
    ws.write_atomic(&kiln_snapshotter::working_set::default_path(&mem))
        .unwrap();
    let server = server();
    let sock = dir.join("pages.sock");
    server
        .listen(&sock, SnapshotSource::new(&mem, ServeMode::Prefetch))
        .unwrap();
    let guest = GuestMemory::restore(&sock, &regions, HandshakeFormat::Current).unwrap();
    let guest = within(LIMIT, move || {
        // Balloon away the second megabyte while (or before) it is prefetched.
        guest.remove(0, MIB, MIB).unwrap();
        let mut buf = vec![0u8; PAGE as usize];
        for p in MIB / PAGE..2 * MIB / PAGE {
            guest.read(0, p * PAGE, &mut buf);
            assert!(
                buf.iter().all(|b| *b == 0),
                "removed page {p} came back with snapshot bytes"
            );
        }
        let rest: Vec<(usize, u64)> = (0..MIB / PAGE)
            .chain(2 * MIB / PAGE..4 * MIB / PAGE)
            .map(|p| (0, p * PAGE))
            .collect();
        check_pages(&guest, &file, &rest);
        guest
    });
    let live = server.restores();
    assert_eq!(live[0].mode, ServeMode::Prefetch);
    assert_eq!(live[0].metrics.remove_events, 1);
    drop(guest);
}

#[test]
fn faults_and_remove_events_interleave_without_losing_a_page() {
    let Served {
        dir: _dir,
        file,
        server,
        sock,
        ..
    } = serve_lazily("interleave", 8 * MIB, 8);
    let regions = vec![
        RegionSpec {
            size: 4 * MIB,
            offset: 0,
        },
        RegionSpec {
            size: MIB,
            offset: 4 * MIB,
        },
    ];
    let guest = std::sync::Arc::new(
        GuestMemory::restore(&sock, &regions, HandshakeFormat::Current).unwrap(),
    );
    let reader = {
        let guest = guest.clone();
        let file = file.clone();
        let pages: Vec<(usize, u64)> = shuffled_pages(&regions[..1], 9);
        std::thread::spawn(move || check_pages(&guest, &file, &pages))
    };
    let balloon = guest.clone();
    let rounds = within(LIMIT, move || {
        let mut buf = vec![0u8; PAGE as usize];
        for round in 0..200u64 {
            let off = (round % 16) * 16 * PAGE;
            balloon.remove(1, off, 16 * PAGE).unwrap();
            balloon.read(1, off + (round % 16) * PAGE, &mut buf);
            assert!(
                buf.iter().all(|b| *b == 0),
                "round {round}: removed page not zero"
            );
        }
        200u64
    });
    within(LIMIT, move || reader.join().expect("reader thread failed"));
    assert!(wait_until(Duration::from_secs(2), || {
        let m = &server.restores()[0].metrics;
        m.faults_served == 4 * MIB / PAGE && m.zero_pages_served == rounds
    }));
    let m = &server.restores()[0].metrics;
    assert_eq!(m.remove_events, rounds);
    assert_eq!(m.zero_pages_served, rounds, "one zero page per round");
    assert_eq!(
        m.faults_served,
        4 * MIB / PAGE,
        "every page of region 0 was served once"
    );
}

#[test]
fn serve_pages_command_records_a_working_set_on_shutdown() {
    use kiln_snapshotter::cli::serve_pages_until;
    use kiln_snapshotter::ServePagesArgs;

    let dir = TempDir::new("cli");
    let mem = dir.join("memory");
    let file = memory_file(&mem, 2 * MIB, 10);
    let sock = dir.join("pages.sock");
    let args = ServePagesArgs {
        socket: sock.clone(),
        memory: Some(mem.clone()),
        snapshot: None,
        store: None,
        mode: ServeMode::Record,
        working_set: None,
        socket_mode: 0o600,
        handshake_timeout: 1,
        prefetch_threads: None,
    };
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        serve_pages_until(args, || {
            let _ = stop_rx.recv_timeout(LIMIT);
        })
    });
    assert!(
        wait_until(Duration::from_secs(5), || sock.exists()),
        "the command never listened"
    );
    let regions = vec![RegionSpec {
        size: MIB,
        offset: MIB,
    }];
    // The socket file appears at bind(), a moment before listen(): retry a
    // refused connection for a little while.
    let connect_by = std::time::Instant::now() + Duration::from_secs(5);
    let guest = loop {
        match GuestMemory::restore(&sock, &regions, HandshakeFormat::Current) {
            Err(guest::GuestError::Send(e))
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && std::time::Instant::now() < connect_by =>
            {
                std::thread::sleep(Duration::from_millis(5))
            }
            other => break other.unwrap(),
        }
    };
    let pages = plan_pages(&regions, 11, 250);
    let touched = pages.len();
    let guest = within(LIMIT, move || {
        check_pages(&guest, &file, &pages);
        guest
    });
    stop_tx.send(()).unwrap();
    within(LIMIT, move || server.join().unwrap()).unwrap();
    drop(guest);
    let identity = kiln_snapshotter::memory::MemoryFile::open(&mem)
        .unwrap()
        .identity();
    let ws = kiln_snapshotter::working_set::WorkingSet::load(
        &kiln_snapshotter::working_set::default_path(&mem),
        identity,
    )
    .unwrap();
    assert_eq!(
        ws.offsets.len(),
        touched,
        "one entry per faulted page, in fault order"
    );
    let expected: Vec<u64> = plan_pages(&regions, 11, 250)
        .iter()
        .map(|(_, off)| MIB + off)
        .collect();
    assert_eq!(ws.offsets, expected);
}

/// Guest pages as `(region, offset)`.
type Pages = Vec<(usize, u64)>;

/// Two regions at non-zero file offsets and a working set of all their pages
/// but every 61st (so it has holes, i.e. many runs), in random order. Returns
/// the regions, the working-set pages and the holes.
fn parallel_prefetch_layout(
    mem: &std::path::Path,
    sizes: [u64; 2],
) -> (Vec<RegionSpec>, Pages, Pages) {
    let regions = vec![
        RegionSpec {
            size: sizes[0],
            offset: 2 * MIB,
        },
        RegionSpec {
            size: sizes[1],
            offset: 4 * MIB + sizes[0],
        },
    ];
    let (in_ws, holes): (Vec<_>, Vec<_>) = shuffled_pages(&regions, 61)
        .into_iter()
        .partition(|&(r, off)| !((regions[r].offset + off) / PAGE).is_multiple_of(61));
    let identity = kiln_snapshotter::memory::MemoryFile::open(mem)
        .unwrap()
        .identity();
    kiln_snapshotter::working_set::WorkingSet {
        page_size: PAGE as u32,
        identity,
        offsets: in_ws
            .iter()
            .map(|&(r, off)| regions[r].offset + off)
            .collect(),
    }
    .write_atomic(&kiln_snapshotter::working_set::default_path(mem))
    .unwrap();
    (regions, in_ws, holes)
}

/// A server whose prefetch runs four threads, more than this machine may
/// have cores, so several threads always share the slices.
fn parallel_prefetch_server(mem: &std::path::Path, sock: &std::path::Path) -> PageServer {
    let server = PageServer::with_config(PageServerConfig {
        handshake_timeout: Duration::from_millis(500),
        prefetch_threads: 4,
        ..PageServerConfig::default()
    })
    .unwrap();
    server
        .listen(sock, SnapshotSource::new(mem, ServeMode::Prefetch))
        .unwrap();
    server
}

#[test]
fn parallel_prefetch_installs_every_page_exactly_once() {
    let dir = TempDir::new("parallel-prefetch");
    let mem = dir.join("memory");
    let file = memory_file(&mem, 24 * MIB, 12);
    let (regions, in_ws, holes) = parallel_prefetch_layout(&mem, [12 * MIB, 6 * MIB]);
    let sock = dir.join("pages.sock");
    let server = parallel_prefetch_server(&mem, &sock);
    let guest = GuestMemory::restore(&sock, &regions, HandshakeFormat::Current).unwrap();
    assert!(wait_until(LIMIT, || server
        .restores()
        .first()
        .is_some_and(|r| r.metrics.prefetch_ns > 0)));
    let m = server.restores()[0].metrics.clone();
    assert_eq!(
        m.prefetch_pages,
        in_ws.len() as u64,
        "every working-set page"
    );
    assert_eq!(m.prefetch_bytes, in_ws.len() as u64 * PAGE);
    assert_eq!(m.faults_served, 0, "the guest has not touched anything yet");
    let guest = within(LIMIT, move || {
        check_pages(&guest, &file, &shuffled_pages(&regions, 13));
        guest
    });
    assert!(wait_until(Duration::from_secs(2), || server.restores()[0]
        .metrics
        .faults_served
        == holes.len() as u64));
    let m = server.restores()[0].metrics.clone();
    assert_eq!(m.faults_served, holes.len() as u64, "only the holes fault");
    assert_eq!(m.prefetch_pages, in_ws.len() as u64);
    assert_eq!(
        (
            m.faults_already_present,
            m.copy_retries,
            m.zero_pages_served
        ),
        (0, 0, 0)
    );
    let global = server.metrics().snapshot();
    assert_eq!(global.prefetch_bytes, in_ws.len() as u64 * PAGE);
    assert_eq!(
        global.bytes_copied,
        (in_ws.len() + holes.len()) as u64 * PAGE,
        "each page copied exactly once"
    );
    drop(guest);
}

#[test]
fn parallel_prefetch_races_faults_and_removes_without_losing_or_resurrecting_a_page() {
    let dir = TempDir::new("parallel-prefetch-race");
    let mem = dir.join("memory");
    let file = memory_file(&mem, 40 * MIB, 14);
    let (regions, in_ws, holes) = parallel_prefetch_layout(&mem, [24 * MIB, 8 * MIB]);
    // Ballooned away while the prefetch runs: one range in each region.
    let removed = [(0usize, 5 * MIB, 64 * PAGE), (1, 2 * MIB, MIB)];
    let is_removed = move |(r, off): (usize, u64)| {
        removed
            .iter()
            .any(|&(rr, start, len)| r == rr && (start..start + len).contains(&off))
    };
    let kept: Vec<(usize, u64)> = shuffled_pages(&regions, 15)
        .into_iter()
        .filter(|&p| !is_removed(p))
        .collect();
    let gone: Vec<(usize, u64)> = shuffled_pages(&regions, 16)
        .into_iter()
        .filter(|&p| is_removed(p))
        .collect();
    // The guest faults on kept pages from the top of the file down while
    // the prefetch installs them from the bottom up, so the two meet
    // (EEXIST on either side) ...
    let mut top_down = kept.clone();
    top_down.sort_by_key(|&(r, off)| std::cmp::Reverse(regions[r].offset + off));
    let sock = dir.join("pages.sock");
    let server = parallel_prefetch_server(&mem, &sock);
    let guest = std::sync::Arc::new(
        GuestMemory::restore(&sock, &regions, HandshakeFormat::Current).unwrap(),
    );
    let toucher = {
        let guest = guest.clone();
        std::thread::spawn(move || {
            for (r, off) in top_down {
                guest.touch(r, off);
            }
        })
    };
    // ... and the balloon removes ranges the prefetch is about to install,
    // or has installed: either way they must read as zeros afterwards.
    let balloon = guest.clone();
    let gone_pages = gone.clone();
    within(LIMIT, move || {
        for (r, start, len) in removed {
            balloon.remove(r, start, len).unwrap();
        }
        let mut buf = vec![0u8; PAGE as usize];
        for (r, off) in gone_pages {
            balloon.read(r, off, &mut buf);
            assert!(
                buf.iter().all(|b| *b == 0),
                "removed page {off:#x} of region {r} came back with snapshot bytes"
            );
        }
    });
    within(LIMIT, move || toucher.join().expect("toucher failed"));
    // A woken guest thread runs on before the server counts its fault, so
    // wait for the counters to catch up with what the guest has seen.
    assert!(wait_until(LIMIT, || {
        let m = &server.restores()[0].metrics;
        m.prefetch_ns > 0
            && m.zero_pages_served >= gone.len() as u64
            && m.prefetch_pages + m.faults_served >= kept.len() as u64
    }));
    let m = server.restores()[0].metrics.clone();
    assert_eq!(m.remove_events, removed.len() as u64);
    assert_eq!(
        m.zero_pages_served,
        gone.len() as u64,
        "each removed page zero-filled once, on its first read after the remove"
    );
    // Every kept page was installed from the file exactly once, by the
    // prefetch or by a fault; besides them the prefetch may have installed
    // removed pages before their remove arrived (the remove then dropped them).
    let from_file = m.prefetch_pages + m.faults_served;
    eprintln!(
        "prefetched {} pages, faults {} ({} already present), {} zero pages, {} retries",
        m.prefetch_pages,
        m.faults_served,
        m.faults_already_present,
        m.zero_pages_served,
        m.copy_retries
    );
    let removed_in_ws = in_ws.iter().filter(|&&p| is_removed(p)).count() as u64;
    assert!(
        (kept.len() as u64..=kept.len() as u64 + removed_in_ws).contains(&from_file),
        "{} pages installed from the file for {} kept pages ({} removed in the working set)",
        from_file,
        kept.len(),
        removed_in_ws
    );
    let kept_holes = holes.iter().filter(|&&p| !is_removed(p)).count() as u64;
    assert!(
        m.faults_served >= kept_holes,
        "holes are only ever faulted in"
    );
    assert_eq!(m.prefetch_bytes, m.prefetch_pages * PAGE);
    assert_eq!(
        server.metrics().snapshot().bytes_copied,
        from_file * PAGE,
        "nothing copied twice"
    );
    // A second pass finds every page in place with the file's bytes (or
    // zeros), and faults nothing in again.
    let guest = within(LIMIT, move || {
        check_pages(&guest, &file, &kept);
        let mut buf = vec![0u8; PAGE as usize];
        for (r, off) in gone {
            guest.read(r, off, &mut buf);
            assert!(buf.iter().all(|b| *b == 0));
        }
        guest
    });
    assert_eq!(server.restores()[0].metrics, m, "second pass faulted again");
    drop(guest);
}

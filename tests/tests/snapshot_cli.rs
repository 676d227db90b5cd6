//! `kiln snapshot serve-pages` as an operator runs it beside a hand-started
//! Firecracker: the real binary serves a memory file over userfaultfd to a
//! VMM (played here exactly, by the snapshotter's harness), records the
//! working set, and stops cleanly on SIGTERM with its figures. Needs root.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_snapshotter::guest::{GuestMemory, HandshakeFormat, RegionSpec};

#[test]
fn serve_pages_serves_exact_bytes_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("kiln-test-{}-serve-pages", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mem = dir.join("memory");
    let bytes: Vec<u8> = (0..(4u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&mem, &bytes).unwrap();
    let sock = dir.join("pages.sock");
    let kiln = Command::new(kiln_tests::bin("kiln"))
        .args(["snapshot", "serve-pages", "--mode", "record", "--socket"])
        .arg(&sock)
        .arg("--memory")
        .arg(&mem)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "serve-pages never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let regions = [
        RegionSpec {
            size: 1 << 20,
            offset: 2 << 20,
        },
        RegionSpec {
            size: 1 << 20,
            offset: 0,
        },
    ];
    // The socket file appears a moment before the server listens on it.
    let guest = loop {
        match GuestMemory::restore(&sock, &regions, HandshakeFormat::Current) {
            Ok(g) => break g,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying the restore: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("restore failed: {e}"),
        }
    };
    let mut page = vec![0u8; 4096];
    for (r, spec) in regions.iter().enumerate() {
        for p in (0..spec.size).step_by(4096 * 3) {
            guest.read(r, p, &mut page);
            let at = (spec.offset + p) as usize;
            assert_eq!(page, bytes[at..at + 4096], "region {r} page at {p}");
        }
    }
    // SAFETY: kill(2) on the child we spawned.
    unsafe { libc::kill(kiln.id() as i32, libc::SIGTERM) };
    let out = kiln.wait_with_output().unwrap();
    drop(guest);
    assert!(out.status.success(), "{:?}", out.status);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("faults"), "no figures printed: {report}");
    assert!(!sock.exists(), "the socket was left behind");
    assert!(dir.join("memory.ws").exists(), "no working set recorded");
    std::fs::remove_dir_all(&dir).unwrap();
}

//! `kiln serve --backend qemu` behind HTTP: the warm pool boots real guests
//! ahead of demand (QEMU, TCG here), jobs of every runtime come back with
//! their output and exit codes from a warm guest, a sandbox's TTL ends a
//! runaway guest from the host, and shutdown leaves no VM behind.
//!
//! Needs root, QEMU, vhost-device-vsock and the guest artefacts; without the
//! artefacts it says SKIPPED, unless `KILN_REQUIRE_GUEST=1`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_tests::processes_matching;
use kiln_tests::server::Server;
use serde_json::json;

/// The VM directories of the server's scope.
fn vms(s: &Server) -> Vec<PathBuf> {
    std::fs::read_dir(s.scope.state_dir.join("qemu"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

#[test]
fn jobs_run_on_warm_guests_ttl_ends_a_runaway_guest_and_shutdown_is_clean() {
    if !kiln_tests::has_guest() {
        return;
    }
    let mut s = Server::start(
        "qemu-serve",
        &[
            "--backend",
            "qemu",
            "--pool-runtimes",
            "python,node,bash",
            "--min-idle",
            "1",
        ],
    );
    // Ready once the pool has booted its guests.
    assert!(
        kiln_tests::wait_until(Duration::from_secs(90), || s
            .request("GET", "/readyz", None)
            .status
            == 200),
        "the pool never became ready"
    );
    assert_eq!(vms(&s).len(), 3, "one idle guest per runtime");

    for (rt, code, out, exit) in [
        ("python", "print(6 * 7)", "42\n", 0),
        ("node", "console.log(6 * 7); process.exit(3)", "42\n", 3),
        ("bash", "echo $((6 * 7)); exit 4", "42\n", 4),
    ] {
        let (status, r) = s.json(
            "POST",
            "/v1/jobs?wait=true",
            &json!({"runtime": rt, "code": code, "limits": {"timeout_ms": 60000}}),
        );
        assert_eq!(status, 200, "{rt}: {r}");
        assert_eq!(r["stdout"], out, "{rt}: {r}");
        assert_eq!(r["exit_code"], exit, "{rt}: {r}");
        assert_eq!(r["timings"]["acquire"], "warm", "{rt}: {r}");
    }

    // A sandbox whose exec never ends: the TTL ends the guest from the host.
    let (status, sb) = s.json(
        "POST",
        "/v1/sandboxes",
        &json!({"template": "python", "ttl_s": 5}),
    );
    assert_eq!(status, 201, "{sb}");
    let id = sb["id"].as_str().unwrap().to_owned();
    let t0 = Instant::now();
    let (_, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"code": "while True: pass", "limits": {"timeout_ms": 60000}}),
    );
    assert_eq!(r["outcome"], "killed", "{r}");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    let dir = s.scope.state_dir.join("qemu").join(&id);
    assert!(
        kiln_tests::wait_until(Duration::from_secs(10), || !dir.exists()
            && processes_matching(&dir.to_string_lossy()).is_empty()),
        "the expired guest is still there"
    );

    s.term(Duration::from_secs(60));
    assert!(vms(&s).is_empty(), "left after shutdown: {:?}", vms(&s));
    let procs = processes_matching(&s.scope.state_dir.to_string_lossy());
    assert!(procs.is_empty(), "processes left: {procs:?}");
    let _ = std::fs::remove_dir(s.scope.state_dir.join("qemu"));
}

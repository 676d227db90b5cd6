//! What one pooled job can leave for, or learn about, the next job of the
//! same sandbox, through a real `kiln serve` with a small pool of jails.
//! Jobs tell which jail they ran in by the device of its root (every jail's
//! root is a tmpfs of its own, which its rooms share), so that a test can
//! compare jobs that ran in the same sandbox, one reset apart.

use std::time::{Duration, Instant};

use kiln_tests::server::Server;
use serde_json::{json, Value};

fn wait_ready(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.request("GET", "/readyz", None).status != 200 {
        assert!(Instant::now() < deadline, "/readyz never turned 200");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One idle Python sandbox kept ready, and one job at a time: the pool
/// then holds two or three jails, which serve jobs in turn.
const SMALL_POOL: [&str; 6] = [
    "--min-idle",
    "1",
    "--max-running",
    "1",
    "--pool-runtimes",
    "python",
];

fn python(s: &Server, code: &str) -> Value {
    let (st, r) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "python", "code": code}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(r["timings"]["acquire"], "warm", "from the pool: {r}");
    r
}

/// Prefixes a job's output with the device of its jail's root.
fn in_jail(code: &str) -> String {
    format!("import os\nprint(os.stat('/').st_dev)\n{code}")
}

/// The jail a job's output names, and the rest of it.
fn jail_and_output(r: &Value) -> (String, String) {
    let out = r["stdout"].as_str().unwrap();
    let (jail, rest) = out.split_once('\n').expect("the jail first");
    (jail.to_owned(), rest.to_owned())
}

#[test]
fn a_flow_label_left_by_a_pooled_job_is_gone_for_the_next_job_of_its_sandbox() {
    let s = Server::start("flowlabel", &SMALL_POOL);
    wait_ready(&s);
    // An IPv6 flow label lingering 150 s after its socket closed, with 16
    // bytes of the job's own as its destination, and not one packet sent.
    let left = python(
        &s,
        &in_jail(
            r#"
import socket, struct
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
req = struct.pack("=16sIBBHHHI", b"kiln-left-behind", 0, 0, 1, 1, 0, 150, 0)
s.setsockopt(socket.IPPROTO_IPV6, 32, req)  # IPV6_FLOWLABEL_MGR
s.close()
print(open("/proc/net/ip6_flowlabel").read())
"#,
        ),
    );
    let bytes = "6b696c6e2d6c6566742d626568696e64";
    let (jail, out) = jail_and_output(&left);
    assert!(out.contains(bytes), "the check can see the label: {out}");
    // The pool hands its jails out in turn: within a few jobs, one runs in
    // the jail of the first, after its reset.
    let look = in_jail("print(open('/proc/net/ip6_flowlabel').read())");
    for _ in 0..20 {
        let (next_jail, out) = jail_and_output(&python(&s, &look));
        assert!(!out.contains(bytes), "a later job saw the label: {out}");
        if next_jail == jail {
            return;
        }
    }
    panic!("no later job ran in the jail of the first");
}

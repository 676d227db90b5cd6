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

/// Prints where libc is mapped, where the stack starts, the stack
/// protector's canary, the str hash of a constant, and whether the
/// interpreter was forked by the zygote (its command line is the warm
/// entry's `-c`) rather than started for the job.
const LAYOUT: &str = r#"
import ctypes
libc = ctypes.CDLL(None)
libc.syscall.restype = ctypes.c_long
fs = ctypes.c_ulong()
assert libc.syscall(158, 0x1003, ctypes.byref(fs)) == 0  # arch_prctl(ARCH_GET_FS)
canary = ctypes.c_ulong.from_address(fs.value + 0x28).value
libc_at = next(l.split("-")[0] for l in open("/proc/self/maps") if "/libc.so" in l)
stack_at = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[25])
forked = "-c" in open("/proc/self/cmdline").read().split("\0")
print(forked, "libc=%s stack=%x canary=%016x hash=%x" % (libc_at, stack_at, canary, hash("kiln") & (2**64 - 1)))
"#;

#[test]
fn a_runtime_table_with_zygote_max_uses_1_gives_every_pooled_job_a_fresh_layout() {
    let dir = std::env::temp_dir().join(format!("kiln-test-{}-layout", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let table = dir.join("runtimes.toml");
    let toml: String = kiln_protocol::DEFAULT_RUNTIMES_TOML
        .lines()
        .filter(|l| !l.starts_with("zygote_max_uses"))
        .map(|l| match l {
            "zygote = true" => format!("{l}\nzygote_max_uses = 1\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&table, toml).unwrap();
    let mut args = SMALL_POOL.to_vec();
    args.extend(["--runtimes", table.to_str().unwrap()]);
    let s = Server::start("layout", &args);
    wait_ready(&s);
    // Jobs that found the fresh zygote still starting ran in an interpreter
    // started for them, and say so; only forked ones count, by jail.
    let mut by_jail: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut layouts: Vec<String> = Vec::new();
    for _ in 0..300 {
        let (jail, out) = jail_and_output(&python(&s, &in_jail(LAYOUT)));
        let out = out.trim();
        match out.split_once(' ') {
            Some(("True", layout)) => by_jail.entry(jail.clone()).or_default().push(layout.into()),
            Some(("False", _)) => std::thread::sleep(Duration::from_millis(25)),
            _ => panic!("{out}"),
        }
        if by_jail.get(&jail).is_some_and(|l| l.len() == 3) {
            layouts = by_jail.remove(&jail).unwrap();
            break;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(layouts.len(), 3, "{layouts:?}");
    for (a, b) in [(0, 1), (1, 2), (0, 2)] {
        let shared: Vec<&str> = layouts[a]
            .split(' ')
            .zip(layouts[b].split(' '))
            .filter(|(x, y)| x == y)
            .map(|(x, _)| x)
            .collect();
        assert!(shared.is_empty(), "jobs {a} and {b} share {shared:?}");
    }
}

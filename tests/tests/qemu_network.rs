//! Networks of qemu microVMs through the daemon's API, against a
//! test-made internet (`kiln_tests::netlab`): `kiln serve --backend qemu`
//! runs in the host-side namespace with `[network] enabled`, so each
//! networked VM's tap (`kn<slot>`) is made there and QEMU opens it. The
//! guest's agent sets `eth0` up from the guest setup. Shown: an
//! air-gapped VM has no way out and fails at once; a networked one
//! reaches the test internet by name and by address under its rules and
//! nothing of the host; VMs of one private network talk, of two do not;
//! an exposed port answers through the daemon; a rate limit bounds both
//! ways; VMs made and destroyed, and those of a SIGKILLed daemon, leave no
//! tap, shaper, rule or slot behind.
//!
//! Needs root, QEMU, vhost-device-vsock, iproute2, nftables, conntrack and
//! the guest artefacts; without the artefacts it says SKIPPED, unless
//! `KILN_REQUIRE_GUEST=1`. Each VM boots under TCG here (seconds), so the
//! tests make few and ask each many questions.

use std::process::Command;

use kiln_tests::netlab::{
    answers, ok, within, World, BULK, DNS, HOST_SIDE, PROBE, WEB_ALLOWED_BY_NAME,
    WEB_ALLOWED_BY_NETWORK, WEB_DENIED,
};
use kiln_tests::server::Server;
use kiln_tests::{bin, Scope};
use serde_json::{json, Value};

/// `kiln serve --backend qemu` inside the host side, its API on every
/// address there; every VM booted (no pool templates being built beside
/// the test's VMs; `sandbox/tests/qemu_network.rs` restores networked
/// VMs from a template).
fn serve(world: &World, scope: Scope) -> Server {
    world.serve(
        scope,
        "[snapshot]\ntemplates = false\n",
        &["--backend", "qemu"],
    )
}

fn call(world: &World, s: &Server, method: &str, path: &str, body: Value) -> (u16, Value) {
    world.call(s, method, path, body)
}

/// A workspace of `body` (a python one), its id.
fn create(world: &World, s: &Server, mut body: Value) -> String {
    body["template"] = json!("python");
    world.create(s, body)
}

/// Runs `code` in workspace `id` with `stdin`; its stdout.
fn exec(world: &World, s: &Server, id: &str, code: &str, stdin: &str) -> String {
    let (st, r) = call(
        world,
        s,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"code": code, "stdin": stdin, "limits": {"timeout_ms": 120000}}),
    );
    assert_eq!((st, r["outcome"].as_str()), (200, Some("ok")), "{r}");
    r["stdout"].as_str().unwrap().to_owned()
}

/// Runs the probe lines in workspace `id`; the answer of each.
fn probe(world: &World, s: &Server, id: &str, lines: &[String]) -> Vec<String> {
    answers(&exec(world, s, id, PROBE, &lines.join("\n")), lines)
}

/// Nothing of a sandbox's network left in the host side or the state
/// directory.
fn assert_no_network_left(world: &World, s: &Server) {
    assert!(world.host_links().is_empty(), "{:?}", world.host_links());
    let table = world.table();
    assert!(!table.contains("chain s"), "{table}");
    assert!(!table.contains("set n0"), "{table}");
    let slots = s.scope.state_dir.join("net/slots");
    assert_eq!(std::fs::read_dir(&slots).unwrap().count(), 0);
}

/// Serves port 9000 of the VM (answering `peer`) and port 8000 (HTTP,
/// answering `peer` too), left running after the job.
const LISTEN: &str = r#"
import os, socket, threading
def serve(port, answer):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(8)
    return s
def loop(s, answer):
    while True:
        c, _ = s.accept()
        c.recv(1000)
        c.sendall(answer)
        c.close()
raw = serve(9000, b"peer")
http = serve(8000, None)
if os.fork() == 0:
    os.setsid()
    for fd in (0, 1, 2):
        os.close(fd)
    threading.Thread(target=loop, args=(raw, b"peer")).start()
    loop(http, b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\npeer")
print("listening")
"#;

#[test]
fn vm_networks_hold_their_rules_private_networks_and_ports_and_leave_nothing() {
    if !kiln_tests::has_guest() {
        return;
    }
    let world = World::new("qvm");
    let s = serve(&world, Scope::new("qemu-net"));
    let port = s.addr.port();

    // Air-gapped: the guest has no network device; nothing goes anywhere,
    // and not by waiting.
    let gapped = create(&world, &s, json!({}));
    let got = probe(
        &world,
        &s,
        &gapped,
        &[
            format!("tcp {WEB_ALLOWED_BY_NAME}:80"),
            "tcp allowed.test:80".into(),
            format!("dns allowed.test@{DNS}"),
        ],
    );
    assert_eq!(got[0], "ENETUNREACH", "{got:?}");
    assert!(got[1] == "dns:-3" || got[1] == "dns:-2", "{got:?}");
    assert_eq!(got[2], "ENETUNREACH", "{got:?}");
    let (_, v) = call(
        &world,
        &s,
        "GET",
        &format!("/v1/sandboxes/{gapped}/egress"),
        json!(null),
    );
    assert_eq!(v, json!({"allow_internet": false}));
    assert!(world.host_links().is_empty(), "{:?}", world.host_links());
    world.delete(&s, &gapped);

    // Networked, under the configured rules, in private network "a".
    let a1 = create(&world, &s, json!({"allow_internet": true, "network": "a"}));
    let a1_addr = world.address(&s, &a1);
    let gw = std::net::Ipv4Addr::from(u32::from(a1_addr) - 1);
    assert_eq!(world.host_links().len(), 1, "{:?}", world.host_links());
    let got = probe(
        &world,
        &s,
        &a1,
        &[
            // Allowed: a name, a network (by address).
            "tcp allowed.test:80".into(),
            format!("tcp {WEB_ALLOWED_BY_NETWORK}:80"),
            // Denied: a name the rules do not allow, an address nobody
            // handed out, and the same name asked of the test internet's
            // server directly (Kiln's resolver answers whatever the
            // address).
            "tcp denied.test:80".into(),
            format!("tcp {WEB_DENIED}:80"),
            format!("dns denied.test@{DNS}"),
            format!("tcp {WEB_DENIED}:80"),
            // Nothing of the host: the daemon's API and a service, on the
            // gateway and on the host side's other address; metadata.
            format!("tcp {gw}:{port}"),
            format!("tcp {HOST_SIDE}:{port}"),
            format!("tcp {gw}:8080"),
            format!("tcp {HOST_SIDE}:8080"),
            "tcp 169.254.169.254:80".into(),
        ],
    );
    let refused = "ECONNREFUSED".to_string();
    assert_eq!(
        got,
        [
            ok(),
            ok(),
            "dns:-2".into(),
            refused.clone(),
            "rcode:3 answers:0".into(),
            refused.clone(),
            refused.clone(),
            refused.clone(),
            refused.clone(),
            refused.clone(),
            refused.clone(),
        ]
    );

    // Rules changed on the running VM hold at once.
    let (st, v) = call(
        &world,
        &s,
        "PUT",
        &format!("/v1/sandboxes/{a1}/egress"),
        json!({"allow": [format!("{WEB_ALLOWED_BY_NETWORK}/32")]}),
    );
    assert_eq!(st, 200, "{v}");
    let got = probe(
        &world,
        &s,
        &a1,
        &[
            "tcp allowed.test:80".into(),
            format!("tcp {WEB_ALLOWED_BY_NETWORK}:80"),
        ],
    );
    assert_eq!(got, ["dns:-2".to_string(), ok()]);

    // A second VM of network "a" and one of network "b".
    let a2 = create(&world, &s, json!({"allow_internet": true, "network": "a"}));
    // Its bandwidth limited (8 Mbit/s each way: less than TCG moves).
    const MBIT: u32 = 8;
    let b1 = create(
        &world,
        &s,
        json!({"allow_internet": true, "network": "b", "rate_mbit": MBIT}),
    );
    assert_eq!(exec(&world, &s, &a2, LISTEN, ""), "listening\n");
    let a2_addr = world.address(&s, &a2);
    let lines = [format!("tcp {a2_addr}:9000"), format!("tcp {a2}:9000")];
    let got = probe(&world, &s, &a1, &lines);
    assert_eq!(got, ["ok:peer".to_string(), "ok:peer".into()]);
    assert_eq!(
        probe(&world, &s, &b1, &lines),
        [refused.clone(), "dns:-2".into()]
    );

    // The server exposed through the daemon's proxy (and only so).
    let (st, v) = call(
        &world,
        &s,
        "POST",
        &format!("/v1/sandboxes/{a2}/ports"),
        json!({"port": 8000}),
    );
    assert_eq!(st, 200, "{v}");
    let r = within(&world.host, || {
        s.request("GET", &format!("/v1/sandboxes/{a2}/ports/8000/x"), None)
    });
    assert_eq!((r.status, r.text()), (200, "peer".to_string()));
    let direct = within(&world.host, || {
        std::net::TcpStream::connect((a2_addr, 8000)).map(drop)
    });
    assert_eq!(
        direct.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );

    // The rate limit bounds both ways (only the bound can be asserted on
    // a shared machine; docs/BENCHMARKS.md has how close it comes).
    let bytes = u64::from(MBIT) * 1_000_000 / 8 * 2;
    let out = exec(
        &world,
        &s,
        &b1,
        BULK,
        &format!("down {WEB_ALLOWED_BY_NETWORK} {bytes}\nup {WEB_ALLOWED_BY_NETWORK} {bytes}\n"),
    );
    for (way, line) in ["down", "up"].iter().zip(out.lines()) {
        let (n, secs) = line.split_once(' ').unwrap();
        let (n, secs): (u64, f64) = (n.parse().unwrap(), secs.parse().unwrap());
        assert!(n >= bytes, "{way}: {line}");
        let mbit = n as f64 * 8.0 / secs / 1e6;
        eprintln!("{way}: {mbit:.1} Mbit/s (limit {MBIT})");
        assert!(
            mbit <= f64::from(MBIT) * 1.2,
            "{way}: {mbit:.1} Mbit/s over a {MBIT} Mbit/s limit"
        );
    }

    for id in [&a1, &a2, &b1] {
        world.delete(&s, id);
    }
    assert_no_network_left(&world, &s);

    // Made and destroyed again and again: nothing accumulates.
    for _ in 0..3 {
        let id = create(&world, &s, json!({"allow_internet": true, "rate_mbit": 50}));
        assert_eq!(world.host_links().len(), 2, "{:?}", world.host_links());
        world.delete(&s, &id);
        assert_no_network_left(&world, &s);
    }
}

#[test]
fn a_sigkilled_daemons_vm_networks_are_gone_after_the_next_start() {
    if !kiln_tests::has_guest() {
        return;
    }
    let world = World::new("qkill");
    let mut first = serve(&world, Scope::new("qemu-net-kill"));
    for _ in 0..2 {
        create(
            &world,
            &first,
            json!({"allow_internet": true, "rate_mbit": 100}),
        );
    }
    assert_eq!(world.host_links().len(), 4, "{:?}", world.host_links());
    first.kill();
    // The taps are persistent: they outlive the dead daemon's VMs, and so
    // do the slots and the table's chains.
    let slots = first.scope.state_dir.join("net/slots");
    assert_eq!(std::fs::read_dir(&slots).unwrap().count(), 2);
    assert!(world.table().contains("chain s"));
    let second = serve(&world, Scope::new("qemu-net-kill"));
    assert_no_network_left(&world, &second);
    let id = create(&world, &second, json!({"allow_internet": true}));
    assert_eq!(
        probe(&world, &second, &id, &["tcp allowed.test:80".into()]),
        [ok()]
    );
    // And `kiln reap` in the host side removes what a SIGKILLed daemon
    // left, with no daemon starting.
    let mut second = second;
    second.kill();
    assert_eq!(world.host_links().len(), 1, "{:?}", world.host_links());
    let mut reap = Command::new(bin("kiln"));
    reap.arg("reap")
        .arg("--state-dir")
        .arg(&second.scope.state_dir)
        .arg("--cgroup-parent")
        .arg(&second.scope.cgroup_parent)
        .stdin(std::process::Stdio::null());
    world.in_host_side(&mut reap);
    let out = reap.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(world.host_links().is_empty(), "{:?}", world.host_links());
    assert!(!world.table().contains("chain s"), "{}", world.table());
    drop(second);
    drop(first);
}

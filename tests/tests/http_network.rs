//! Sandbox networks through the daemon's API, against a test-made
//! internet (`kiln_tests::netlab`): `kiln serve` runs in the host-side
//! namespace with `[network] enabled`, its API on every address there.
//! A workspace's own egress rules replace the configured ones, change
//! while it runs, and are refused without `allow_internet`; the daemon's
//! API is out of a sandbox's reach; a SIGKILLed daemon's interfaces,
//! rules and slots are gone after the next one starts. Needs root,
//! iproute2, nftables and conntrack.

use kiln_tests::netlab::{
    answers, ok, within, World, HOST_SIDE, PROBE, WEB_ALLOWED_BY_NAME, WEB_ALLOWED_BY_NETWORK,
};
use kiln_tests::server::Server;
use kiln_tests::Scope;
use serde_json::{json, Value};

/// `kiln serve` inside the host side, its API on every address there.
fn serve(world: &World, scope: Scope) -> Server {
    world.serve(scope, "", &[])
}

fn call(world: &World, s: &Server, method: &str, path: &str, body: Value) -> (u16, Value) {
    world.call(s, method, path, body)
}

/// Runs the probe lines in workspace `id`; the answer of each.
fn probe(world: &World, s: &Server, id: &str, lines: &[String]) -> Vec<String> {
    let (st, r) = call(
        world,
        s,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"code": PROBE, "stdin": lines.join("\n")}),
    );
    assert_eq!((st, r["outcome"].as_str()), (200, Some("ok")), "{r}");
    answers(r["stdout"].as_str().unwrap(), lines)
}

/// Asserts that `method path` with `body` is refused as malformed, the
/// field named.
fn refused(world: &World, s: &Server, method: &str, path: &str, body: Value, field: &str) {
    let (st, v) = call(world, s, method, path, body);
    assert_eq!(
        (st, v["error"]["field"].as_str()),
        (400, Some(field)),
        "{v}"
    );
}

#[test]
fn workspace_egress_rules_hold_change_live_and_keep_the_api_out_of_reach() {
    let world = World::new("api");
    let s = serve(&world, Scope::new("net-api"));
    let port = s.addr.port();
    // The API answers on the host side's address (from the host side).
    let (st, _) = call(&world, &s, "GET", "/v1/sandboxes", json!(null));
    assert_eq!(st, 200);

    for body in [
        json!({"template": "python", "egress": {"allow": ["allowed.test"]}}),
        json!({"template": "python", "allow_internet": true, "egress": {"allow": ["bad name"]}}),
    ] {
        refused(&world, &s, "POST", "/v1/sandboxes", body, "egress");
    }

    let id = world.create(
        &s,
        json!({"template": "python", "allow_internet": true, "egress": {"allow": ["allowed.test"]}, "rate_mbit": 500}),
    );
    let net = world.egress(&s, &id);
    assert_eq!(net["allow_internet"], true);
    assert_eq!(net["egress"]["allow"], json!(["allowed.test"]));
    assert_eq!(net["rate_mbit"], 500);
    let address: std::net::Ipv4Addr = net["address"].as_str().unwrap().parse().unwrap();
    let gateway = std::net::Ipv4Addr::from(u32::from(address) - 1);

    let got = probe(
        &world,
        &s,
        &id,
        &[
            "tcp allowed.test:80".into(),
            // The configured rules allowed it; the workspace's own do not.
            format!("tcp {WEB_ALLOWED_BY_NETWORK}:80"),
            // The daemon's API listens on every address of the host side.
            format!("tcp {gateway}:{port}"),
            format!("tcp {HOST_SIDE}:{port}"),
        ],
    );
    assert_eq!(
        got,
        [
            ok(),
            "ECONNREFUSED".into(),
            "ECONNREFUSED".into(),
            "ECONNREFUSED".into()
        ]
    );

    // New rules on the running workspace.
    let (st, net) = call(
        &world,
        &s,
        "PUT",
        &format!("/v1/sandboxes/{id}/egress"),
        json!({"allow": [format!("{WEB_ALLOWED_BY_NETWORK}/32")]}),
    );
    assert_eq!(st, 200, "{net}");
    assert_eq!(
        net["egress"]["allow"],
        json!([format!("{WEB_ALLOWED_BY_NETWORK}/32")])
    );
    let got = probe(
        &world,
        &s,
        &id,
        &[
            "tcp allowed.test:80".into(),
            format!("tcp {WEB_ALLOWED_BY_NAME}:80"),
            format!("tcp {WEB_ALLOWED_BY_NETWORK}:80"),
        ],
    );
    assert_eq!(got, ["dns:-2".to_string(), "ECONNREFUSED".into(), ok()]);

    // An air-gapped workspace has no rules to change.
    let gapped = world.create(&s, json!({"template": "python"}));
    let (st, v) = call(
        &world,
        &s,
        "PUT",
        &format!("/v1/sandboxes/{gapped}/egress"),
        json!({"allow": ["*"]}),
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (422, Some("unsupported")),
        "{v}"
    );
    assert_eq!(world.egress(&s, &gapped), json!({"allow_internet": false}));

    // A private network needs an interface; two sandboxes naming one
    // reach each other (shown end to end in sandbox/tests/jail_network.rs)
    // and resolve each other's ids.
    refused(
        &world,
        &s,
        "POST",
        "/v1/sandboxes",
        json!({"template": "python", "network": "team"}),
        "network",
    );
    let team: Vec<String> = (0..2)
        .map(|_| {
            world.create(
                &s,
                json!({"template": "python", "allow_internet": true, "network": "team", "egress": {"allow": []}}),
            )
        })
        .collect();
    let v = world.egress(&s, &team[0]);
    assert_eq!(v["network"], "team", "{v}");
    let got = probe(
        &world,
        &s,
        &team[0],
        &[
            format!("tcp {}:9", team[1]),
            format!("tcp {id}:9"),
            "tcp allowed.test:80".into(),
        ],
    );
    // The peer's name resolves (nothing listens on port 9: its kernel
    // resets); a sandbox outside the network does not; and no internet
    // at all with an empty allow list.
    assert_eq!(
        got,
        ["ECONNREFUSED".to_string(), "dns:-2".into(), "dns:-2".into()]
    );
    for t in &team {
        world.delete(&s, t);
    }
    world.delete(&s, &id);
    assert!(world.host_links().is_empty(), "{:?}", world.host_links());
    assert!(!world.table().contains("chain s"), "{}", world.table());
}

/// Runs a job through `POST /v1/jobs` with the probe lines and the extra
/// fields of `body`; the answer of each line.
fn job_probe(world: &World, s: &Server, body: Value, lines: &[String]) -> Vec<String> {
    let job = job(
        json!({"runtime": "python", "code": PROBE, "stdin": lines.join("\n")}),
        body,
    );
    let (st, r) = call(world, s, "POST", "/v1/jobs", job);
    assert_eq!((st, r["outcome"].as_str()), (200, Some("ok")), "{r}");
    answers(r["stdout"].as_str().unwrap(), lines)
}

/// Job `base` with the fields of `extra` set on it.
fn job(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

/// One-shot jobs (HTTP here; AMQP carries the same JobSpec) ask for a
/// network as workspaces do: `allow_internet` with the configured rules or
/// their own `egress`, refused with the field named when malformed, and
/// the sandbox (never a pooled one) leaves nothing behind.
#[test]
fn jobs_get_a_network_on_request_under_their_own_or_the_configured_rules() {
    let world = World::new("jobs");
    let s = serve(&world, Scope::new("net-jobs"));
    let lines = [
        "tcp allowed.test:80".to_string(),
        format!("tcp {WEB_ALLOWED_BY_NETWORK}:80"),
    ];
    // Air-gapped by default: no name, no route.
    let got = job_probe(&world, &s, json!({}), &lines);
    assert!(got[0] == "dns:-3" || got[0] == "dns:-2", "{got:?}");
    assert_eq!(got[1], "ENETUNREACH");
    // The configured rules: both allowed.
    let got = job_probe(&world, &s, json!({"allow_internet": true}), &lines);
    assert_eq!(got, [ok(), ok()]);
    // The job's own rules replace them.
    let got = job_probe(
        &world,
        &s,
        json!({"allow_internet": true, "egress": {"allow": ["allowed.test"]}}),
        &lines,
    );
    assert_eq!(got, [ok(), "ECONNREFUSED".to_string()]);
    // A hostile pair: that job resolved allowed.test and reached it; the
    // next job, allowed nothing, gets the freed address slot and tries the
    // address it learnt by IP. What the resolver handed out to the last
    // holder of the slot is not handed on.
    let got = job_probe(
        &world,
        &s,
        json!({"allow_internet": true, "egress": {"allow": []}}),
        &[format!("tcp {WEB_ALLOWED_BY_NAME}:80")],
    );
    assert_eq!(got, ["ECONNREFUSED".to_string()]);
    // Malformed requests name the field.
    for (body, field) in [
        (json!({"egress": {"allow": ["allowed.test"]}}), "egress"),
        (
            json!({"allow_internet": true, "egress": {"allow": ["bad name"]}}),
            "egress",
        ),
        (
            json!({"allow_internet": true, "egress": {"alow": []}}),
            "job",
        ),
    ] {
        let job = job(json!({"runtime": "python", "code": "print(1)"}), body);
        refused(&world, &s, "POST", "/v1/jobs", job, field);
    }
    assert!(
        world.host_links().is_empty(),
        "the jobs' interfaces are gone: {:?}",
        world.host_links()
    );
}

#[test]
fn a_sigkilled_daemon_leaves_no_network_behind_after_the_next_start() {
    let world = World::new("kill");
    let mut first = serve(&world, Scope::new("net-kill"));
    for _ in 0..3 {
        world.create(
            &first,
            json!({"template": "python", "allow_internet": true}),
        );
    }
    assert_eq!(world.host_links().len(), 3);
    first.kill();
    // The crash left the slots and the table's chains (the interfaces go
    // when their jails die, which the kernel does on its own time).
    let slots = first.scope.state_dir.join("net/slots");
    assert_eq!(std::fs::read_dir(&slots).unwrap().count(), 3);
    assert!(world.table().contains("chain s"));
    let second = serve(&world, Scope::new("net-kill"));
    assert!(world.host_links().is_empty(), "{:?}", world.host_links());
    assert!(!world.table().contains("chain s"), "{}", world.table());
    assert_eq!(std::fs::read_dir(&slots).unwrap().count(), 0);
    // And the new daemon's sandboxes are networked as before.
    let id = world.create(
        &second,
        json!({"template": "python", "allow_internet": true}),
    );
    assert_eq!(
        probe(&world, &second, &id, &["tcp allowed.test:80".into()]),
        [ok()]
    );
    drop(second);
    drop(first);
}

/// Serves port 8000 inside the sandbox, left running after the job:
/// HTTP (`hello from inside <path>`) and a one-message WebSocket echo.
const SERVE_8000: &str = r#"
import base64, hashlib, os, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8000))
s.listen(8)
if os.fork() == 0:
    os.setsid()
    for fd in (0, 1, 2):
        os.close(fd)
    while True:
        c, _ = s.accept()
        head = b""
        while b"\r\n\r\n" not in head:
            d = c.recv(4096)
            if not d:
                break
            head += d
        lines = head.decode(errors="replace").split("\r\n")
        hdr = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
        if hdr.get("upgrade", "").lower() == "websocket":
            key = hdr["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            acc = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()
            c.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % acc).encode())
            f = c.recv(2)
            mask = c.recv(4)
            data = bytearray(c.recv(f[1] & 127))
            for i in range(len(data)):
                data[i] ^= mask[i % 4]
            c.sendall(bytes([0x81, len(data)]) + bytes(data))
        else:
            body = ("hello from inside " + lines[0].split()[1]).encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        c.close()
print("serving")
"#;

#[test]
fn an_exposed_port_answers_http_and_websocket_through_the_daemon_only() {
    use std::io::{Read, Write};
    let world = World::new("ports");
    let s = serve(&world, Scope::new("net-ports"));
    let id = world.create(
        &s,
        json!({"template": "python", "allow_internet": true, "egress": {"allow": []}}),
    );
    let (_, r) = call(
        &world,
        &s,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"code": SERVE_8000}),
    );
    assert_eq!(r["stdout"], "serving\n", "{r}");
    let greet = format!("/v1/sandboxes/{id}/ports/8000/greet?x=1");
    // Not exposed: the proxy refuses.
    let (st, v) = call(&world, &s, "GET", &greet, json!(null));
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("not_exposed")),
        "{v}"
    );
    let (st, v) = call(
        &world,
        &s,
        "POST",
        &format!("/v1/sandboxes/{id}/ports"),
        json!({"port": 8000}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ports"][0]["port"], 8000);
    let r = within(&world.host, || s.request("GET", &greet, None));
    assert_eq!(
        (r.status, r.text()),
        (200, "hello from inside /greet?x=1".to_string())
    );

    // A WebSocket through the proxy: the sandbox echoes one message.
    let echoed = within(&world.host, || {
        let mut c = std::net::TcpStream::connect(s.addr).unwrap();
        write!(
            c,
            "GET /v1/sandboxes/{id}/ports/8000/ws HTTP/1.1\r\nHost: kiln\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            c.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // RFC 6455's example key and its answer.
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | 5];
        frame.extend(mask);
        frame.extend(b"hello".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        c.write_all(&frame).unwrap();
        let mut back = [0u8; 7];
        c.read_exact(&mut back).unwrap();
        back
    });
    assert_eq!(&echoed, b"\x81\x05hello");

    // Nothing else of the host side gets in: a direct connection from it
    // (no proxy mark) is refused, whether the port is exposed or not.
    let addr = world.address(&s, &id);
    let direct = within(&world.host, || {
        std::net::TcpStream::connect((addr, 8000)).map(drop)
    });
    assert_eq!(
        direct.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
}

//! Sandbox networks through the daemon's API, against a test-made
//! internet (`kiln_tests::netlab`): `kiln serve` runs in the host-side
//! namespace with `[network] enabled`, its API on every address there.
//! A workspace's own egress rules replace the configured ones, change
//! while it runs, and are refused without `allow_internet`; the daemon's
//! API is out of a sandbox's reach; a SIGKILLed daemon's interfaces,
//! rules and slots are gone after the next one starts. Needs root,
//! iproute2, nftables and conntrack.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt as _;
use std::process::Command;

use kiln_tests::netlab::{
    within, World, BODY, DNS, HOST_SIDE, PROBE, WEB_ALLOWED_BY_NAME, WEB_ALLOWED_BY_NETWORK,
};
use kiln_tests::server::Server;
use kiln_tests::{bin, Scope};
use serde_json::{json, Value};

/// `kiln serve` inside the host side, its API on every address there.
fn serve(world: &World, scope: Scope) -> Server {
    let config = scope.state_dir.join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "[network]\nenabled = true\npool = \"10.213.0.0/24\"\nupstream_dns = [\"{DNS}:53\"]\nallow = [\"allowed.test\", \"{WEB_ALLOWED_BY_NETWORK}/32\"]\n"
        ),
    )
    .unwrap();
    let mut c = Command::new(bin("kiln"));
    c.arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--bind", "0.0.0.0:0", "--min-idle", "0", "--state-dir"])
        .arg(&scope.state_dir)
        .arg("--cgroup-parent")
        .arg(&scope.cgroup_parent)
        .env_remove("KILN_CONFIG")
        .env_remove("KILN_TOKEN")
        .stdin(std::process::Stdio::null());
    let ns = std::fs::File::open(world.host_ns()).unwrap();
    // SAFETY: setns is async-signal-safe; the descriptor is open in the
    // parent until the spawn returns.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Server::start_command(scope, c)
}

fn call(world: &World, s: &Server, method: &str, path: &str, body: Value) -> (u16, Value) {
    within(&world.host, || s.json(method, path, &body))
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
    r["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .zip(lines)
        .map(|(l, q)| l.strip_prefix(q.as_str()).unwrap().trim().to_owned())
        .collect()
}

fn ok() -> String {
    format!("ok:{BODY}")
}

#[test]
fn workspace_egress_rules_hold_change_live_and_keep_the_api_out_of_reach() {
    let world = World::new("api");
    let s = serve(&world, Scope::new("net-api"));
    let port = s.addr.port();
    // The API answers on the host side's address (from the host side).
    let (st, _) = call(&world, &s, "GET", "/v1/sandboxes", json!(null));
    assert_eq!(st, 200);

    let (st, v) = call(
        &world,
        &s,
        "POST",
        "/v1/sandboxes",
        json!({"template": "python", "egress": {"allow": ["allowed.test"]}}),
    );
    assert_eq!(
        (st, v["error"]["field"].as_str()),
        (400, Some("egress")),
        "{v}"
    );
    let (st, v) = call(
        &world,
        &s,
        "POST",
        "/v1/sandboxes",
        json!({"template": "python", "allow_internet": true, "egress": {"allow": ["bad name"]}}),
    );
    assert_eq!(
        (st, v["error"]["field"].as_str()),
        (400, Some("egress")),
        "{v}"
    );

    let (st, v) = call(
        &world,
        &s,
        "POST",
        "/v1/sandboxes",
        json!({"template": "python", "allow_internet": true, "egress": {"allow": ["allowed.test"]}}),
    );
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let (st, net) = call(
        &world,
        &s,
        "GET",
        &format!("/v1/sandboxes/{id}/egress"),
        json!(null),
    );
    assert_eq!(st, 200);
    assert_eq!(net["allow_internet"], true);
    assert_eq!(net["egress"]["allow"], json!(["allowed.test"]));
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
    let (st, v) = call(
        &world,
        &s,
        "POST",
        "/v1/sandboxes",
        json!({"template": "python"}),
    );
    assert_eq!(st, 201);
    let gapped = v["id"].as_str().unwrap().to_owned();
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
    let (_, v) = call(
        &world,
        &s,
        "GET",
        &format!("/v1/sandboxes/{gapped}/egress"),
        json!(null),
    );
    assert_eq!(v, json!({"allow_internet": false}));

    // A private network needs an interface; two sandboxes naming one
    // reach each other (shown end to end in sandbox/tests/jail_network.rs)
    // and resolve each other's ids.
    let (st, v) = call(
        &world,
        &s,
        "POST",
        "/v1/sandboxes",
        json!({"template": "python", "network": "team"}),
    );
    assert_eq!(
        (st, v["error"]["field"].as_str()),
        (400, Some("network")),
        "{v}"
    );
    let mut team = Vec::new();
    for _ in 0..2 {
        let (st, v) = call(
            &world,
            &s,
            "POST",
            "/v1/sandboxes",
            json!({"template": "python", "allow_internet": true, "network": "team", "egress": {"allow": []}}),
        );
        assert_eq!(st, 201, "{v}");
        team.push(v["id"].as_str().unwrap().to_owned());
    }
    let (_, v) = call(
        &world,
        &s,
        "GET",
        &format!("/v1/sandboxes/{}/egress", team[0]),
        json!(null),
    );
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
        let (st, _) = call(
            &world,
            &s,
            "DELETE",
            &format!("/v1/sandboxes/{t}"),
            json!(null),
        );
        assert_eq!(st, 204);
    }

    let (st, _) = call(
        &world,
        &s,
        "DELETE",
        &format!("/v1/sandboxes/{id}"),
        json!(null),
    );
    assert_eq!(st, 204);
    assert!(world.host_links().is_empty(), "{:?}", world.host_links());
    assert!(!world.table().contains("chain s"), "{}", world.table());
}

#[test]
fn a_sigkilled_daemon_leaves_no_network_behind_after_the_next_start() {
    let world = World::new("kill");
    let mut first = serve(&world, Scope::new("net-kill"));
    for _ in 0..3 {
        let (st, v) = call(
            &world,
            &first,
            "POST",
            "/v1/sandboxes",
            json!({"template": "python", "allow_internet": true}),
        );
        assert_eq!(st, 201, "{v}");
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
    let (st, v) = call(
        &world,
        &second,
        "POST",
        "/v1/sandboxes",
        json!({"template": "python", "allow_internet": true}),
    );
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(
        probe(&world, &second, &id, &["tcp allowed.test:80".into()]),
        [ok()]
    );
    drop(second);
    drop(first);
}

//! `/v1/sandboxes` (workspaces) over real HTTP: files persist across execs,
//! the TTL kills a workspace (also mid-exec), the exec and metrics event
//! streams, delete, no network without `allow_internet`, and bad requests.

#[path = "support/sse.rs"]
mod sse;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use kiln_tests::server::Server;
use serde_json::{json, Value};

fn create(s: &Server, body: Value) -> String {
    let (st, v) = s.json("POST", "/v1/sandboxes", &body);
    assert_eq!(st, 201, "{v}");
    v["id"].as_str().unwrap().to_owned()
}

#[test]
fn a_workspace_keeps_files_across_execs_until_deleted() {
    let s = Server::start("wsfiles", &["--min-idle", "0"]);
    let id = create(
        &s,
        json!({"template": "python", "ttl_s": 120, "env": {"GREETING": "hi"}, "memory_mb": 128, "cpus": 0.5}),
    );
    let (st, info) = s.json("GET", &format!("/v1/sandboxes/{id}"), &Value::Null);
    assert_eq!(st, 200);
    assert_eq!(info["template"], "python");
    assert_eq!(info["memory_mb"], 128);
    assert_eq!(info["cpus"], 0.5);
    assert_eq!(info["remove_on_exit"], false);
    let (_, list) = s.json("GET", "/v1/sandboxes", &Value::Null);
    assert!(list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["id"] == id.as_str()));

    // Upload, exec, write, exec again, download.
    let r = s.request(
        "PUT",
        &format!("/v1/sandboxes/{id}/files/in/data.txt"),
        Some(b"41"),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let (st, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"code": "import os\nn = int(open('in/data.txt').read())\nopen('out.txt','w').write(str(n+1))\nprint(os.environ['GREETING'], n)"}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["stdout"], "hi 41\n", "{r}");
    let (_, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"runtime": "bash", "code": "cat out.txt; echo; ls in"}),
    );
    assert_eq!(r["stdout"], "42\ndata.txt\n", "{r}");
    let r = s.request("GET", &format!("/v1/sandboxes/{id}/files/out.txt"), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"42");
    let r = s.request(
        "GET",
        &format!("/v1/sandboxes/{id}/files/missing.txt"),
        None,
    );
    assert_eq!(r.status, 404, "{}", r.text());
    let r = s.request(
        "PUT",
        &format!("/v1/sandboxes/{id}/files/..%2Fescape"),
        Some(b"x"),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["field"], "path");

    // The exec stream variant.
    let st = s.open(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        &[("Accept", "text/event-stream")],
        Some(
            json!({"runtime": "bash", "code": "echo a; echo b >&2"})
                .to_string()
                .as_bytes(),
        ),
    );
    assert_eq!(st.status, 200);
    let evs: Vec<_> = sse::events(st.body).collect();
    let kinds: Vec<&str> = evs.iter().map(|e| e.event.as_str()).collect();
    assert!(
        kinds.contains(&"stdout") && kinds.contains(&"stderr"),
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"exit"));

    assert_eq!(
        s.request("DELETE", &format!("/v1/sandboxes/{id}"), None)
            .status,
        204
    );
    assert_eq!(
        s.request("GET", &format!("/v1/sandboxes/{id}"), None)
            .status,
        404
    );
    assert_eq!(
        s.request("DELETE", &format!("/v1/sandboxes/{id}"), None)
            .status,
        404
    );
    let left = s.wait_clean(Duration::from_secs(10));
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_workspace_dies_at_its_ttl_even_mid_exec() {
    let s = Server::start("wsttl", &["--min-idle", "0"]);
    let id = create(&s, json!({"template": "bash", "ttl_s": 2}));
    let start = Instant::now();
    let (st, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"code": "echo started; sleep 30", "limits": {"timeout_ms": 60000}}),
    );
    let took = start.elapsed();
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["outcome"], "killed", "{r}");
    assert!(r["message"].as_str().unwrap().contains("TTL"), "{r}");
    assert!(
        took < Duration::from_secs(10),
        "the TTL cut the exec short: {took:?}"
    );
    assert_eq!(
        s.request("GET", &format!("/v1/sandboxes/{id}"), None)
            .status,
        404
    );
    let left = s.wait_clean(Duration::from_secs(10));
    assert!(left.is_empty(), "left behind: {left:?}");

    // An idle one goes too, and its metrics stream says why.
    let id = create(&s, json!({"template": "python", "ttl_s": 3}));
    let st = s.open("GET", &format!("/v1/sandboxes/{id}/metrics"), &[], None);
    assert_eq!(st.status, 200);
    let evs: Vec<_> = sse::events(st.body).collect();
    let last = evs.last().unwrap();
    assert_eq!(last.event, "end");
    assert_eq!(
        serde_json::from_str::<Value>(&last.data).unwrap()["reason"],
        "ttl"
    );
    let samples: Vec<Value> = evs
        .iter()
        .filter(|e| e.event == "metrics")
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert!(
        samples.len() >= 2,
        "about one sample a second: {}",
        samples.len()
    );
    // The last sample may race with the sandbox's death; the others are whole.
    for m in &samples[..samples.len() - 1] {
        assert!(m["memory_bytes"].as_u64().unwrap() > 0, "{m}");
        assert!(m["pids"].as_u64().unwrap() >= 1, "{m}");
        assert_eq!(m["disk_total_bytes"], 64 * 1024 * 1024, "{m}");
        assert!(m["net_rx_bytes"].is_u64(), "{m}");
        assert!(m["cpu_usage_us"].is_u64(), "{m}");
    }
    assert!(samples[1]["cpu_percent"].is_number(), "{}", samples[1]);
    assert!(s.wait_clean(Duration::from_secs(10)).is_empty());
}

#[test]
fn remove_on_exit_destroys_a_workspace_after_its_exec() {
    let s = Server::start("wsroe", &["--min-idle", "0"]);
    let id = create(&s, json!({"template": "bash", "remove_on_exit": true}));
    let (_, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"code": "echo once"}),
    );
    assert_eq!(r["stdout"], "once\n");
    assert_eq!(
        s.request("GET", &format!("/v1/sandboxes/{id}"), None)
            .status,
        404
    );
    assert!(s.wait_clean(Duration::from_secs(10)).is_empty());
}

#[test]
fn without_allow_internet_a_sandbox_cannot_reach_the_host() {
    let s = Server::start("wsnet", &["--min-idle", "0"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let id = create(&s, json!({"template": "python", "allow_internet": false}));
    let code = format!(
        "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    print('connected')\nexcept OSError as e:\n    print('refused', e.errno)\n"
    );
    let (_, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"code": code}),
    );
    assert_eq!(r["outcome"], "ok", "{r}");
    assert!(r["stdout"].as_str().unwrap().starts_with("refused"), "{r}");
    assert!(
        listener.accept().is_err(),
        "the host listener saw no connection"
    );
    // Only loopback inside: no other interface to route through.
    let (_, r) = s.json("POST", &format!("/v1/sandboxes/{id}/exec"), &json!({"runtime": "bash", "code": "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '"}));
    assert_eq!(r["stdout"], "lo\n", "{r}");
    // Asking for the internet is refused by name on this backend.
    let (st, e) = s.json(
        "POST",
        "/v1/sandboxes",
        &json!({"template": "python", "allow_internet": true}),
    );
    assert_eq!(st, 422, "{e}");
    assert_eq!(e["error"]["field"], "allow_internet");
}

#[test]
fn bad_sandbox_requests_name_the_field() {
    let s = Server::start(
        "wsbad",
        &[
            "--min-idle",
            "0",
            "--max-ttl-s",
            "3600",
            "--max-sandboxes",
            "1",
        ],
    );
    for (body, field) in [
        (json!({"template": "cobol"}), "template"),
        (json!({"template": "python", "ttl_s": -1}), "ttl_s"),
        (json!({"template": "python", "ttl_s": 99999}), "ttl_s"),
        (json!({"template": "python", "cpus": 0}), "cpus"),
        (json!({"template": "python", "memory_mb": -64}), "memory_mb"),
        (
            json!({"template": "python", "memory_mb": 1e12 as i64}),
            "memory_mb",
        ),
        (
            json!({"template": "python", "env": {"A=B": "x"}}),
            "env.A=B",
        ),
    ] {
        let (st, e) = s.json("POST", "/v1/sandboxes", &body);
        assert_eq!(st, 400, "{body}: {e}");
        assert_eq!(e["error"]["field"], field, "{body}: {e}");
    }
    let (st, e) = s.json("POST", "/v1/sandboxes", &json!({"tempate": "python"}));
    assert_eq!(st, 400);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("tempate"),
        "{e}"
    );
    let (st, _) = s.json(
        "POST",
        "/v1/sandboxes/0123456789abcdef/exec",
        &json!({"code": "1"}),
    );
    assert_eq!(st, 404);
    // The bound on workspaces.
    let first = create(&s, json!({"template": "bash"}));
    let r = s.request(
        "POST",
        "/v1/sandboxes",
        Some(json!({"template": "bash"}).to_string().as_bytes()),
    );
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "too_many_sandboxes");
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        s.request("DELETE", &format!("/v1/sandboxes/{first}"), None)
            .status,
        204
    );
    create(&s, json!({"template": "bash"}));
}

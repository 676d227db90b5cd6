//! Code contexts in a real Linux guest (`kiln serve --backend qemu`, QEMU
//! under TCG here): the same driver and line protocol as in a jail, state
//! kept between cells, and a cell's deadline interrupting it without
//! losing the state.
//!
//! Needs root, QEMU, vhost-device-vsock and the guest artefacts; without the
//! artefacts it says SKIPPED, unless `KILN_REQUIRE_GUEST=1`.

use kiln_tests::server::Server;
use serde_json::{json, Value};

fn value(r: &Value) -> Option<&str> {
    r["results"]
        .as_array()?
        .iter()
        .find(|d| d["kind"] == "result")?["data"]["text/plain"]
        .as_str()
}

#[test]
fn a_context_in_a_guest_keeps_state_and_survives_its_deadline() {
    if !kiln_tests::has_guest() {
        return;
    }
    let s = Server::start("qemu-ctx", &["--backend", "qemu", "--min-idle", "0"]);
    let (st, sb) = s.json(
        "POST",
        "/v1/sandboxes",
        &json!({"template": "python", "ttl_s": 300}),
    );
    assert_eq!(st, 201, "{sb}");
    let sb = sb["id"].as_str().unwrap().to_owned();
    let (st, ctx) = s.json("POST", &format!("/v1/sandboxes/{sb}/contexts"), &json!({}));
    assert_eq!(st, 201, "{ctx}");
    let ctx = ctx["id"].as_str().unwrap().to_owned();
    let exec = |body: Value| s.json("POST", &format!("/v1/sandboxes/{sb}/exec"), &body);
    let (_, r) = exec(json!({"context": ctx, "code": "import platform\nx = 41"}));
    assert_eq!(r["outcome"], "ok", "{r}");
    let (_, r) = exec(json!({"context": ctx, "code": "x + 1"}));
    assert_eq!(value(&r), Some("42"), "{r}");
    let (_, r) = exec(
        json!({"context": ctx, "code": "x = 7\nwhile True: pass", "limits": {"timeout_ms": 1000}}),
    );
    assert_eq!(r["outcome"], "timeout", "{r}");
    assert_eq!(r["context_alive"], true, "{r}");
    let (_, r) = exec(json!({"context": ctx, "code": "(x, platform.system())"}));
    assert_eq!(value(&r), Some("(7, 'Linux')"), "{r}");
    assert_eq!(
        s.request("DELETE", &format!("/v1/sandboxes/{sb}"), None)
            .status,
        204
    );
}

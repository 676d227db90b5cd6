//! `docs/openapi.json` is served at `/openapi.json` and tells the truth:
//! every documented operation is exercised here against a real server, and
//! every answer (status, JSON body, each SSE event's data) is validated
//! against the schema the document gives for it.

#[path = "support/sse.rs"]
mod sse;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kiln_tests::openapi::Doc;
use kiln_tests::server::{Response, Server, Streaming};
use serde_json::{json, Value};

struct Checker<'a> {
    doc: Doc,
    s: &'a Server,
    seen: BTreeSet<(String, String)>,
}

impl Checker<'_> {
    fn call(&mut self, method: &str, template: &str, path: &str, body: Option<Value>) -> Response {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let r = self.s.request(method, path, bytes.as_deref());
        self.check(method, template, &r);
        r
    }

    fn check(&mut self, method: &str, template: &str, r: &Response) {
        self.seen.insert((method.to_owned(), template.to_owned()));
        let json_body = r
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json"));
        let body = if json_body { r.json() } else { Value::Null };
        if let Err(e) = self.doc.check(method, template, r.status, &body) {
            panic!("{method} {template}: {e}\nbody: {}", r.text());
        }
    }

    fn stream(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Vec<eventsource_stream::Event> {
        self.seen.insert((method.to_owned(), template.to_owned()));
        let bytes = body.map(|b| b.to_string().into_bytes());
        let st: Streaming = self.s.open(method, path, headers, bytes.as_deref());
        assert_eq!(st.status, 200);
        assert!(st
            .header("content-type")
            .unwrap()
            .starts_with("text/event-stream"));
        let op = self.doc.operation(method, template).unwrap();
        let events = op["responses"]["200"]["x-events"].clone();
        let evs: Vec<_> = sse::events(st.body).collect();
        assert!(!evs.is_empty());
        for e in &evs {
            let schema = events
                .get(&e.event)
                .unwrap_or_else(|| panic!("{template}: undocumented event {}", e.event));
            let data: Value = serde_json::from_str(&e.data).unwrap();
            if let Err(err) = self.doc.validate(schema, &data, "$") {
                panic!("{template} event {}: {err}\n{data}", e.event);
            }
        }
        evs
    }
}

#[test]
fn every_documented_operation_answers_as_documented() {
    let doc = Doc::load();
    let mut s = Server::start(
        "openapi",
        &[
            "--min-idle",
            "1",
            "--pool-runtimes",
            "bash",
            "--max-running",
            "1",
            "--queue-depth",
            "0",
        ],
    );

    // The served document is the checked-in one.
    let served = s.request("GET", "/openapi.json", None);
    assert!(
        served.json() == doc.doc,
        "/openapi.json differs from docs/openapi.json (rebuild kiln)"
    );
    let mut c = Checker {
        doc,
        s: &s,
        seen: BTreeSet::new(),
    };
    c.seen.insert(("GET".into(), "/openapi.json".into()));

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = c.call("GET", "/readyz", "/readyz", None);
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    c.call("GET", "/healthz", "/healthz", None);
    let job = json!({"runtime": "bash", "code": "echo out; echo err >&2", "id": "oa-1"});
    c.call("POST", "/v1/jobs", "/v1/jobs", Some(job));
    c.call(
        "POST",
        "/v1/jobs",
        "/v1/jobs",
        Some(json!({"runtime": "bash", "code": "true", "id": "oa-1"})),
    );
    c.call(
        "POST",
        "/v1/jobs",
        "/v1/jobs",
        Some(json!({"runtime": "cobol", "code": "x"})),
    );
    c.call(
        "POST",
        "/v1/jobs",
        "/v1/jobs",
        Some(json!({"runtime": "bash", "code": "x", "limits": {"memory_mb": -1}})),
    );
    let r = s.request("POST", "/v1/jobs", Some(b"{oops"));
    c.check("POST", "/v1/jobs", &r);
    let r = c.call(
        "POST",
        "/v1/jobs",
        "/v1/jobs?wait=false",
        Some(json!({"runtime": "bash", "code": "sleep 1; echo async", "id": "oa-2"})),
    );
    assert_eq!(r.status, 202);
    // With one run slot and no queue, the next is refused.
    let r = c.call(
        "POST",
        "/v1/jobs",
        "/v1/jobs",
        Some(json!({"runtime": "bash", "code": "true"})),
    );
    assert_eq!(r.status, 429);
    c.call("GET", "/v1/jobs/{id}", "/v1/jobs/oa-2", None);
    c.stream(
        "GET",
        "/v1/jobs/{id}/events",
        "/v1/jobs/oa-2/events",
        &[],
        None,
    );
    let r = c.call("GET", "/v1/jobs/{id}", "/v1/jobs/oa-2", None);
    assert_eq!(r.json()["state"], "done");
    c.call("GET", "/v1/jobs/{id}", "/v1/jobs/missing", None);
    c.call(
        "GET",
        "/v1/jobs/{id}/events",
        "/v1/jobs/missing/events",
        None,
    );

    let r = c.call(
        "POST",
        "/v1/sandboxes",
        "/v1/sandboxes",
        Some(json!({"template": "python", "ttl_s": 60, "env": {"X": "1"}})),
    );
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    c.call(
        "POST",
        "/v1/sandboxes",
        "/v1/sandboxes",
        Some(json!({"template": "python", "allow_internet": true})),
    );
    c.call(
        "POST",
        "/v1/sandboxes",
        "/v1/sandboxes",
        Some(json!({"template": "python", "cpus": -1})),
    );
    c.call("GET", "/v1/sandboxes", "/v1/sandboxes", None);
    // Without [network] the sandbox is air-gapped: its rules cannot change.
    c.call(
        "GET",
        "/v1/sandboxes/{id}/egress",
        &format!("/v1/sandboxes/{id}/egress"),
        None,
    );
    c.call(
        "PUT",
        "/v1/sandboxes/{id}/egress",
        &format!("/v1/sandboxes/{id}/egress"),
        Some(json!({"allow": ["*"]})),
    );
    c.call(
        "PUT",
        "/v1/sandboxes/{id}/egress",
        &format!("/v1/sandboxes/{id}/egress"),
        Some(json!({"allow": ["not a rule"]})),
    );
    c.call(
        "GET",
        "/v1/sandboxes/{id}/ports",
        &format!("/v1/sandboxes/{id}/ports"),
        None,
    );
    c.call(
        "POST",
        "/v1/sandboxes/{id}/ports",
        &format!("/v1/sandboxes/{id}/ports"),
        Some(json!({"port": 8000})),
    );
    c.call(
        "POST",
        "/v1/sandboxes/{id}/ports",
        &format!("/v1/sandboxes/{id}/ports"),
        Some(json!({"port": 0})),
    );
    c.call(
        "GET",
        "/v1/sandboxes/{id}/ports/{port}/{path}",
        &format!("/v1/sandboxes/{id}/ports/8000/index.html"),
        None,
    );
    c.call(
        "GET",
        "/v1/sandboxes/{id}",
        &format!("/v1/sandboxes/{id}"),
        None,
    );
    let r = s.request(
        "PUT",
        &format!("/v1/sandboxes/{id}/files/a/b.txt"),
        Some(b"bytes"),
    );
    c.check("PUT", "/v1/sandboxes/{id}/files/{path}", &r);
    assert_eq!(r.status, 204);
    let r = c.call(
        "GET",
        "/v1/sandboxes/{id}/files/{path}",
        &format!("/v1/sandboxes/{id}/files/a/b.txt"),
        None,
    );
    assert_eq!(r.body, b"bytes");
    c.call(
        "GET",
        "/v1/sandboxes/{id}/files/{path}",
        &format!("/v1/sandboxes/{id}/files/nope"),
        None,
    );
    c.call(
        "POST",
        "/v1/sandboxes/{id}/exec",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"code": "print(open('a/b.txt').read())"})),
    );
    c.call(
        "POST",
        "/v1/sandboxes/{id}/exec",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"code": "1", "limits": {"pids": 1}})),
    );
    c.stream(
        "POST",
        "/v1/sandboxes/{id}/exec",
        &format!("/v1/sandboxes/{id}/exec?stream=true"),
        &[],
        Some(json!({"code": "print(1)"})),
    );
    // Code contexts, and an exec naming one (JSON and SSE).
    let r = c.call(
        "POST",
        "/v1/sandboxes/{id}/contexts",
        &format!("/v1/sandboxes/{id}/contexts"),
        Some(json!({"language": "python"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let cid = r.json()["id"].as_str().unwrap().to_owned();
    c.call(
        "POST",
        "/v1/sandboxes/{id}/contexts",
        &format!("/v1/sandboxes/{id}/contexts"),
        Some(json!({"language": "bash"})),
    );
    c.call(
        "GET",
        "/v1/sandboxes/{id}/contexts",
        &format!("/v1/sandboxes/{id}/contexts"),
        None,
    );
    let r = c.call(
        "POST",
        "/v1/sandboxes/{id}/exec",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"context": cid, "code": "x = 41\nx + 1"})),
    );
    assert_eq!(r.json()["results"][0]["data"]["text/plain"], "42");
    c.call(
        "POST",
        "/v1/sandboxes/{id}/exec",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"context": cid, "code": "1 / 0"})),
    );
    c.stream(
        "POST",
        "/v1/sandboxes/{id}/exec",
        &format!("/v1/sandboxes/{id}/exec?stream=true"),
        &[],
        Some(json!({"context": cid, "code": "print(x)"})),
    );
    c.call(
        "GET",
        "/v1/sandboxes/{id}/contexts/{cid}",
        &format!("/v1/sandboxes/{id}/contexts/{cid}"),
        None,
    );
    c.call(
        "POST",
        "/v1/sandboxes/{id}/contexts/{cid}/interrupt",
        &format!("/v1/sandboxes/{id}/contexts/{cid}/interrupt"),
        Some(json!({})),
    );
    c.call(
        "POST",
        "/v1/sandboxes/{id}/contexts/{cid}/restart",
        &format!("/v1/sandboxes/{id}/contexts/{cid}/restart"),
        Some(json!({})),
    );
    c.call(
        "DELETE",
        "/v1/sandboxes/{id}/contexts/{cid}",
        &format!("/v1/sandboxes/{id}/contexts/{cid}"),
        None,
    );
    c.call(
        "GET",
        "/v1/sandboxes/{id}/contexts/{cid}",
        &format!("/v1/sandboxes/{id}/contexts/{cid}"),
        None,
    );
    c.call(
        "POST",
        "/v1/sandboxes/{id}/exec",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"context": cid, "code": "1"})),
    );
    // The MCP endpoint answers an MCP client's first message.
    let r = c.s.request_with(
        "POST",
        "/mcp",
        &[
            ("Accept", "application/json, text/event-stream"),
            ("Content-Type", "application/json"),
        ],
        Some(
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "openapi-test", "version": "0"}}})
            .to_string()
            .as_bytes(),
        ),
    );
    c.check("POST", "/mcp", &r);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("\"tools\""), "{}", r.text());
    let metrics_path = format!("/v1/sandboxes/{id}/metrics");
    let evs = std::thread::scope(|t| {
        let h = t.spawn(|| {
            std::thread::sleep(Duration::from_millis(2500));
            s.request("DELETE", &format!("/v1/sandboxes/{id}"), None)
        });
        let evs = c.stream(
            "GET",
            "/v1/sandboxes/{id}/metrics",
            &metrics_path,
            &[],
            None,
        );
        let del = h.join().unwrap();
        c.check("DELETE", "/v1/sandboxes/{id}", &del);
        assert_eq!(del.status, 204);
        evs
    });
    assert_eq!(evs.last().unwrap().event, "end");
    c.call(
        "DELETE",
        "/v1/sandboxes/{id}",
        &format!("/v1/sandboxes/{id}"),
        None,
    );
    c.call(
        "GET",
        "/v1/sandboxes/{id}",
        &format!("/v1/sandboxes/{id}"),
        None,
    );

    c.call("GET", "/api/v2/runtimes", "/api/v2/runtimes", None);
    c.call("GET", "/v1/images", "/v1/images", None);
    // A pull that cannot start (the registry is not on loopback): 400.
    c.call(
        "POST",
        "/v1/images",
        "/v1/images",
        Some(json!({"reference": "registry.invalid/x:1", "insecure": true})),
    );
    // Not an archive: 400; nothing by that name: 404; a collection of an
    // empty store: 200.
    c.call(
        "POST",
        "/v1/images/import",
        "/v1/images/import",
        Some(json!("not a tar archive")),
    );
    c.call(
        "DELETE",
        "/v1/images/{reference}",
        "/v1/images/kiln.test/absent:1",
        None,
    );
    c.call("POST", "/v1/images/gc", "/v1/images/gc", None);
    c.call(
        "POST",
        "/api/v2/execute",
        "/api/v2/execute",
        Some(json!({"language": "bash", "version": "*", "files": [{"content": "echo p"}]})),
    );
    c.call(
        "POST",
        "/api/v2/execute",
        "/api/v2/execute",
        Some(json!({"language": "bash", "version": "0.1", "files": [{"content": "echo p"}]})),
    );
    let m = s.request("GET", "/metrics", None);
    c.check("GET", "/metrics", &m);

    // Every documented operation was exercised.
    let documented: BTreeSet<(String, String)> = c.doc.doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "parameters")
                .map(move |m| (m.to_ascii_uppercase(), p.clone()))
        })
        .collect();
    let missing: Vec<_> = documented.difference(&c.seen).collect();
    assert!(
        missing.is_empty(),
        "documented but not exercised: {missing:?}"
    );
    let undocumented: Vec<_> = c.seen.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "exercised but not documented: {undocumented:?}"
    );

    // The auth error shape, too.
    drop(c);
    let mut t = Server::start("openapiauth", &["--min-idle", "0", "--token", "t"]);
    let doc = Doc::load();
    let r = t.request("GET", "/v1/sandboxes", None);
    assert_eq!(r.status, 401);
    doc.check("GET", "/v1/sandboxes", 401, &r.json()).unwrap();
    assert_eq!(t.request("GET", "/openapi.json", None).status, 200);
    assert!(t.term(Duration::from_secs(30)).success());
    assert!(s.term(Duration::from_secs(30)).success());
}

//! Code contexts (`/v1/sandboxes/{id}/contexts`) over real HTTP against a
//! real `kiln serve`: state persists between execs, a trailing expression
//! comes back as a `text/plain` result, an interrupt keeps the state, a
//! cell's deadline interrupts it, an OOM kills the context and the next
//! exec says so, restart and delete, and the SSE variant.

#[path = "support/sse.rs"]
mod sse;

use std::time::Duration;

use kiln_tests::server::{post_json, Server};
use serde_json::{json, Value};

fn create_sandbox(s: &Server, memory_mb: u64) -> String {
    let (st, v) = s.json(
        "POST",
        "/v1/sandboxes",
        &json!({"template": "python", "ttl_s": 300, "memory_mb": memory_mb}),
    );
    assert_eq!(st, 201, "{v}");
    v["id"].as_str().unwrap().to_owned()
}

fn create_context(s: &Server, sb: &str, body: Value) -> String {
    let (st, v) = s.json("POST", &format!("/v1/sandboxes/{sb}/contexts"), &body);
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["state"], "idle", "{v}");
    v["id"].as_str().unwrap().to_owned()
}

fn cell(s: &Server, sb: &str, ctx: &str, code: &str) -> (u16, Value) {
    s.json(
        "POST",
        &format!("/v1/sandboxes/{sb}/exec"),
        &json!({"context": ctx, "code": code}),
    )
}

/// The `text/plain` of the cell's trailing-expression result.
fn value(r: &Value) -> Option<String> {
    r["results"]
        .as_array()?
        .iter()
        .find(|d| d["kind"] == "result")
        .and_then(|d| d["data"]["text/plain"].as_str())
        .map(str::to_owned)
}

fn state(s: &Server, sb: &str, ctx: &str) -> String {
    let (st, v) = s.json(
        "GET",
        &format!("/v1/sandboxes/{sb}/contexts/{ctx}"),
        &Value::Null,
    );
    assert_eq!(st, 200, "{v}");
    v["state"].as_str().unwrap().to_owned()
}

#[test]
fn a_context_keeps_variables_and_imports_between_execs() {
    let s = Server::start("ctxstate", &["--min-idle", "0"]);
    let sb = create_sandbox(&s, 256);
    let ctx = create_context(&s, &sb, json!({"language": "python"}));

    let (st, r) = cell(&s, &sb, &ctx, "x = 41");
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(value(&r), None, "an assignment has no value: {r}");
    let (_, r) = cell(&s, &sb, &ctx, "x + 1");
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(value(&r).as_deref(), Some("42"), "{r}");
    assert_eq!(r["context"], ctx.as_str());
    assert_eq!(r["context_alive"], true);

    let (_, r) = cell(&s, &sb, &ctx, "import math\nprint('imported')");
    assert_eq!(r["stdout"], "imported\n", "{r}");
    let (_, r) = cell(&s, &sb, &ctx, "math.sqrt(x + 8)");
    assert_eq!(
        value(&r).as_deref(),
        Some("7.0"),
        "the import persists: {r}"
    );

    // Output of child processes is the cell's too, and display() works.
    let (_, r) = cell(
        &s,
        &sb,
        &ctx,
        "import subprocess\nsubprocess.run(['echo', 'from a child'])\ndisplay({'a': 1})",
    );
    assert_eq!(r["stdout"], "from a child\n", "{r}");
    assert_eq!(r["results"][0]["kind"], "display", "{r}");
    assert_eq!(r["results"][0]["data"]["text/plain"], "{'a': 1}", "{r}");

    // An exception is the cell's error; the context lives on.
    let (_, r) = cell(&s, &sb, &ctx, "y = 1\n1 / 0");
    assert_eq!(r["outcome"], "error", "{r}");
    assert_eq!(r["error"]["name"], "ZeroDivisionError", "{r}");
    assert!(
        r["stderr"].as_str().unwrap().contains("<cell"),
        "the traceback names the cell: {r}"
    );
    assert_eq!(r["context_alive"], true);
    let (_, r) = cell(&s, &sb, &ctx, "(x, y)");
    assert_eq!(value(&r).as_deref(), Some("(41, 1)"), "{r}");

    // A plain exec beside the context still starts a fresh interpreter.
    let (_, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{sb}/exec"),
        &json!({"code": "print('x' in globals())"}),
    );
    assert_eq!(r["stdout"], "False\n", "{r}");

    // The SSE variant streams the cell's output, then its result.
    let st = s.open(
        "POST",
        &format!("/v1/sandboxes/{sb}/exec"),
        &[("Accept", "text/event-stream")],
        Some(
            json!({"context": ctx, "code": "print('streamed')\ndisplay('shown')\nx * 2"})
                .to_string()
                .as_bytes(),
        ),
    );
    assert_eq!(st.status, 200);
    let evs: Vec<_> = sse::events(st.body).collect();
    assert_eq!(evs.first().map(|e| e.event.as_str()), Some("stdout"));
    let last = evs.last().expect("events");
    assert_eq!(last.event, "exit");
    let r: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(value(&r).as_deref(), Some("82"), "{r}");
    let shown = evs
        .iter()
        .find(|e| e.event == "display")
        .expect("a display event before the exit");
    let d: Value = serde_json::from_str(&shown.data).unwrap();
    assert_eq!(d["data"]["text/plain"], "'shown'", "{d}");

    let (_, list) = s.json("GET", &format!("/v1/sandboxes/{sb}/contexts"), &Value::Null);
    assert_eq!(list["contexts"][0]["id"], ctx.as_str(), "{list}");

    // Delete: the context is gone, the sandbox stays.
    let r = s.request(
        "DELETE",
        &format!("/v1/sandboxes/{sb}/contexts/{ctx}"),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let (st, r) = cell(&s, &sb, &ctx, "x");
    assert_eq!(st, 404, "{r}");
    assert_eq!(
        s.request("DELETE", &format!("/v1/sandboxes/{sb}"), None)
            .status,
        204
    );
}

#[test]
fn an_interrupt_or_a_deadline_stops_the_cell_and_keeps_the_state() {
    let s = Server::start("ctxintr", &["--min-idle", "0"]);
    let sb = create_sandbox(&s, 256);
    let ctx = create_context(&s, &sb, json!({}));
    let (_, r) = cell(&s, &sb, &ctx, "x = 41");
    assert_eq!(r["outcome"], "ok", "{r}");

    // A cell that never ends, interrupted from another request.
    let addr = s.addr;
    let path = format!("/v1/sandboxes/{sb}/exec");
    let body =
        json!({"context": ctx, "code": "while True: pass", "limits": {"timeout_ms": 600000}});
    let spin = std::thread::spawn(move || post_json(addr, &path, &body));
    let mut running = false;
    for _ in 0..600 {
        if state(&s, &sb, &ctx) == "running" {
            running = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(running, "the spinning cell never showed as running");
    // A second cell while one runs is refused, not queued.
    let (st, r) = cell(&s, &sb, &ctx, "x");
    assert_eq!(st, 409, "{r}");
    assert_eq!(r["error"]["code"], "context_busy", "{r}");
    let (st, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{sb}/contexts/{ctx}/interrupt"),
        &json!({}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["interrupted"], true, "{r}");
    let (st, body) = spin.join().unwrap();
    assert_eq!(st, 200, "{body}");
    let r: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["outcome"], "killed", "{r}");
    assert_eq!(r["error"]["name"], "KeyboardInterrupt", "{r}");
    assert_eq!(r["context_alive"], true, "{r}");
    let (_, r) = cell(&s, &sb, &ctx, "x");
    assert_eq!(
        value(&r).as_deref(),
        Some("41"),
        "x survives the interrupt: {r}"
    );

    // The cell's deadline interrupts it the same way.
    let (_, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{sb}/exec"),
        &json!({"context": ctx, "code": "x = 7\nwhile True: pass", "limits": {"timeout_ms": 300}}),
    );
    assert_eq!(r["outcome"], "timeout", "{r}");
    assert_eq!(r["context_alive"], true, "{r}");
    let (_, r) = cell(&s, &sb, &ctx, "x");
    assert_eq!(value(&r).as_deref(), Some("7"), "{r}");

    // The output cap interrupts a flood; what fitted is kept.
    let (_, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{sb}/exec"),
        &json!({"context": ctx, "code": "while True: print('y' * 1000)", "limits": {"output_bytes": 10000}}),
    );
    assert_eq!(r["outcome"], "killed", "{r}");
    assert_eq!(r["stdout_truncated"], true, "{r}");
    assert_eq!(r["stdout"].as_str().unwrap().len(), 10000, "{r}");
    assert_eq!(r["context_alive"], true, "{r}");
}

#[test]
fn an_oom_kills_the_context_and_the_next_exec_says_so() {
    let s = Server::start("ctxoom", &["--min-idle", "0"]);
    let sb = create_sandbox(&s, 96);
    let ctx = create_context(&s, &sb, json!({"language": "py"}));
    let (_, r) = cell(&s, &sb, &ctx, "x = 41");
    assert_eq!(r["outcome"], "ok", "{r}");
    let (st, r) = cell(
        &s,
        &sb,
        &ctx,
        "b = []\nwhile True: b.append(bytearray(1 << 20))",
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["outcome"], "oom", "{r}");
    assert_eq!(r["context_alive"], false, "{r}");
    assert_eq!(state(&s, &sb, &ctx), "dead");
    let (st, r) = cell(&s, &sb, &ctx, "x");
    assert_eq!(st, 409, "{r}");
    assert_eq!(r["error"]["code"], "context_dead", "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("out of memory") && msg.contains("restart"),
        "{msg}"
    );

    // Restart: same id, fresh interpreter, state gone.
    let (st, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{sb}/contexts/{ctx}/restart"),
        &json!({}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["state"], "idle", "{r}");
    let (_, r) = cell(&s, &sb, &ctx, "x");
    assert_eq!(r["outcome"], "error", "{r}");
    assert_eq!(r["error"]["name"], "NameError", "{r}");
    let (_, r) = cell(&s, &sb, &ctx, "x = 1\nx");
    assert_eq!(value(&r).as_deref(), Some("1"), "{r}");
}

#[test]
fn bad_context_requests_name_the_field() {
    let s = Server::start("ctxbad", &["--min-idle", "0"]);
    let sb = create_sandbox(&s, 128);
    let (st, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{sb}/contexts"),
        &json!({"language": "bash"}),
    );
    assert_eq!(st, 400, "{r}");
    assert_eq!(r["error"]["field"], "language", "{r}");
    let (st, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{sb}/contexts"),
        &json!({"cwd": "../etc"}),
    );
    assert_eq!(st, 400, "{r}");
    assert_eq!(r["error"]["field"], "cwd", "{r}");
    let (st, r) = s.json("POST", "/v1/sandboxes/nope/contexts", &json!({}));
    assert_eq!(st, 404, "{r}");
    let ctx = create_context(&s, &sb, json!({}));
    let (st, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{sb}/exec"),
        &json!({"context": ctx, "code": "1", "stdin": "x"}),
    );
    assert_eq!(st, 400, "{r}");
    assert_eq!(r["error"]["field"], "stdin", "{r}");
    let (st, r) = cell(&s, &sb, "ctx-missing", "1");
    assert_eq!(st, 404, "{r}");
    // A context's cwd is where its cells run.
    let r = s.request(
        "PUT",
        &format!("/v1/sandboxes/{sb}/files/data/n.txt"),
        Some(b"5"),
    );
    assert_eq!(r.status, 204);
    let ctx = create_context(&s, &sb, json!({"cwd": "data"}));
    let (_, r) = cell(&s, &sb, &ctx, "int(open('n.txt').read()) * 2");
    assert_eq!(value(&r).as_deref(), Some("10"), "{r}");
}

/// Debian's python3-matplotlib (installed by scripts/test.sh) is visible in
/// the sandbox; a figure a cell leaves open comes back as a PNG display,
/// and a figure as the trailing expression as a PNG result.
#[test]
fn a_matplotlib_figure_comes_back_as_a_png() {
    let s = Server::start("ctxpng", &["--min-idle", "0"]);
    let sb = create_sandbox(&s, 512);
    let ctx = create_context(&s, &sb, json!({}));
    let (_, r) = cell(
        &s,
        &sb,
        &ctx,
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')",
    );
    assert_eq!(r["outcome"], "ok", "{r}");
    let png = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|d| d["data"]["image/png"].as_str())
        .unwrap_or_else(|| panic!("no image/png among the results: {r}"));
    // base64 of the PNG signature \x89PNG\r\n\x1a\n
    assert!(
        png.starts_with("iVBORw0KGgo"),
        "{}",
        &png[..png.len().min(40)]
    );
    assert!(png.len() > 1000, "a real image, not a stub");
    let (_, r) = cell(
        &s,
        &sb,
        &ctx,
        "fig, ax = plt.subplots()\nax.bar(['a', 'b'], [3, 5])\nfig",
    );
    let result = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["kind"] == "result")
        .unwrap_or_else(|| panic!("no result: {r}"));
    assert!(
        result["data"]["image/png"]
            .as_str()
            .is_some_and(|p| p.starts_with("iVBORw0KGgo")),
        "{r}"
    );
    assert!(result["data"]["text/plain"]
        .as_str()
        .unwrap()
        .contains("Figure"));
    assert_eq!(
        r["results"].as_array().unwrap().len(),
        1,
        "the figure comes back once: {r}"
    );
}

/// Node contexts: declarations and required modules persist, a cell's
/// completion value comes back (a promise awaited), and an interrupt
/// during a busy loop keeps the state.
#[test]
fn a_node_context_keeps_state_and_survives_an_interrupt() {
    let s = Server::start("ctxnode", &["--min-idle", "0"]);
    let sb = create_sandbox(&s, 256);
    let ctx = create_context(&s, &sb, json!({"language": "node"}));
    let (_, r) = cell(&s, &sb, &ctx, "var x = 41; const fs = require('fs');");
    assert_eq!(r["outcome"], "ok", "{r}");
    let (_, r) = cell(&s, &sb, &ctx, "console.log('hi'); x + 1");
    assert_eq!(r["stdout"], "hi\n", "{r}");
    assert_eq!(value(&r).as_deref(), Some("42"), "{r}");
    let (_, r) = cell(&s, &sb, &ctx, "typeof fs.readFileSync");
    assert_eq!(value(&r).as_deref(), Some("'function'"), "{r}");
    let (_, r) = cell(
        &s,
        &sb,
        &ctx,
        "new Promise(r => setTimeout(() => r(x * 2), 10))",
    );
    assert_eq!(value(&r).as_deref(), Some("82"), "{r}");
    let (_, r) = cell(&s, &sb, &ctx, "null.y");
    assert_eq!(r["outcome"], "error", "{r}");
    assert_eq!(r["error"]["name"], "TypeError", "{r}");
    // A child process writing to the driver's stdout itself is output.
    let (_, r) = cell(
        &s,
        &sb,
        &ctx,
        "require('child_process').execSync('echo from-a-child', {stdio: 'inherit'}); 1",
    );
    assert!(
        r["stdout"].as_str().unwrap().contains("from-a-child"),
        "{r}"
    );
    assert_eq!(r["context_alive"], true, "{r}");
    let (_, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{sb}/exec"),
        &json!({"context": ctx, "code": "x = 7; while (true) {}", "limits": {"timeout_ms": 300}}),
    );
    assert_eq!(r["outcome"], "timeout", "{r}");
    assert_eq!(r["context_alive"], true, "{r}");
    let (_, r) = cell(&s, &sb, &ctx, "x");
    assert_eq!(value(&r).as_deref(), Some("7"), "{r}");
}

/// Output written between cells (a background thread still printing after
/// its cell ended) is kept up to a bound for the next cell and the rest
/// dropped with a note: nobody reads the channel between cells, and
/// unbounded it would stall the sandbox's connection to its agent.
#[test]
fn output_between_cells_is_bounded_and_the_sandbox_stays_responsive() {
    let s = Server::start("ctxbetween", &["--min-idle", "0"]);
    let sb = create_sandbox(&s, 256);
    let ctx = create_context(&s, &sb, json!({}));
    let (_, r) = cell(
        &s,
        &sb,
        &ctx,
        "import threading, time\ndone = threading.Event()\ndef spam():\n    time.sleep(0.3)\n    for i in range(300000): print('line', i)\n    done.set()\nthreading.Thread(target=spam, daemon=True).start()",
    );
    assert_eq!(r["outcome"], "ok", "{}", r["message"]);
    // While the thread prints (about 3 MB) with no cell running, the
    // sandbox still answers.
    let mut finished = false;
    for _ in 0..300 {
        std::thread::sleep(Duration::from_millis(200));
        let put = s.request(
            "PUT",
            &format!("/v1/sandboxes/{sb}/files/probe.txt"),
            Some(b"p"),
        );
        assert_eq!(put.status, 204, "{}", put.text());
        let got = s.request("GET", &format!("/v1/sandboxes/{sb}/files/probe.txt"), None);
        assert_eq!(got.body, b"p");
        if state(&s, &sb, &ctx) != "idle" {
            continue;
        }
        // The check itself is a cell: output of the thread during it is
        // forwarded (and may pass its cap), so only its value counts.
        let (st, r) = cell(&s, &sb, &ctx, "done.is_set()");
        assert_eq!(st, 200);
        assert_eq!(r["context_alive"], true, "{}", r["message"]);
        if value(&r).as_deref() == Some("True") {
            finished = true;
            break;
        }
    }
    assert!(finished, "the printing thread never finished");
    let (_, r) = cell(&s, &sb, &ctx, "'alive'");
    assert_eq!(value(&r).as_deref(), Some("'alive'"), "{}", r["message"]);
    assert_eq!(r["outcome"], "ok", "{}", r["message"]);
}

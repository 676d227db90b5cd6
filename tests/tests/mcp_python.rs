//! The MCP server against the official MCP Python SDK (`mcp` on PyPI, in
//! the environment `scripts/pyenv.sh` makes; `KILN_PYTHON` names its
//! python): over Streamable HTTP at `/mcp` of a real `kiln serve` with a
//! bearer token, and over stdio through `kiln mcp`. The checks themselves
//! are in `tests/python/mcp_check.py`: tools listed with schemas, Python,
//! Node and Bash run, a sandbox made, written, exec'd in (also statefully),
//! read back and deleted, bad arguments as tool errors, long output behind
//! a resource, and one session refused another's sandbox. Then the
//! sandbox a session left behind is gone with the session.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use kiln_tests::server::Server;
use serde_json::Value;

/// The python with the `mcp` SDK; a missing one fails the test (it must
/// run, not skip).
fn python() -> PathBuf {
    let p = std::env::var_os("KILN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python")
        });
    assert!(
        p.exists(),
        "no Python environment at {}: run `bash scripts/pyenv.sh` (scripts/test.sh does) or set KILN_PYTHON",
        p.display()
    );
    p
}

fn check(mode: &str) {
    let mut s = Server::start(
        &format!("mcp{mode}"),
        &["--min-idle", "0", "--token", "sesame"],
    );
    s.token = Some("sesame".into());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/mcp_check.py");
    let out = Command::new(python())
        .arg(script)
        .arg(mode)
        .arg(s.url(""))
        .arg("sesame")
        .arg(kiln_tests::bin("kiln"))
        .output()
        .expect("running mcp_check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mcp_check.py {mode} failed\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = stdout
        .lines()
        .find_map(|l| l.strip_prefix("left "))
        .expect("the script names the sandbox it left")
        .to_owned();
    // The session's end deletes the sandbox it left behind.
    let mut gone = false;
    for _ in 0..200 {
        let (st, _) = s.json("GET", &format!("/v1/sandboxes/{left}"), &Value::Null);
        if st == 404 {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gone, "sandbox {left} outlived its MCP session");
    // Without the token, /mcp is refused like the rest of the API.
    let r = kiln_tests::server::post_json(s.addr, "/mcp", &serde_json::json!({}));
    assert_eq!(r.0, 401, "{}", r.1);
}

#[test]
fn the_python_sdk_uses_every_tool_over_streamable_http() {
    check("http");
}

#[test]
fn the_python_sdk_uses_every_tool_over_stdio_through_kiln_mcp() {
    check("stdio");
}

//! The Piston-compatible endpoints, driven with requests and expectations
//! taken from Piston's v2 API documentation.

use kiln_tests::server::Server;
use serde_json::{json, Value};

#[test]
fn runtimes_are_listed_in_pistons_shape() {
    let s = Server::start("pistonrt", &["--min-idle", "0"]);
    let (st, v) = s.json("GET", "/api/v2/runtimes", &Value::Null);
    assert_eq!(st, 200);
    let a = v.as_array().unwrap();
    let py = a
        .iter()
        .find(|r| r["language"] == "python")
        .expect("python listed");
    assert!(py["version"].is_string());
    assert!(py["aliases"].as_array().unwrap().contains(&json!("py")));
    for r in a {
        assert!(
            r["language"].is_string() && r["version"].is_string() && r["aliases"].is_array(),
            "{r}"
        );
    }
}

#[test]
fn execute_answers_like_piston() {
    let s = Server::start("pistonexec", &["--min-idle", "0"]);
    // The example request of Piston's README, adapted to our runtimes.
    let (st, v) = s.json(
        "POST",
        "/api/v2/execute",
        &json!({
            "language": "py",
            "version": "3.10.0",
            "files": [{"name": "my_cool_code.py", "content": "import sys\nprint(sys.argv[1:])\nprint(input())\nprint('err', file=sys.stderr)"}],
            "stdin": "from stdin",
            "args": ["1", "2", "3"],
            "compile_timeout": 10000,
            "run_timeout": 3000,
            "compile_memory_limit": -1,
            "run_memory_limit": -1
        }),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["language"], "python");
    assert!(v["version"].is_string());
    assert!(v.get("compile").is_none());
    let run = &v["run"];
    assert_eq!(run["stdout"], "['1', '2', '3']\nfrom stdin\n");
    assert_eq!(run["stderr"], "err\n");
    assert_eq!(run["output"], "['1', '2', '3']\nfrom stdin\nerr\n");
    assert_eq!(run["code"], 0);
    assert_eq!(run["signal"], Value::Null);

    // A file without a name, version "*", a non-zero exit.
    let (_, v) = s.json(
        "POST",
        "/api/v2/execute",
        &json!({"language": "bash", "version": "*", "files": [{"content": "echo hi; exit 3"}]}),
    );
    assert_eq!(v["run"]["stdout"], "hi\n");
    assert_eq!(v["run"]["code"], 3);

    // Several files: the first is run, the others are beside it.
    let (_, v) = s.json(
        "POST",
        "/api/v2/execute",
        &json!({"language": "python", "version": "3", "files": [
            {"name": "main.py", "content": "import helper\nprint(helper.X)"},
            {"name": "helper.py", "content": "X = 'from helper'"}
        ]}),
    );
    assert_eq!(v["run"]["stdout"], "from helper\n", "{v}");

    // A timeout is a SIGKILL, as in Piston.
    let (_, v) = s.json(
        "POST",
        "/api/v2/execute",
        &json!({"language": "python", "version": "*", "files": [{"content": "import time\ntime.sleep(10)"}], "run_timeout": 300}),
    );
    assert_eq!(v["run"]["signal"], "SIGKILL", "{v}");
    assert_eq!(v["run"]["code"], Value::Null);
}

#[test]
fn execute_errors_are_pistons_400_with_a_message() {
    let s = Server::start("pistonerr", &["--min-idle", "0"]);
    let (st, v) = s.json(
        "POST",
        "/api/v2/execute",
        &json!({"language": "python", "version": "2.7", "files": [{"content": "print 1"}]}),
    );
    assert_eq!(st, 400);
    assert_eq!(v["message"], "python-2.7 runtime is unknown");
    let (st, v) = s.json(
        "POST",
        "/api/v2/execute",
        &json!({"language": "brainfuck", "version": "*", "files": [{"content": "+"}]}),
    );
    assert_eq!(st, 400);
    assert_eq!(v["message"], "brainfuck-* runtime is unknown");
    let r = s.request("POST", "/api/v2/execute", Some(b"{not json"));
    assert_eq!(r.status, 400);
    assert!(r.json()["message"].is_string());
    let (st, v) = s.json(
        "POST",
        "/api/v2/execute",
        &json!({"language": "python", "version": "*", "files": [{"content": "1"}], "run_timeout": -1}),
    );
    assert_eq!(st, 400);
    assert!(
        v["message"].as_str().unwrap().contains("run_timeout"),
        "{v}"
    );
}

//! The job flags of `kiln run` and `kiln submit` as a user meets them:
//! given with `--job FILE` they override the document's fields (a saved job
//! re-run with a shorter timeout ends as a timeout), and a limit typed
//! wrong (a bare number, zero, a huge value, a minus sign, a unit misspelt)
//! is refused naming the flag and the text typed, with a form that would be
//! right, never an API field the user did not type. Real jails (needs
//! root) and a real `kiln serve` for `kiln submit`.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use kiln_protocol::Outcome;
use kiln_tests::server::Server;
use kiln_tests::{bin, Scope};

/// Writes a job document into the scope's directory.
fn job_file(s: &Scope, name: &str, doc: serde_json::Value) -> PathBuf {
    let p = s.state_dir.join(name);
    std::fs::write(&p, doc.to_string()).unwrap();
    p
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_timeout_flag_overrides_the_job_files_timeout() {
    let s = Scope::new("flag-timeout");
    let job = job_file(
        &s,
        "slow.json",
        serde_json::json!({
            "runtime": "python",
            "code": "import time\ntime.sleep(3)\nprint('finished')",
            "limits": {"timeout_ms": 10000},
        }),
    );
    let job = job.to_str().unwrap();
    // The file's own 10 s let it finish...
    let (r, code) = s.run_json(&["--job", job]);
    assert_eq!((r.outcome, code), (Outcome::Ok, 0), "{r:?}");
    assert_eq!(r.stdout, "finished\n");
    // ...the flag's 1 s does not, whichever side of --job it is on.
    for args in [
        ["--timeout", "1s", "--job", job],
        ["--job", job, "--timeout", "1s"],
    ] {
        let (r, code) = s.run_json(&args);
        assert_eq!(r.outcome, Outcome::Timeout, "{args:?}: {r:?}");
        assert_eq!(code, 124, "{args:?}");
        assert_eq!(r.stdout, "", "{args:?}");
    }
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
}

#[test]
fn a_runtime_flag_overrides_the_job_files_runtime() {
    let s = Scope::new("flag-runtime");
    let job = job_file(
        &s,
        "job.json",
        serde_json::json!({"runtime": "python", "code": "echo from-bash"}),
    );
    let job = job.to_str().unwrap();
    let (r, _) = s.run_json(&["--job", job]);
    assert_eq!(r.outcome, Outcome::Error, "python cannot run shell: {r:?}");
    assert!(r.stderr.contains("SyntaxError"), "{}", r.stderr);
    let (r, code) = s.run_json(&["--job", job, "--runtime", "bash"]);
    assert_eq!((r.outcome, code), (Outcome::Ok, 0), "{r:?}");
    assert_eq!(r.stdout, "from-bash\n");
}

#[test]
fn env_file_and_args_flags_add_to_or_replace_the_job_files() {
    let s = Scope::new("flag-env-files");
    let data = s.state_dir.join("data.txt");
    std::fs::write(&data, "from the flag").unwrap();
    let job = job_file(
        &s,
        "job.json",
        serde_json::json!({
            "runtime": "python",
            "code": "import os, sys\nprint(sys.argv[1:], os.environ['KEEP'], os.environ['CHANGE'], open('data.txt').read(), open('other.txt').read())",
            "files": [
                {"path": "data.txt", "content": "from the file"},
                {"path": "other.txt", "content": "kept"},
            ],
            "env": {"KEEP": "file-env", "CHANGE": "file-env"},
            "args": ["file-arg"],
        }),
    );
    let file_flag = format!("data.txt={}", data.display());
    let (r, _) = s.run_json(&[
        "--job",
        job.to_str().unwrap(),
        "-e",
        "CHANGE=flag-env",
        "--file",
        &file_flag,
        "--",
        "flag-arg",
    ]);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(
        r.stdout, "['flag-arg'] file-env flag-env from the flag kept\n",
        "{r:?}"
    );
}

#[test]
fn limit_flags_override_the_job_files_limits() {
    let s = Scope::new("flag-limits");
    let job = job_file(
        &s,
        "job.json",
        serde_json::json!({
            "runtime": "python",
            "code": "x = bytearray(128 << 20)\nprint('x' * 100)",
            "limits": {"memory_mb": 512, "output_bytes": 1048576},
        }),
    );
    let job = job.to_str().unwrap();
    let (r, _) = s.run_json(&["--job", job]);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.stdout.len(), 101);

    // Units in any case are one rule: 64m is 64M.
    let (r, code) = s.run_json(&["--job", job, "--memory", "64m"]);
    assert_eq!((r.outcome, code), (Outcome::Oom, 137), "{r:?}");

    let (r, _) = s.run_json(&["--job", job, "--output-limit", "10B"]);
    assert!(r.stdout_truncated, "{r:?}");
    assert_eq!(r.stdout.len(), 10, "{r:?}");
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
}

/// `(flags, text the message must contain)`: each a mistake a user makes.
const MISTAKES: &[(&[&str], &str)] = &[
    (&["--memory", "64"], "did you mean 64M?"),
    (&["--disk", "64"], "did you mean 64M?"),
    (&["--timeout", "500"], "did you mean 500ms or 500s?"),
    (&["--output-limit", "4096"], "did you mean 4096B or 4096K?"),
    (
        &["--timeout", "0s"],
        "below the minimum (allowed 1ms to 15m)",
    ),
    (
        &["--memory", "0M"],
        "below the minimum (allowed 16M to 16G)",
    ),
    (&["--disk", "0"], "e.g. 64M (allowed 1M to 16G)"),
    (&["--pids", "0"], "below the minimum (allowed 4 to 4096)"),
    (&["--cpus", "0"], "below the minimum (allowed 0.01 to 64)"),
    (
        &["--output-limit", "0B"],
        "below the minimum (allowed 1B to 64M)",
    ),
    (
        &["--memory", "64G"],
        "above the maximum (allowed 16M to 16G)",
    ),
    (
        &["--timeout", "10h"],
        "above the maximum (allowed 1ms to 15m)",
    ),
    (
        &["--pids", "100000"],
        "above the maximum (allowed 4 to 4096)",
    ),
    (
        &["--memory", "99999999999999999999999999999G"],
        "too large (allowed 16M to 16G)",
    ),
    (
        &["--memory", "-64M"],
        "cannot be negative; did you mean 64M?",
    ),
    (
        &["--timeout", "-1s"],
        "cannot be negative; did you mean 1s?",
    ),
    (&["--pids", "-1"], "cannot be negative; e.g. 64"),
    (&["--cpus", "-2"], "cannot be negative; did you mean 2?"),
    (&["--timeout", "10sec"], "did you mean 10s?"),
    (&["--memory", "64X"], "did you mean 64M?"),
    (&["--pids", "10k"], "a count is a plain number"),
    (&["--cpus", "500m"], "a number of CPUs is a plain number"),
    (&["--memory", "64.5M"], "did you mean 64M or 65M?"),
    (&["--timeout", "1.5ms"], "did you mean 1ms or 2ms?"),
    (&["--timeout", "soon"], "not a duration; e.g. 10s"),
];

#[test]
fn limit_mistakes_are_refused_naming_the_flag_and_what_was_typed() {
    let s = Scope::new("flag-mistakes");
    let job = job_file(
        &s,
        "job.json",
        serde_json::json!({"runtime": "python", "code": "print(1)"}),
    );
    for (flags, advice) in MISTAKES {
        let (flag, typed) = (flags[0], flags[1]);
        let quoted = format!("{flag} {typed:?}");
        let check = |how: &str, code: i32, msg: &str| {
            assert_eq!(code, 2, "{how} {flags:?}: {msg}");
            assert!(
                msg.contains(&quoted),
                "{how}: {msg:?} should quote {quoted}"
            );
            assert!(msg.contains(advice), "{how}: {msg:?} should say {advice:?}");
            assert!(
                !msg.contains("limits."),
                "{how}: {msg:?} names an API field"
            );
        };
        let mut args = vec!["--runtime", "python", "-c", "print(1)"];
        args.extend_from_slice(flags);
        let out = s.run(&args, &[]);
        check("text", out.status.code().unwrap_or(-1), &stderr(&out));
        assert!(out.stdout.is_empty(), "{flags:?}: the job ran");

        let (r, code) = s.run_json(&args);
        assert_eq!(r.outcome, Outcome::Rejected, "{flags:?}");
        check("json", code, &r.message.unwrap_or_default());

        let mut args = vec!["--job", job.to_str().unwrap()];
        args.extend_from_slice(flags);
        let (r, code) = s.run_json(&args);
        check("--job", code, &r.message.unwrap_or_default());
    }
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
}

#[test]
fn the_issues_memory_64_names_the_flag_and_suggests_64m() {
    let s = Scope::new("flag-memory-64");
    let out = s.run(
        &["--runtime", "python", "-c", "print(1)", "--memory", "64"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let msg = stderr(&out);
    assert!(msg.contains("--memory \"64\""), "{msg}");
    assert!(msg.contains("64M"), "{msg}");
    assert!(!msg.contains("memory_mb"), "{msg}");
}

fn submit(server: &str, args: &[&str]) -> Output {
    Command::new(bin("kiln"))
        .arg("submit")
        .arg("--server")
        .arg(server)
        .args(args)
        .env_remove("KILN_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("running kiln submit")
}

#[test]
fn kiln_submit_refuses_limit_mistakes_before_sending() {
    // Nothing listens on the discard port: a mistake must be found before
    // any connection is tried (which would fail with status 70).
    for (flags, advice) in MISTAKES {
        let mut args = vec!["--runtime", "python", "-c", "print(1)"];
        args.extend_from_slice(flags);
        let out = submit("http://127.0.0.1:9", &args);
        let msg = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {msg}");
        assert!(msg.contains(flags[0]) && msg.contains(advice), "{msg}");
        assert!(!msg.contains("limits."), "{msg}");

        args.push("--json");
        let out = submit("http://127.0.0.1:9", &args);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["outcome"], "rejected", "{flags:?}");
        assert!(v["message"].as_str().unwrap_or_default().contains(advice));
    }
}

#[test]
fn kiln_submit_flags_override_the_job_file() {
    let server = Server::start("submit-flags", &["--min-idle", "0"]);
    let job = job_file(
        &server.scope,
        "slow.json",
        serde_json::json!({
            "runtime": "python",
            "code": "import time\ntime.sleep(3)\nprint('finished')",
            "limits": {"timeout_ms": 10000},
        }),
    );
    let url = server.url("");
    let out = submit(&url, &["--job", job.to_str().unwrap(), "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(out.stdout.is_empty());

    let out = submit(
        &url,
        &[
            "--job",
            job.to_str().unwrap(),
            "--runtime",
            "bash",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"], "error", "bash cannot run python: {v}");
    assert!(v["stderr"].as_str().unwrap_or_default().contains("import"));
}

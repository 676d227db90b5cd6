//! `kiln run` end to end with the jail backend: Python, Node.js and Bash
//! jobs with output, exit codes, stdin, args, env and several files, and bad
//! input rejected with a message that names what was wrong. Real
//! namespaces, cgroups and processes; needs root.

use std::io::Write;
use std::process::Stdio;

use kiln_protocol::Outcome;
use kiln_tests::Scope;

#[test]
fn python_job_prints_and_exits_zero() {
    let s = Scope::new("py-ok");
    let (r, code) = s.run_json(&[
        "--runtime",
        "python",
        "-c",
        "import sys; print('hi'); print('err', file=sys.stderr)",
    ]);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.stdout, "hi\n");
    assert_eq!(r.stderr, "err\n");
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(code, 0);
    assert!(
        r.timings.total_ms > 0.0 && r.timings.run_ms > 0.0,
        "{:?}",
        r.timings
    );
}

#[test]
fn exit_codes_are_reported_and_mirrored() {
    let s = Scope::new("exit-codes");
    for (rt, code) in [
        ("python", "import sys; sys.exit(3)"),
        ("node", "process.exit(3)"),
        ("bash", "exit 3"),
    ] {
        let (r, status) = s.run_json(&["--runtime", rt, "-c", code]);
        assert_eq!(r.outcome, Outcome::Error, "{rt}: {r:?}");
        assert_eq!(r.exit_code, Some(3), "{rt}");
        assert_eq!(status, 3, "{rt}: kiln's exit status mirrors the job's");
    }
    let (r, _) = s.run_json(&["--runtime", "python", "-c", "raise ValueError('boom')"]);
    assert_eq!(r.outcome, Outcome::Error);
    assert!(r.stderr.contains("ValueError: boom"), "{}", r.stderr);
}

#[test]
fn args_and_env_reach_every_runtime() {
    let s = Scope::new("args-env");
    for (rt, code) in [
        (
            "python",
            "import sys, os; print(sys.argv[1:], os.environ['GREETING'])",
        ),
        (
            "node",
            "console.log(process.argv.slice(2), process.env.GREETING)",
        ),
        ("bash", "echo \"$1 $2 $GREETING\""),
    ] {
        let (r, _) = s.run_json(&[
            "--runtime",
            rt,
            "-c",
            code,
            "-e",
            "GREETING=hello",
            "--",
            "a b",
            "c",
        ]);
        assert_eq!(r.outcome, Outcome::Ok, "{rt}: {r:?}");
        let out = r.stdout.trim();
        assert!(
            out.contains("a b") && out.contains('c') && out.contains("hello"),
            "{rt}: {out}"
        );
    }
}

#[test]
fn stdin_reaches_every_runtime() {
    let s = Scope::new("stdin");
    for (rt, code) in [
        ("python", "import sys; print(sys.stdin.read().upper(), end='')"),
        ("node", "let d='';process.stdin.on('data',c=>d+=c).on('end',()=>process.stdout.write(d.toUpperCase()))"),
        ("bash", "tr a-z A-Z"),
    ] {
        let mut child = s
            .command(&["--runtime", rt, "-c", code], &["--json"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"some input\n").unwrap();
        let out = child.wait_with_output().unwrap();
        let r: kiln_protocol::JobResult = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r.stdout, "SOME INPUT\n", "{rt}: {r:?}");
    }
}

#[test]
fn multi_file_jobs_import_their_siblings() {
    let s = Scope::new("multi-file");
    let dir = s.state_dir.join("src");
    std::fs::create_dir_all(&dir).unwrap();
    let w = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p.to_string_lossy().into_owned()
    };
    let main_py = w("main.py", "import helper\nprint(helper.twice(21))\n");
    let helper = w("helper.py", "def twice(x):\n    return 2 * x\n");
    let (r, _) = s.run_json(&[&main_py, "--file", &helper]);
    assert_eq!(
        (r.outcome, r.stdout.as_str()),
        (Outcome::Ok, "42\n"),
        "{r:?}"
    );

    let main_js = w(
        "main.js",
        "const lib = require('./lib/math.js');\nconsole.log(lib.add(40, 2));\n",
    );
    let lib = w("math.js", "exports.add = (a, b) => a + b;\n");
    let (r, _) = s.run_json(&[&main_js, "--file", &format!("lib/math.js={lib}")]);
    assert_eq!(
        (r.outcome, r.stdout.as_str()),
        (Outcome::Ok, "42\n"),
        "{r:?}"
    );

    let main_sh = w("main.sh", "source ./vars.sh\necho \"$ANSWER\"\n");
    let vars = w("vars.sh", "ANSWER=42\n");
    let (r, _) = s.run_json(&[&main_sh, "--file", &vars]);
    assert_eq!(
        (r.outcome, r.stdout.as_str()),
        (Outcome::Ok, "42\n"),
        "{r:?}"
    );
}

#[test]
fn a_json_job_runs_as_the_api_would() {
    let s = Scope::new("json-job");
    let job = s.state_dir.join("job.json");
    std::fs::write(
        &job,
        r#"{"id":"job-42","runtime":"py","files":[{"path":"m.py","content":"import sys;print(open('data.bin','rb').read())"},
            {"path":"data.bin","content":"AAEC","encoding":"base64"}],"entrypoint":"m.py","limits":{"timeout_ms":5000}}"#,
    )
    .unwrap();
    let (r, _) = s.run_json(&["--job", job.to_str().unwrap()]);
    assert_eq!(r.id.as_str(), "job-42");
    assert_eq!(r.stdout, "b'\\x00\\x01\\x02'\n", "{r:?}");
}

#[test]
fn bad_input_is_rejected_naming_what_was_wrong() {
    let s = Scope::new("bad-input");
    let job = s.state_dir.join("bad.json");
    let cases: &[(&str, Vec<&str>, &str)] = &[
        (
            "unknown runtime",
            vec!["--runtime", "cobol", "-c", "x"],
            "cobol",
        ),
        (
            "memory too small",
            vec!["--runtime", "python", "-c", "x", "--memory", "1M"],
            "--memory",
        ),
        (
            "timeout too long",
            vec!["--runtime", "python", "-c", "x", "--timeout", "10h"],
            "--timeout",
        ),
        (
            "bad duration",
            vec!["--runtime", "python", "-c", "x", "--timeout", "soon"],
            "--timeout",
        ),
        (
            "bad env",
            vec!["--runtime", "python", "-c", "x", "-e", "NOEQUALS"],
            "--env",
        ),
    ];
    for (what, args, needle) in cases {
        let (r, code) = s.run_json(args);
        assert_eq!(r.outcome, Outcome::Rejected, "{what}: {r:?}");
        assert_eq!(code, 2, "{what}");
        let msg = r.message.unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{what}: {msg:?} should name {needle:?}"
        );
    }
    for (body, needle) in [
        ("{not json", "body"),
        (
            r#"{"runtime":"python","code":"x","limits":{"pids":-5}}"#,
            "limits.pids",
        ),
        (
            r#"{"runtime":"python","code":"x","surprise":1}"#,
            "surprise",
        ),
        (
            r#"{"runtime":"python","files":[{"path":"../../etc/passwd","content":"x"}]}"#,
            "files[0].path",
        ),
    ] {
        std::fs::write(&job, body).unwrap();
        let (r, _) = s.run_json(&["--job", job.to_str().unwrap()]);
        assert_eq!(r.outcome, Outcome::Rejected, "{body}");
        let msg = r.message.unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{body}: {msg:?} should name {needle:?}"
        );
    }
    // Oversize code: past the 4 MiB limit, refused before any sandbox exists.
    let big = s.state_dir.join("big.py");
    std::fs::write(&big, vec![b'#'; 5 << 20]).unwrap();
    let (r, _) = s.run_json(&[big.to_str().unwrap()]);
    assert_eq!(r.outcome, Outcome::Rejected, "{r:?}");
    assert!(r.message.unwrap_or_default().contains("limit"));
    assert!(s.leftovers().is_empty());
}

#[test]
fn a_runtime_added_by_configuration_runs() {
    let s = Scope::new("perl");
    let table = s.state_dir.join("runtimes.toml");
    std::fs::write(
        &table,
        format!(
            "{}\n[[runtime]]\nname = \"perl\"\nextensions = [\"pl\"]\nfile = \"main.pl\"\ncommand = [\"/usr/bin/perl\", \"{{file}}\"]\n",
            kiln_protocol::DEFAULT_RUNTIMES_TOML
        ),
    )
    .unwrap();
    let (r, _) = s.run_json(&[
        "--runtimes",
        table.to_str().unwrap(),
        "--runtime",
        "perl",
        "-c",
        "print join(',', @ARGV), \"\\n\";",
        "--",
        "x",
        "y",
    ]);
    assert_eq!(
        (r.outcome, r.stdout.as_str()),
        (Outcome::Ok, "x,y\n"),
        "{r:?}"
    );
    std::fs::remove_file(&table).unwrap();
}

//! `kiln submit` against a real `kiln serve`: output, exit status, JSON,
//! `--follow` streaming, `--no-wait`, and auth.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::bin;
use kiln_tests::server::Server;
use serde_json::Value;

fn submit(s: &Server, args: &[&str]) -> std::process::Output {
    Command::new(bin("kiln"))
        .arg("submit")
        .arg("--server")
        .arg(s.url(""))
        .args(args)
        .env_remove("KILN_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("running kiln submit")
}

#[test]
fn submit_prints_output_and_mirrors_the_exit_status() {
    let s = Server::start("submit", &["--min-idle", "0", "--token", "tok"]);
    let out = submit(
        &s,
        &[
            "--token",
            "tok",
            "--runtime",
            "python",
            "-c",
            "import sys; print('hi'); sys.exit(3)",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert_eq!(out.status.code(), Some(3));

    let out = submit(
        &s,
        &[
            "--token",
            "tok",
            "--json",
            "--runtime",
            "bash",
            "-c",
            "echo j",
        ],
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stdout"], "j\n");
    assert_eq!(v["outcome"], "ok");

    let out = submit(
        &s,
        &[
            "--token",
            "tok",
            "--no-wait",
            "--runtime",
            "bash",
            "-c",
            "true",
        ],
    );
    assert!(out.status.success());
    let id = String::from_utf8(out.stdout).unwrap();
    assert_eq!(id.trim().len(), 32, "{id}");

    let out = submit(&s, &["--runtime", "bash", "-c", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Authorization"));

    let out = submit(&s, &["--token", "tok", "--runtime", "cobol", "-c", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cobol"));
}

#[test]
fn follow_streams_output_as_it_happens() {
    let s = Server::start("follow", &["--min-idle", "0"]);
    let mut child = Command::new(bin("kiln"))
        .args([
            "submit",
            "--follow",
            "--runtime",
            "bash",
            "-c",
            "echo first; sleep 2; echo second; exit 4",
            "--server",
        ])
        .arg(s.url(""))
        .env_remove("KILN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    assert!(
        start.elapsed() < Duration::from_millis(1800),
        "the first line came before the job ended"
    );
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    assert_eq!(child.wait().unwrap().code(), Some(4));
}

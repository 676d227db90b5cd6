//! The Python client (`clients/python`, package `kiln-client`) against a
//! real `kiln serve` with a bearer token: its own pytest suite
//! (`clients/python/tests`), run in the environment `scripts/pyenv.sh`
//! makes (`KILN_PYTHON` names its python; a missing one fails the test),
//! with the daemon's AMQP intake on a queue of its own on the test broker
//! for the client's AMQP helper.

use std::path::PathBuf;
use std::process::Command;

use kiln_tests::server::Server;

#[test]
fn the_python_client_suite_passes_against_a_real_daemon() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var_os("KILN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/pyenv/bin/python"));
    assert!(
        python.exists(),
        "no Python environment at {}: run `bash scripts/pyenv.sh` (scripts/test.sh does) or set KILN_PYTHON",
        python.display()
    );
    kiln_tests::broker::ensure();
    // A queue of its own, so that no other test's node takes its jobs.
    let queue = format!("kiln.test.pyclient.{}", std::process::id());
    let mut s = Server::start(
        "pyclient",
        &[
            "--min-idle",
            "0",
            "--token",
            "sesame",
            "--amqp-url",
            &kiln_tests::broker::url(),
            "--amqp-queue",
            &queue,
        ],
    );
    s.token = Some("sesame".into());
    let out = Command::new(python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root.join("clients/python/tests"))
        .env("KILN_URL", s.url(""))
        .env("KILN_TOKEN", "sesame")
        .env("KILN_AMQP_URL", kiln_tests::broker::url())
        .env("KILN_AMQP_QUEUE", &queue)
        .output()
        .expect("running pytest");
    // The queue goes with the daemon.
    drop(s);
    let _ = Command::new("rabbitmqctl")
        .args(["-q", "delete_queue", &queue])
        .output();
    assert!(
        out.status.success(),
        "the client's suite failed\n--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

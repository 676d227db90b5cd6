//! Jobs that look at a sandbox's network from inside (the netlab's
//! `PROBE` and `BULK` scripts), for the network tests and benchmarks of
//! every backend. Included with `mod netjobs;` by tests and with
//! `#[path]` by benches.
#![allow(dead_code)]

use kiln_protocol::{JobId, JobSpec, Outcome, RuntimeTable};
use kiln_sandbox::{run_job, Sandbox};
use kiln_tests::netlab::{answers, BULK, PROBE};

/// Runs Python `code` in the sandbox with `stdin` (10 minutes at most:
/// bulk transfers under TCG are slow); its stdout. The job must succeed.
pub async fn python<S: Sandbox>(sb: &S, code: &str, stdin: &str) -> String {
    let mut spec = JobSpec::inline("python", code);
    spec.stdin = stdin.as_bytes().to_vec();
    spec.limits.timeout_ms = 600_000;
    let out = run_job(
        sb,
        JobId::random(),
        RuntimeTable::default().resolve("python").unwrap(),
        &spec,
        false,
        &mut (),
    )
    .await;
    assert_eq!(out.result.outcome, Outcome::Ok, "{:?}", out.result);
    out.result.stdout
}

/// Runs the probe lines in the sandbox; the answer of each, in order.
pub async fn probe<S: Sandbox>(sb: &S, lines: &[String]) -> Vec<String> {
    answers(&python(sb, PROBE, &lines.join("\n")).await, lines)
}

/// Runs the bulk job's lines; bytes and seconds of each.
pub async fn bulk<S: Sandbox>(sb: &S, lines: &[String]) -> Vec<(u64, f64)> {
    python(sb, BULK, &lines.join("\n"))
        .await
        .lines()
        .map(|l| {
            let (b, s) = l.split_once(' ').unwrap();
            (b.parse().unwrap(), s.parse().unwrap())
        })
        .collect()
}

/// Megabits per second of a `(bytes, seconds)` measurement.
pub fn mbit((bytes, secs): (u64, f64)) -> f64 {
    bytes as f64 * 8.0 / secs / 1e6
}

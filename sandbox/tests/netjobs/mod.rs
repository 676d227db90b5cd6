//! Jobs that look at a sandbox's network from inside (the netlab's
//! `PROBE` and `BULK` scripts), for the network tests and benchmarks of
//! every backend. Included with `mod netjobs;` by tests and with
//! `#[path]` by benches.
#![allow(dead_code)]

use kiln_protocol::{JobId, JobSpec, Outcome, RuntimeTable};
use kiln_sandbox::{run_job, Sandbox};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Instant;

use kiln_tests::netlab::{answers, within, World, BULK, PROBE, WEB_ALLOWED_BY_NETWORK};

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

/// One stream of `bytes` each way between the host side and the test
/// internet's bulk server, over the plain veth (no sandbox, no rules):
/// Mbit/s down and up, the baseline of the sandboxes' streams.
pub fn host_side(world: &World, bytes: u64) -> (f64, f64) {
    within(&world.host, || {
        let mut s = TcpStream::connect((WEB_ALLOWED_BY_NETWORK, 81)).unwrap();
        let t = Instant::now();
        s.write_all(format!("{bytes}\n").as_bytes()).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            got += k as u64;
        }
        let down = mbit((got, t.elapsed().as_secs_f64()));
        let mut s = TcpStream::connect((WEB_ALLOWED_BY_NETWORK, 82)).unwrap();
        let buf = vec![b'u'; 1 << 16];
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < bytes {
            s.write_all(&buf).unwrap();
            sent += buf.len() as u64;
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        (down, mbit((sent, t.elapsed().as_secs_f64())))
    })
}

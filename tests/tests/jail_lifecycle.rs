//! The jail's lifecycle seen from the host: many sandboxes in a row leave
//! nothing behind, and sandboxes orphaned by a SIGKILLed kiln are reaped by
//! the next one. Real namespaces, cgroups and processes; needs root.

use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_protocol::Outcome;
use kiln_tests::Scope;

fn host_mounts() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count()
}

#[test]
fn two_hundred_sequential_jobs_leave_nothing_behind() {
    let s = Scope::new("seq200");
    let mounts = host_mounts();
    let rts = ["bash", "python", "node"];
    for i in 0..200 {
        let rt = rts[i % rts.len()];
        let code = match rt {
            "bash" => format!("echo {i}"),
            "python" => format!("print({i})"),
            _ => format!("console.log({i})"),
        };
        let (r, _) = s.run_json(&["--runtime", rt, "-c", &code]);
        assert_eq!(r.outcome, Outcome::Ok, "job {i}: {r:?}");
        assert_eq!(r.stdout.trim(), i.to_string());
    }
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
    assert_eq!(
        host_mounts(),
        mounts,
        "sandboxes leaked mounts into the host"
    );
}

#[test]
fn orphans_of_a_killed_kiln_are_reaped_by_the_next_one() {
    let s = Scope::new("orphans");
    // Built by the job's shell, so that kiln's own command line, which
    // carries the code, does not match it.
    let marker = format!("kiln-orphan-{}-2", std::process::id());
    let code = format!(
        "exec -a kiln-orphan-{}-$((1+1)) sleep 300",
        std::process::id()
    );
    let mut kiln = s
        .command(&["--runtime", "bash", "-c", &code], &["--no-stdin"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Wait (bounded) until the job is running inside its sandbox.
    let deadline = Instant::now() + Duration::from_secs(20);
    while kiln_tests::processes_matching(&marker).is_empty() {
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    kiln.kill().unwrap(); // SIGKILL: no chance to clean up.
    kiln.wait().unwrap();
    // The agent sees its control socket close and kills its jobs: nothing
    // runs on without an owner...
    assert!(
        kiln_tests::wait_processes_gone(&marker, Duration::from_secs(10)).is_empty(),
        "the job outlived its kiln"
    );
    // ...but the record and the cgroup remain until someone reaps them.
    assert!(
        !s.leftovers().is_empty(),
        "the orphan's record and cgroup should remain"
    );

    // Any later kiln reaps it at start-up, then runs its own job.
    let (r, _) = s.run_json(&["--runtime", "bash", "-c", "echo fresh"]);
    assert_eq!(r.outcome, Outcome::Ok);
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
}

#[test]
fn kiln_reap_reports_success_when_nothing_is_left() {
    let s = Scope::new("reap");
    let out = std::process::Command::new(kiln_tests::bin("kiln"))
        .args(["reap", "--state-dir"])
        .arg(&s.state_dir)
        .args(["--cgroup-parent", &s.cgroup_parent])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! `kiln run --backend qemu` end to end: every job boots a real Linux guest
//! (Kiln's kernel and image from `deploy/guest/`) under QEMU — TCG on hosts
//! without usable KVM — with `kiln-agent` as PID 1 speaking the protocol
//! over virtio-vsock. Python, Node.js and Bash jobs with output, exit codes,
//! stdin, args, env and files; timeouts, memory bombs and the output cap
//! with the same outcomes as in the jail; nothing left on the host.
//!
//! Needs root, QEMU, vhost-device-vsock and the guest artefacts (the newest
//! in `KILN_GUEST_CACHE`, default /var/cache/kiln/guest). Without the
//! artefacts the tests say SKIPPED, unless `KILN_REQUIRE_GUEST=1`.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use kiln_protocol::{JobResult, Outcome};
use kiln_tests::{processes_matching, Scope};

/// `kiln run --backend qemu --json <args>`, and a check that the VM left
/// nothing: no directory under the state dir, no process naming it.
fn run(s: &Scope, args: &[&str]) -> (JobResult, i32) {
    let mut all = vec!["--backend", "qemu"];
    all.extend_from_slice(args);
    let r = s.run_json(&all);
    assert_clean(s);
    r
}

fn assert_clean(s: &Scope) {
    let dir = s.state_dir.join("qemu");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left on the host: {left:?}");
    let procs = processes_matching(&s.state_dir.to_string_lossy());
    assert!(procs.is_empty(), "processes left: {procs:?}");
}

/// Clean-up of the state directory the qemu backend makes.
struct QemuScope(Scope);

impl QemuScope {
    fn new(test: &str) -> Self {
        Self(Scope::new(&format!("qemu-{test}")))
    }
}

impl Drop for QemuScope {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(self.0.state_dir.join("qemu"));
    }
}

#[test]
fn python_node_and_bash_jobs_run_in_a_guest_with_exit_codes() {
    if !kiln_tests::has_guest() {
        return;
    }
    let s = QemuScope::new("runtimes");
    let (r, code) = run(
        &s.0,
        &[
            "--runtime",
            "python",
            "--timeout",
            "60s",
            "-c",
            "import sys, platform; print('hi', platform.release()); print('err', file=sys.stderr)",
        ],
    );
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    // The guest's own kernel (Debian's 6.1 source), not the host's.
    assert!(r.stdout.starts_with("hi 6.1."), "{}", r.stdout);
    assert_eq!(r.stderr, "err\n");
    assert_eq!(code, 0);
    for (rt, src) in [
        ("python", "import sys; sys.exit(3)"),
        ("node", "console.log('n'); process.exit(3)"),
        ("bash", "echo b; exit 3"),
    ] {
        let (r, status) = run(&s.0, &["--runtime", rt, "--timeout", "60s", "-c", src]);
        assert_eq!(r.outcome, Outcome::Error, "{rt}: {r:?}");
        assert_eq!(r.exit_code, Some(3), "{rt}");
        assert_eq!(status, 3, "{rt}: kiln's exit status mirrors the job's");
    }
}

#[test]
fn stdin_args_env_and_files_reach_the_guest() {
    if !kiln_tests::has_guest() {
        return;
    }
    let s = QemuScope::new("io");
    let dir = s.0.state_dir.join("src");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("main.py"), "import helper, sys, os\nprint(helper.twice(21), sys.argv[1:], os.environ['GREETING'], sys.stdin.read().upper(), end='')\n").unwrap();
    std::fs::write(dir.join("helper.py"), "def twice(x):\n    return 2 * x\n").unwrap();
    let main = dir.join("main.py");
    let helper = dir.join("helper.py");
    let mut child =
        s.0.command(
            &[
                "--backend",
                "qemu",
                main.to_str().unwrap(),
                "--file",
                helper.to_str().unwrap(),
                "-e",
                "GREETING=hello",
                "--timeout",
                "60s",
                "--",
                "a b",
                "c",
            ],
            &["--json"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"some input\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let r: JobResult = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.stdout, "42 ['a b', 'c'] hello SOME INPUT\n");
    assert_clean(&s.0);
}

#[test]
fn timeout_memory_bomb_and_output_cap_end_like_in_the_jail() {
    if !kiln_tests::has_guest() {
        return;
    }
    let s = QemuScope::new("limits");
    let (r, code) = run(
        &s.0,
        &[
            "--runtime",
            "python",
            "--timeout",
            "2s",
            "-c",
            "while True: pass",
        ],
    );
    assert_eq!(r.outcome, Outcome::Timeout, "{r:?}");
    assert_eq!(code, 124);

    let (r, code) = run(
        &s.0,
        &[
            "--runtime",
            "python",
            "--memory",
            "64M",
            "--timeout",
            "60s",
            "-c",
            "x = []\nwhile True: x.append(bytearray(8 << 20))",
        ],
    );
    assert_eq!(r.outcome, Outcome::Oom, "{r:?}");
    assert_eq!(code, 137);

    // The task cap: the guest has no pids cgroup, the agent caps the
    // kernel's threads-max at what ran at boot plus the job's pids.
    let (r, _) = run(
        &s.0,
        &[
            "--runtime",
            "python",
            "--pids",
            "32",
            "--timeout",
            "60s",
            "-c",
            "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30); os._exit(0)\n        n += 1\nexcept OSError as e:\n    print(n, e.errno)",
        ],
    );
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    let forks: u32 = r.stdout.split_whitespace().next().unwrap().parse().unwrap();
    assert!((16..=32).contains(&forks), "{}", r.stdout);
    assert!(r.stdout.ends_with(" 11\n"), "EAGAIN expected: {}", r.stdout);

    let (r, code) = run(
        &s.0,
        &[
            "--runtime",
            "bash",
            "--output-limit",
            "1000B",
            "--timeout",
            "60s",
            "-c",
            "yes",
        ],
    );
    assert_eq!(r.outcome, Outcome::Killed, "{r:?}");
    assert!(r.stdout_truncated);
    assert_eq!(r.stdout.len(), 1000);
    assert_eq!(code, 137);
}

#[test]
fn forcing_kvm_where_it_cannot_boot_linux_is_refused_with_the_reason() {
    if !kiln_tests::has_guest() {
        return;
    }
    let usable = Path::new("/dev/kvm").exists()
        && std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .split_whitespace()
            .any(|f| f == "vmx" || f == "svm");
    if usable {
        eprintln!("SKIPPED: KVM is usable on this host");
        return;
    }
    let s = QemuScope::new("kvm");
    let out = s.0.run(
        &[
            "--backend",
            "qemu",
            "--qemu-accel",
            "kvm",
            "-r",
            "bash",
            "-c",
            "true",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(70), "{err}");
    assert!(err.contains("KVM") && err.contains("tcg"), "{err}");
    assert_clean(&s.0);
}

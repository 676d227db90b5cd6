//! The agent seen from the host: the real binary on a socketpair, running
//! real interpreters as an unprivileged user. Needs root (to switch to uid
//! 65534), /usr/bin/python3, /usr/bin/node and /bin/bash.

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::{children, exec_request, process_gone, vm_rss_kb, Host, NOBODY};
use kiln_protocol::{ExitStatus, Frame, FrameError, Kill};

fn expect_error(f: Frame, tag: Option<u32>, needle: &str) {
    match f {
        Frame::Error(e) => {
            assert_eq!(e.tag, tag, "{e:?}");
            assert!(
                e.message.contains(needle),
                "{:?} lacks {needle:?}",
                e.message
            );
        }
        other => panic!("expected an error mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn version_flag_prints_the_version() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("kiln-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .arg("--fd")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn hello_answers_with_version_and_pid() {
    let mut h = Host::start();
    let ack = h.hello(&[]);
    assert_eq!(ack.version, kiln_protocol::PROTOCOL_VERSION);
    assert_eq!(ack.agent, env!("CARGO_PKG_VERSION"));
    assert_eq!(ack.pid, h.child.id());
    // The agent handed the workdir to the job user.
    assert_eq!(std::fs::metadata(h.workdir.path()).unwrap().uid(), NOBODY);
}

#[test]
fn hello_with_another_version_is_refused_and_closes() {
    let mut h = Host::start();
    let mut hello = h.hello_frame(&[]);
    hello.version = kiln_protocol::PROTOCOL_VERSION + 1;
    h.send(&Frame::Hello(hello));
    expect_error(h.recv(), None, "version");
    assert!(matches!(h.try_recv(), Err(FrameError::Closed)));
    assert_eq!(h.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn wrong_requests_get_tagged_errors_and_serving_continues() {
    let mut h = Host::start();
    h.send(&Frame::Exec(exec_request(5, "python", "main.py")));
    expect_error(h.recv(), Some(5), "before hello");
    h.hello(&[]);
    h.send(&Frame::Exec(exec_request(6, "cobol", "main.cob")));
    expect_error(h.recv(), Some(6), "cobol");
    h.send(&Frame::Exec(exec_request(7, "python", "../main.py")));
    expect_error(h.recv(), Some(7), "entrypoint");
    h.send(&Frame::Kill(Kill { tag: 99, signal: 9 }));
    expect_error(h.recv(), Some(99), "99");
    h.send(&Frame::Stdin {
        tag: 98,
        data: b"x".to_vec(),
    });
    expect_error(h.recv(), Some(98), "98");
    h.send(&Frame::Pong(1));
    expect_error(h.recv(), None, "pong");
    h.send(&Frame::Ping(77));
    assert_eq!(h.recv(), Frame::Pong(77));
    // A guest setup is for microVM guests: a jail's agent refuses it.
    h.send(&Frame::Setup(kiln_protocol::GuestSetup {
        tag: 97,
        sandbox_id: "0123456789abcdef".into(),
        hostname: "kiln-x".into(),
        entropy: vec![1; 64],
        clock_unix_ns: 0,
        disk_mb: 16,
        pids: 16,
        network: None,
    }));
    expect_error(h.recv(), Some(97), "microVM guests");
}

#[test]
fn malformed_frame_gets_an_error_and_the_agent_exits() {
    let mut h = Host::start();
    h.hello(&[]);
    h.sock.write_all(&[0, 0, 0, 1, 0x7f]).unwrap();
    expect_error(h.recv(), None, "unknown frame kind");
    assert!(matches!(h.try_recv(), Err(FrameError::Closed)));
    assert_eq!(h.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn put_file_and_get_file_round_trip_as_the_job_user() {
    let mut h = Host::start();
    h.hello(&[]);
    h.put("data/in.txt", 0o640, b"some bytes");
    let on_disk = h.workdir.path().join("data/in.txt");
    let meta = std::fs::metadata(&on_disk).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY));
    assert_eq!(meta.mode() & 0o777, 0o640);
    match h.get_raw("data/in.txt", 100) {
        Frame::FileData { data, .. } => assert_eq!(data, b"some bytes"),
        other => panic!("{other:?}"),
    }
    let too_big = h.get_raw("data/in.txt", 3);
    expect_error(too_big, Some(h.last_tag()), "10 bytes");
    let missing = h.get_raw("missing", 10);
    expect_error(missing, Some(h.last_tag()), "missing");
}

#[test]
fn symlinks_and_traversal_cannot_reach_outside_the_workdir() {
    let mut h = Host::start();
    h.hello(&[]);
    std::os::unix::fs::symlink("/etc", h.workdir.path().join("etc")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", h.workdir.path().join("pw")).unwrap();
    std::os::unix::fs::symlink("../..", h.workdir.path().join("up")).unwrap();
    let r = h.put_raw("etc/kiln-agent-escape", 0o644, b"pwned");
    assert!(matches!(r, Frame::Error(_)), "{r:?}");
    assert!(!std::path::Path::new("/etc/kiln-agent-escape").exists());
    for p in ["pw", "up/kiln-agent-escape", "etc/sub/x"] {
        let r = h.put_raw(p, 0o644, b"pwned");
        assert!(matches!(r, Frame::Error(_)), "{p}: {r:?}");
    }
    for p in ["../escape", "/etc/passwd", "a/../../b"] {
        let r = h.put_raw(p, 0o644, b"x");
        assert!(matches!(r, Frame::Error(_)), "{p}: {r:?}");
    }
    for p in ["etc/passwd", "pw", "up/etc/passwd"] {
        let r = h.get_raw(p, 1 << 20);
        assert!(matches!(r, Frame::Error(_)), "{p}: {r:?}");
    }
    // A file the job user may not write is refused too (fs uid is the job's).
    std::fs::write(h.workdir.path().join("rootfile"), b"root").unwrap();
    let r = h.put_raw("rootfile", 0o644, b"x");
    assert!(matches!(r, Frame::Error(_)), "{r:?}");
    assert_eq!(
        std::fs::read(h.workdir.path().join("rootfile")).unwrap(),
        b"root"
    );
}

const PY_MAIN: &[u8] = br#"
import os, sys
print("args", sys.argv[1:])
print("env", os.environ.get("GREETING"), os.environ.get("HOME"), os.getuid())
print("cwd", os.getcwd())
data = sys.stdin.read()
print("stdin", len(data), data[:5])
print("to stderr", file=sys.stderr)
sys.exit(3)
"#;

fn check_py_run(h: &Host, run: &common::Run) {
    let out = run.stdout();
    assert!(out.contains("args ['a', 'b c']"), "{out}");
    let home = h.workdir.path().to_str().unwrap();
    assert!(out.contains(&format!("env hello {home} {NOBODY}")), "{out}");
    assert!(out.contains(&format!("cwd {home}")), "{out}");
    assert!(out.contains("stdin 200000 xxxxx"), "{out}");
    assert_eq!(run.stderr(), "to stderr\n");
    assert_eq!(run.exit.status, ExitStatus::Code(3));
    assert_eq!(run.exit.stdout_bytes, run.stdout.len() as u64);
    assert_eq!(run.exit.stderr_bytes, 10);
    assert!(!run.exit.stdout_truncated && run.exit.reason.is_none());
}

fn py_request(tag: u32, warm_next: bool) -> kiln_protocol::ExecRequest {
    let mut req = exec_request(tag, "python", "main.py");
    req.args = vec!["a".into(), "b c".into()];
    req.env.insert("GREETING".into(), "hello".into());
    req.warm_next = warm_next;
    req
}

#[test]
fn python_runs_cold_with_args_env_stdin_and_exit_code() {
    let mut h = Host::start();
    h.hello(&[]);
    h.put("main.py", 0o644, PY_MAIN);
    let stdin = vec![b'x'; 200_000];
    let tag = h.tag();
    let run = h.run(py_request(tag, false), Some(&stdin));
    assert!(!run.warm);
    check_py_run(&h, &run);
}

#[test]
fn python_runs_warm_and_is_rewarmed_for_the_next_exec() {
    let mut h = Host::start();
    h.hello(&["python"]);
    h.put("main.py", 0o644, PY_MAIN);
    let stdin = vec![b'x'; 200_000];
    for _ in 0..2 {
        let tag = h.tag();
        let run = h.run(py_request(tag, true), Some(&stdin));
        assert!(run.warm, "warm_next must provide a warm interpreter");
        check_py_run(&h, &run);
    }
    // Without warm_next the pool of one is used up: the next exec is cold.
    let tag = h.tag();
    let _ = h.run(py_request(tag, false), Some(b""));
    let tag = h.tag();
    let run = h.run(py_request(tag, false), Some(&stdin));
    assert!(!run.warm);
    check_py_run(&h, &run);
}

#[test]
fn await_warm_answers_once_the_warm_interpreters_wait_and_at_once_after() {
    let mut h = Host::start();
    h.hello(&["python", "node", "bash"]);
    for _ in 0..2 {
        let tag = h.tag();
        h.send(&Frame::AwaitWarm { tag });
        assert!(matches!(h.answer_to(tag), Frame::Ack { .. }));
    }
    // Whatever was warming is ready now: both execs start warm.
    h.put("main.py", 0o644, b"print(1)");
    let tag = h.tag();
    let run = h.run(py_request(tag, false), Some(b""));
    assert!(run.warm, "python was awaited warm");
}

#[test]
fn node_runs_cold_and_warm() {
    let mut h = Host::start();
    h.hello(&["node"]);
    h.put(
        "main.js",
        0o644,
        br#"
let input = "";
process.stdin.on("data", d => input += d);
process.stdin.on("end", () => {
  console.log("node", process.argv.slice(2).join(","), process.env.GREETING, input.trim());
  console.error("err");
  process.exit(4);
});
"#,
    );
    for expect_warm in [true, false] {
        let tag = h.tag();
        let mut req = exec_request(tag, "js", "main.js");
        req.args = vec!["x".into(), "y".into()];
        req.env.insert("GREETING".into(), "hi".into());
        let run = h.run(req, Some(b"from stdin\n"));
        assert_eq!(run.warm, expect_warm);
        assert_eq!(run.stdout(), "node x,y hi from stdin\n");
        assert_eq!(run.stderr(), "err\n");
        assert_eq!(run.exit.status, ExitStatus::Code(4));
    }
}

#[test]
fn bash_runs_cold() {
    let mut h = Host::start();
    h.hello(&["bash"]); // bash has no warm start: ignored
    h.put(
        "main.sh",
        0o755,
        b"echo \"$1 $FOO $(id -u)\"; read l; echo \"got $l\" >&2; exit 7\n",
    );
    let tag = h.tag();
    let mut req = exec_request(tag, "sh", "main.sh");
    req.args = vec!["one".into()];
    req.env.insert("FOO".into(), "bar".into());
    let run = h.run(req, Some(b"line\n"));
    assert!(!run.warm);
    assert_eq!(run.stdout(), format!("one bar {NOBODY}\n"));
    assert_eq!(run.stderr(), "got line\n");
    assert_eq!(run.exit.status, ExitStatus::Code(7));
}

#[test]
fn concurrent_execs_are_kept_apart() {
    let mut h = Host::start();
    h.hello(&[]);
    h.put(
        "a.sh",
        0o644,
        b"for i in 1 2 3; do echo a$i; sleep 0.05; done\n",
    );
    h.put(
        "b.sh",
        0o644,
        b"for i in 1 2 3; do echo b$i >&2; sleep 0.05; done\n",
    );
    let (ta, tb) = (h.tag(), h.tag());
    h.send(&Frame::Exec(exec_request(ta, "bash", "a.sh")));
    h.send(&Frame::Exec(exec_request(tb, "bash", "b.sh")));
    let run_a = h.collect(ta, false, 0);
    let run_b = h.collect(tb, false, 0);
    assert_eq!(run_a.stdout(), "a1\na2\na3\n");
    assert_eq!(run_b.stderr(), "b1\nb2\nb3\n");
    assert_eq!(run_a.exit.status, ExitStatus::Code(0));
    assert_eq!(run_b.exit.status, ExitStatus::Code(0));
}

#[test]
fn output_limit_kills_a_flood_and_marks_it_truncated() {
    let mut h = Host::start();
    h.hello(&[]);
    h.put(
        "flood.py",
        0o644,
        b"import sys\nwhile True:\n    sys.stdout.write('y' * 4096)\n",
    );
    let tag = h.tag();
    let mut req = exec_request(tag, "python", "flood.py");
    req.output_limit = 100_000;
    let run = h.run(req, None);
    assert_eq!(run.stdout.len(), 100_000);
    assert!(run.exit.stdout_truncated && !run.exit.stderr_truncated);
    assert!(run.exit.stdout_bytes > 100_000);
    assert_eq!(run.exit.reason.as_deref(), Some("output_limit"));
    assert_eq!(run.exit.status, ExitStatus::Signal(libc::SIGKILL));
}

#[test]
fn kill_ends_a_busy_loop_and_every_process_of_its_group() {
    let mut h = Host::start();
    h.hello(&[]);
    h.put(
        "busy.sh",
        0o644,
        b"sh -c 'sleep 300 & echo $!; sleep 300 & echo $!; wait' &\necho $!\nwhile :; do :; done\n",
    );
    let tag = h.tag();
    h.send(&Frame::Exec(exec_request(tag, "bash", "busy.sh")));
    let Frame::Started(started) = h.answer_to(tag) else {
        panic!("no started")
    };
    let mut out = Vec::new();
    for _ in 0..100 {
        if out.iter().filter(|&&b| b == b'\n').count() >= 3 {
            break;
        }
        match h.recv() {
            Frame::Stdout { data, .. } => out.extend(data),
            other => panic!("unexpected {other:?}"),
        }
    }
    let pids: Vec<u32> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 3, "{pids:?}");
    h.send(&Frame::Kill(Kill {
        tag,
        signal: libc::SIGTERM,
    }));
    let run = h.collect(tag, false, started.pid);
    assert_eq!(run.exit.status, ExitStatus::Signal(libc::SIGTERM));
    assert_eq!(run.exit.reason.as_deref(), Some("killed"));
    for pid in pids.iter().copied().chain([started.pid]) {
        assert!(
            process_gone(pid, Duration::from_secs(3), false),
            "process {pid} survived or was not reaped"
        );
    }
}

#[test]
fn exit_report_carries_the_resource_usage() {
    let mut h = Host::start();
    h.hello(&[]);
    h.put(
        "burn.py",
        0o644,
        b"import time\nt = time.process_time()\nx = bytearray(20 << 20)\nwhile time.process_time() - t < 0.3:\n    pass\n",
    );
    let tag = h.tag();
    let run = h.run(exec_request(tag, "python", "burn.py"), None);
    assert_eq!(run.exit.status, ExitStatus::Code(0));
    let cpu = run.exit.cpu_user_us + run.exit.cpu_system_us;
    assert!(cpu >= 250_000, "{:?}", run.exit);
    assert!(run.exit.max_rss_kb >= 20 * 1024, "{:?}", run.exit);
    assert!(run.exit.wall_us >= cpu / 2, "{:?}", run.exit);
}

#[test]
fn closing_the_socket_kills_running_jobs_and_the_agent_exits() {
    let mut h = Host::start();
    h.hello(&["python"]);
    h.put(
        "sleep.py",
        0o644,
        b"import time\nprint('up', flush=True)\ntime.sleep(300)\n",
    );
    let tag = h.tag();
    h.send(&Frame::Exec(exec_request(tag, "python", "sleep.py")));
    let Frame::Started(started) = h.answer_to(tag) else {
        panic!("no started")
    };
    assert!(matches!(h.recv(), Frame::Stdout { .. }));
    h.sock.shutdown(std::net::Shutdown::Both).unwrap();
    assert_eq!(h.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(
        // After the agent exits, the host's init reaps: a zombie is dead.
        process_gone(started.pid, Duration::from_secs(3), true),
        "job {} survived the agent",
        started.pid
    );
}

#[test]
fn termination_signals_to_the_agent_are_forwarded_to_jobs() {
    let mut h = Host::start();
    h.hello(&[]);
    h.put("wait.sh", 0o644, b"echo up\nsleep 300\n");
    let tag = h.tag();
    h.send(&Frame::Exec(exec_request(tag, "bash", "wait.sh")));
    let Frame::Started(started) = h.answer_to(tag) else {
        panic!("no started")
    };
    assert!(matches!(h.recv(), Frame::Stdout { .. }));
    // SAFETY: signals the agent child this test started.
    unsafe { libc::kill(h.child.id() as i32, libc::SIGTERM) };
    let run = h.collect(tag, false, started.pid);
    assert_eq!(run.exit.status, ExitStatus::Signal(libc::SIGTERM));
    // The agent itself keeps serving.
    h.send(&Frame::Ping(1));
    assert_eq!(h.recv(), Frame::Pong(1));
}

#[test]
fn a_dead_warm_interpreter_falls_back_to_a_cold_start() {
    let mut h = Host::start();
    h.hello(&["python"]);
    let warm = children(h.child.id());
    assert_eq!(warm.len(), 1, "{warm:?}");
    // SAFETY: kills the warm interpreter the agent started for this test.
    unsafe { libc::kill(warm[0] as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(100));
    h.put("main.py", 0o644, b"print('cold')\n");
    let tag = h.tag();
    let run = h.run(exec_request(tag, "python", "main.py"), None);
    assert!(!run.warm);
    assert_eq!(run.stdout(), "cold\n");
    assert!(process_gone(warm[0], Duration::from_secs(2), false));
}

#[test]
fn orphans_of_a_job_are_reaped() {
    let mut h = Host::start();
    h.hello(&[]);
    // The grandchild escapes into its own session and outlives the job.
    h.put("orphan.sh", 0o644, b"setsid sh -c 'sleep 0.3' &\necho $!\n");
    let tag = h.tag();
    let run = h.run(exec_request(tag, "bash", "orphan.sh"), None);
    assert_eq!(run.exit.status, ExitStatus::Code(0));
    let orphan: u32 = run.stdout().trim().parse().unwrap();
    assert!(process_gone(orphan, Duration::from_secs(3), false));
    assert!(children(h.child.id()).is_empty());
}

#[test]
fn an_output_flood_to_a_slow_host_keeps_agent_memory_bounded() {
    let mut h = Host::start();
    h.hello(&[]);
    h.put(
        "flood.py",
        0o644,
        b"import sys\nb = b'z' * 65536\nfor _ in range(640):\n    sys.stdout.buffer.write(b)\n",
    );
    let tag = h.tag();
    let mut req = exec_request(tag, "python", "flood.py");
    req.output_limit = 64 << 20;
    h.send(&Frame::Exec(req));
    // Do not read for a while: the agent must stop reading the job.
    std::thread::sleep(Duration::from_millis(1500));
    let rss = vm_rss_kb(h.child.id());
    assert!(rss < 24 * 1024, "agent RSS grew to {rss} KiB");
    let Frame::Started(s) = h.answer_to(tag) else {
        panic!("no started")
    };
    let run = h.collect(tag, false, s.pid);
    assert_eq!(run.stdout.len(), 640 * 65536);
    assert_eq!(run.exit.status, ExitStatus::Code(0));
    assert!(!run.exit.stdout_truncated);
}

#[test]
fn a_warm_request_larger_than_a_pipe_buffer_is_delivered() {
    let mut h = Host::start();
    h.hello(&["python"]);
    h.put(
        "count.py",
        0o644,
        b"import os, sys\nprint(len(sys.argv) - 1, sum(map(len, sys.argv[1:])), len(os.environ['BIG']))\n",
    );
    let tag = h.tag();
    let mut req = exec_request(tag, "python", "count.py");
    req.args = (0..1000).map(|i| format!("{i:0>200}")).collect();
    req.env.insert("BIG".into(), "b".repeat(200_000));
    let run = h.run(req, None);
    assert!(run.warm);
    assert_eq!(run.stdout(), "1000 200000 200000\n");
}

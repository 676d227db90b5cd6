//! The `Sandbox` contract on the real jail backend, as the daemon uses it:
//! several execs in one sandbox with warm interpreters renewed between them,
//! files that persist between execs, concurrent execs, live stats, a host
//! deadline that holds even when the job ignores signals, and a destroy that
//! leaves nothing. Needs root and the built `kiln-agent`
//! (`cargo build --bins`).

use std::path::PathBuf;
use std::time::Duration;

use kiln_protocol::{JobId, JobSpec, Outcome, RuntimeTable};
use kiln_sandbox::jail::{Jail, JailBackend, JailConfig};
use kiln_sandbox::{run_job, Backend, Sandbox, SandboxSpec};
use kiln_tests::Scope;

/// A jail backend in its own test scope (state dir and cgroup parent) from
/// the black-box harness, with the built agent.
struct Env {
    backend: JailBackend,
    scope: Scope,
}

impl Env {
    fn new(name: &str) -> Self {
        let scope = Scope::new(&format!("sb-{name}"));
        let mut cfg = JailConfig::new(kiln_tests::bin("kiln-agent"), RuntimeTable::default());
        cfg.state_dir = scope.state_dir.clone();
        cfg.cgroup_parent = scope.cgroup_parent.clone();
        Self {
            backend: JailBackend::new(cfg).unwrap(),
            scope,
        }
    }

    /// Directories this test's sandboxes left (cgroups and records).
    fn leftovers(&self) -> Vec<PathBuf> {
        self.scope.leftovers()
    }

    /// A sandbox with the default job limits, pre-warming `runtime`.
    async fn sandbox(&self, runtime: &str) -> Jail {
        self.backend
            .create(&SandboxSpec::for_job(&Default::default(), runtime))
            .await
            .unwrap()
    }
}

fn spec(runtime: &str, code: &str) -> JobSpec {
    JobSpec::inline(runtime, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sandbox_serves_many_execs_warm_and_keeps_files() {
    let env = Env::new("many");
    let table = RuntimeTable::default();
    let py = table.resolve("python").unwrap();
    let sb = env.sandbox("python").await;
    sb.agent()
        .put_file("state/counter", b"0".to_vec(), 0o644)
        .await
        .unwrap();
    let mut warm_runs = 0;
    for i in 1..=5 {
        // Wait until the renewed warm interpreter waits, as a pool's idle
        // time would (bounded; a sleep here flaked under load).
        sb.agent()
            .await_warm(Duration::from_secs(30))
            .await
            .expect("the warm interpreter is renewed");
        let code =
            "p='state/counter'; n=int(open(p).read())+1; open(p,'w').write(str(n)); print(n)";
        let out = run_job(
            &sb,
            JobId::random(),
            py,
            &spec("python", code),
            true,
            &mut (),
        )
        .await;
        assert_eq!(out.result.outcome, Outcome::Ok, "{:?}", out.result);
        assert_eq!(out.result.stdout, format!("{i}\n"));
        assert!(!out.poisoned);
        warm_runs += usize::from(out.warm);
    }
    assert_eq!(warm_runs, 5, "every exec should find a warm interpreter");
    assert_eq!(
        sb.agent().get_file("state/counter", 100).await.unwrap(),
        b"5"
    );
    let stats = sb.stats();
    assert!(stats.memory_bytes > 0 && stats.pids >= 1, "{stats:?}");
    assert!(
        stats.cpu_usage_us.is_some_and(|us| us > 0),
        "cpu usage unknown: {stats:?}"
    );
    sb.destroy().await;
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_execs_in_one_sandbox_keep_their_output_apart() {
    let env = Env::new("concurrent");
    let table = RuntimeTable::default();
    let bash = table.resolve("bash").unwrap();
    let sb = env.sandbox("bash").await;
    let a = spec("bash", "for i in 1 2 3; do echo a$i; sleep 0.05; done");
    let b = spec("bash", "for i in 1 2 3; do echo b$i; sleep 0.05; done");
    let (mut sink_a, mut sink_b) = ((), ());
    let (ra, rb) = tokio::join!(
        run_job(&sb, JobId::random(), bash, &a, false, &mut sink_a),
        run_job(&sb, JobId::random(), bash, &b, false, &mut sink_b)
    );
    assert_eq!(ra.result.stdout, "a1\na2\na3\n");
    assert_eq!(rb.result.stdout, "b1\nb2\nb3\n");
    sb.destroy().await;
    assert!(env.leftovers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_deadline_holds_against_a_job_that_ignores_signals() {
    let env = Env::new("deadline");
    let table = RuntimeTable::default();
    let py = table.resolve("python").unwrap();
    let sb = env.sandbox("python").await;
    let mut s = spec(
        "python",
        "import signal, os\nfor sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n    signal.signal(sig, signal.SIG_IGN)\nprint('ready', flush=True)\nwhile True: pass",
    );
    s.limits.timeout_ms = 500;
    let mut streamed = Vec::new();
    let mut sink = |_: kiln_sandbox::Stream, d: &[u8]| streamed.extend_from_slice(d);
    let out = run_job(&sb, JobId::random(), py, &s, true, &mut sink).await;
    assert_eq!(out.result.outcome, Outcome::Timeout, "{:?}", out.result);
    assert_eq!(streamed, b"ready\n", "output streamed as it came");
    assert!(
        !out.poisoned,
        "the agent killed it, the sandbox is reusable"
    );
    // The sandbox still works after a timed-out exec.
    let ok = run_job(
        &sb,
        JobId::random(),
        py,
        &spec("python", "print(2)"),
        true,
        &mut (),
    )
    .await;
    assert_eq!(ok.result.stdout, "2\n");
    sb.destroy().await;
    assert!(env.leftovers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_agent_is_killed_is_an_internal_failure_that_says_so() {
    let env = Env::new("agent-killed");
    let table = RuntimeTable::default();
    let py = table.resolve("python").unwrap();
    let sb = env.sandbox("python").await;
    let mut s = spec(
        "python",
        "print('ready', flush=True)\nimport time\ntime.sleep(60)",
    );
    s.limits.timeout_ms = 30_000;
    let agent = sb.pid();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut tx = Some(tx);
    let mut sink = |_: kiln_sandbox::Stream, _: &[u8]| {
        if let Some(tx) = tx.take() {
            let _ = tx.send(());
        }
    };
    let killer = tokio::spawn(async move {
        if rx.await.is_ok() {
            // SAFETY: kill has no memory-safety preconditions; the pid is
            // the jail's init (its agent), a process of this test's.
            unsafe { libc::kill(agent, libc::SIGKILL) };
        }
    });
    let out = run_job(&sb, JobId::random(), py, &s, true, &mut sink).await;
    killer.await.unwrap();
    assert_eq!(out.result.outcome, Outcome::Internal, "{:?}", out.result);
    let msg = out.result.message.clone().unwrap_or_default();
    assert!(msg.contains("agent went away"), "{msg}");
    assert!(out.poisoned, "a sandbox without its agent is not reused");
    sb.destroy().await;
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_warm_runtimes_and_internet_are_refused_before_anything_starts() {
    let env = Env::new("refused");
    let mut s = SandboxSpec::for_job(&Default::default(), "cobol");
    let e = env
        .backend
        .create(&s)
        .await
        .err()
        .expect("unknown runtime refused");
    assert!(e.to_string().contains("cobol"), "{e}");
    s.warm.clear();
    s.allow_internet = true;
    let e = env
        .backend
        .create(&s)
        .await
        .err()
        .expect("internet refused");
    assert!(e.to_string().contains("allow_internet"), "{e}");
    assert!(env.leftovers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_sandbox_is_still_cleaned_up() {
    let env = Env::new("dropped");
    let sb = env.sandbox("bash").await;
    let pid = sb.agent().ping(Duration::from_secs(5)).await.map(|_| ());
    assert!(pid.is_ok());
    drop(sb);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !env.leftovers().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            env.leftovers()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The warm Python prelude skips CPython's module teardown when nothing can
/// observe it. Every way a program can notice how the interpreter exits is
/// run twice, in a warm interpreter and as a plain `python3 main.py` in a
/// sandbox without warm starts, and must give the same output, status and
/// files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_python_exits_exactly_as_plain_python_does() {
    let env = Env::new("py-exit");
    let table = RuntimeTable::default();
    let py = table.resolve("python").unwrap();
    let warm_spec = SandboxSpec::for_job(&Default::default(), "python");
    let mut cold_spec = warm_spec.clone();
    cold_spec.warm.clear();
    let warm = env.backend.create(&warm_spec).await.unwrap();
    let cold = env.backend.create(&cold_spec).await.unwrap();
    let cases: &[(&str, Option<&str>)] = &[
        ("print(1)", None),
        ("import sys; sys.stdout.write('no newline')", None),
        ("import atexit; atexit.register(print, 'at exit'); print('main')", None),
        (
            "import threading, time\ndef late():\n    time.sleep(0.2); print('thread done')\nthreading.Thread(target=late).start()\nprint('main done')",
            None,
        ),
        ("import sys; sys.exit(3)", None),
        ("import sys; sys.exit(-1)", None),
        ("import sys; sys.exit('bye')", None),
        ("raise ValueError('boom')", None),
        ("raise KeyboardInterrupt", None),
        ("class D:\n    def __del__(self): print('finalized')\nd = D()", None),
        (
            "f = open('unclosed.txt', 'w'); f.write('kept')",
            Some("print(open('unclosed.txt').read())"),
        ),
        (
            "import gzip; g = gzip.open('z.gz', 'wt'); g.write('zipped')",
            Some("import gzip; print(gzip.open('z.gz', 'rt').read())"),
        ),
        (
            "import sys, io; sys.stdout = io.TextIOWrapper(open(1, 'wb', closefd=False)); print('rewrapped', end='')",
            None,
        ),
    ];
    for (code, check) in cases {
        let mut seen = Vec::new();
        for (sb, expect_warm) in [(&warm, true), (&cold, false)] {
            // Let the renewed warm interpreter finish starting.
            sb.agent()
                .await_warm(Duration::from_secs(30))
                .await
                .expect("the warm interpreter is renewed");
            let out = run_job(
                sb,
                JobId::random(),
                py,
                &spec("python", code),
                expect_warm,
                &mut (),
            )
            .await;
            assert_eq!(out.warm, expect_warm, "{code}");
            let r = out.result;
            let mut facts = vec![
                format!("{:?} {:?} {:?}", r.outcome, r.exit_code, r.signal),
                r.stdout,
                r.stderr,
            ];
            if let Some(c) = check {
                let after = run_job(
                    sb,
                    JobId::random(),
                    py,
                    &spec("python", c),
                    expect_warm,
                    &mut (),
                )
                .await
                .result;
                facts.push(format!(
                    "{:?} {} {}",
                    after.outcome, after.stdout, after.stderr
                ));
            }
            seen.push(facts);
        }
        assert_eq!(
            seen[0], seen[1],
            "warm (left) and plain (right) differ for {code:?}"
        );
    }
    warm.destroy().await;
    cold.destroy().await;
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

/// The agent starts inside its group in every hierarchy (on v1 the spawning
/// thread joins the group for the clone and goes back), and no thread of
/// this process is left in any sandbox's group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_starts_inside_its_group_and_the_spawner_goes_home() {
    let env = Env::new("cg-home");
    let before = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let mut sandboxes = Vec::new();
    for _ in 0..4 {
        let sb = env.sandbox("bash").await;
        sandboxes.push(sb);
    }
    for sb in &sandboxes {
        let cg = sb.cgroup().expect("a jail has a group");
        for dir in cg.dirs() {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
            let pids: Vec<i32> = procs.lines().map(|l| l.parse().unwrap()).collect();
            assert!(
                pids.contains(&sb.pid()),
                "agent {} not in {}: {pids:?}",
                sb.pid(),
                dir.display()
            );
        }
    }
    let name = env.scope.cgroup_parent.clone();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let cg = std::fs::read_to_string(task.unwrap().path().join("cgroup")).unwrap_or_default();
        assert!(
            !cg.contains(&name),
            "a thread stayed in a sandbox group: {cg}"
        );
    }
    assert_eq!(
        std::fs::read_to_string("/proc/self/cgroup").unwrap(),
        before
    );
    for sb in sandboxes {
        sb.destroy().await;
    }
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

/// Files, exec and stdin go to the agent in one write. When a file cannot
/// be placed, the exec that already started is killed (it may have
/// finished first), the result names the file, and the sandbox serves the
/// next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_cannot_be_placed_stops_the_job_and_names_the_file() {
    let env = Env::new("bad-file");
    let table = RuntimeTable::default();
    let py = table.resolve("python").unwrap();
    let sb = env.sandbox("python").await;
    let mut s = spec("python", "print('ran')");
    // `data` is a file, so `data/x.txt` cannot be created under it.
    for path in ["data", "data/x.txt"] {
        s.files.push(kiln_protocol::File {
            path: path.into(),
            content: b"x".to_vec(),
            executable: false,
        });
    }
    let out = run_job(&sb, JobId::random(), py, &s, true, &mut ()).await;
    assert_eq!(out.result.outcome, Outcome::Internal, "{:?}", out.result);
    let msg = out.result.message.clone().unwrap_or_default();
    assert!(msg.contains("data/x.txt"), "{msg}");
    assert!(!out.poisoned, "the agent is fine: {:?}", out.result);
    sb.agent()
        .await_warm(Duration::from_secs(30))
        .await
        .expect("the warm interpreter is renewed");
    let next = run_job(
        &sb,
        JobId::random(),
        py,
        &spec("python", "print(2)"),
        true,
        &mut (),
    )
    .await;
    assert_eq!(next.result.outcome, Outcome::Ok, "{:?}", next.result);
    assert_eq!(next.result.stdout, "2\n");
    sb.destroy().await;
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

/// Runs `code` with `runtime` in `sb` and returns its stdout, requiring
/// outcome ok.
async fn run_ok(sb: &Jail, runtime: &str, code: &str, warm_next: bool) -> (String, bool) {
    let table = RuntimeTable::default();
    let rt = table.resolve(runtime).unwrap();
    let out = run_job(
        sb,
        JobId::random(),
        rt,
        &spec(runtime, code),
        warm_next,
        &mut (),
    )
    .await;
    assert_eq!(out.result.outcome, Outcome::Ok, "{code}: {:?}", out.result);
    (out.result.stdout, out.warm)
}

/// Waits (bounded) until the sandbox's next Python exec is warm, with a
/// harmless probe.
async fn until_warm(sb: &Jail) {
    for _ in 0..100 {
        if run_ok(sb, "python", "pass", true).await.1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no warm interpreter within 5 s");
}

/// Every kind of trace a job can leave: files in the three writable
/// places, a System V segment, a port in TIME_WAIT, a detached process,
/// and 96 MiB of memory touched (the cgroup's peak).
const LITTER: &str = r#"
import os, socket, subprocess
for d in ("/work", "/tmp", "/dev/shm"):
    open(d + "/left.txt", "w").write("x")
subprocess.run(["ipcmk", "-M", "4096"], check=True, stdout=subprocess.DEVNULL)
srv = socket.socket(); srv.bind(("127.0.0.1", 47012)); srv.listen()
cli = socket.create_connection(("127.0.0.1", 47012))
conn, _ = srv.accept(); conn.close(); cli.close(); srv.close()
subprocess.Popen(["sleep", "600"], start_new_session=True)
block = bytearray(96 << 20)
print("littered")
"#;

/// Reports each trace `LITTER` leaves, one line each.
const INSPECT: &str = r#"
import os, socket, subprocess
for d in ("/work", "/tmp", "/dev/shm"):
    print(d, os.path.exists(d + "/left.txt"))
print("shm", subprocess.run(["ipcs", "-m"], capture_output=True, text=True).stdout.count("0x"))
print("sleepers", sum(1 for p in os.listdir("/proc") if p.isdigit() and b"sleep" in open("/proc/%s/cmdline" % p, "rb").read()))
s = socket.socket()
try:
    s.bind(("127.0.0.1", 47012)); print("bind ok")
except OSError as e:
    print("bind", e.errno)
"#;

const CLEAN: &str = "/work False\n/tmp False\n/dev/shm False\nshm 0\nsleepers 0\nbind ok\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_sandbox_serves_the_next_job_with_nothing_of_the_last() {
    let env = Env::new("reset");
    let sb = env.sandbox("python").await;
    until_warm(&sb).await;
    assert_eq!(run_ok(&sb, "python", LITTER, true).await.0, "littered\n");
    // Without a reset the next job sees it all (the inspection can fail).
    let (seen, _) = run_ok(&sb, "python", INSPECT, true).await;
    assert_eq!(
        seen,
        "/work True\n/tmp True\n/dev/shm True\nshm 1\nsleepers 1\nbind 98\n"
    );
    let peak_before = sb.memory_peak_bytes().unwrap();
    assert!(peak_before > 96 << 20, "{peak_before}");
    // Seen from the host: the detached sleeper is in the jail's cgroup.
    let sleepers = || {
        sb.cgroup()
            .unwrap()
            .procs()
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.starts_with(b"sleep"))
            })
            .count()
    };
    assert_eq!(sleepers(), 1);

    sb.reset().await.unwrap();
    assert_eq!(sleepers(), 0, "killed with the room");
    assert!(
        sb.memory_peak_bytes().unwrap() < 64 << 20,
        "the peak starts over: {:?}",
        sb.memory_peak_bytes()
    );
    until_warm(&sb).await;
    let (seen, warm) = run_ok(&sb, "python", INSPECT, true).await;
    assert!(warm);
    assert_eq!(seen, CLEAN, "warm, after the reset");
    sb.reset().await.unwrap();
    let (seen, warm) = run_ok(
        &sb,
        "bash",
        &format!("python3 - <<'EOF'\n{INSPECT}\nEOF"),
        false,
    )
    .await;
    assert!(!warm);
    assert_eq!(seen, CLEAN, "cold, after another reset");
    sb.destroy().await;
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

/// What a job process is allowed, from its own /proc/self/status, and what
/// it can see of other processes.
const PRIVILEGES: &str = r#"
import os
status = dict(l.split(":", 1) for l in open("/proc/self/status"))
for k in ("Uid", "CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp", "Seccomp_filters"):
    print(k, " ".join(status[k].split()))
print("procs", len([p for p in os.listdir("/proc") if p.isdigit()]))
print("oom", open("/proc/self/oom_score_adj").read().strip())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_in_a_room_have_no_privileges_warm_or_cold_before_and_after_resets() {
    let env = Env::new("privileges");
    let sb = env.sandbox("python").await;
    let want = |procs: usize| {
        format!(
            "Uid 1000 1000 1000 1000\nCapEff 0000000000000000\nCapPrm 0000000000000000\nCapBnd 0000000000000000\nCapAmb 0000000000000000\nNoNewPrivs 1\nSeccomp 2\nSeccomp_filters 3\nprocs {procs}\noom 1000\n"
        )
    };
    for round in 0..3 {
        until_warm(&sb).await;
        // The room holds its holder and the job: nothing of the jail.
        let (warm, _) = run_ok(&sb, "python", PRIVILEGES, true).await;
        assert_eq!(warm, want(2), "warm, round {round}");
        let (cold, _) = run_ok(
            &sb,
            "bash",
            &format!("exec python3 - <<'EOF'\n{PRIVILEGES}\nEOF"),
            false,
        )
        .await;
        // The warm interpreter waiting for the next job is in the room too.
        assert_eq!(cold, want(3), "cold, round {round}");
        sb.reset().await.unwrap();
    }
    sb.destroy().await;
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

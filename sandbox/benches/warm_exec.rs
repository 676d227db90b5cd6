//! Warm exec latency and idle memory of one jail sandbox with Python
//! pre-warmed: `print(1)` through [`kiln_sandbox::run_job`] with
//! `warm_next = true`, timed from the call to the result. Between runs the
//! sandbox idles (`--idle-ms`, 100 ms by default) so that the replacement
//! interpreter has finished starting and every timed exec is a true warm
//! exec; runs that were not warm are counted and reported, not hidden.
//!
//! Memory of the idle sandbox: all processes of its cgroup (the agent and
//! the warm interpreter), sampled 20 times over 1 s; the maxima of the sums
//! of VmRSS, VmHWM and Pss are reported.
//!
//! A second series drives the agent protocol directly (PutFile, Exec,
//! stdin close, frames) to show where a warm exec's time goes: the PutFile
//! round trip, Exec to Started, Started to the first Stdout, Stdout to Exit,
//! and the agent's own `wall_us` (job handed to the interpreter to its exit).
//!
//! `cargo build --release --bins && cargo bench -p kiln-sandbox --bench
//! warm_exec -- --runs 300 [--idle-ms 100] [--json-out FILE]` (as root).

mod common;

use std::time::{Duration, Instant};

use common::{backend, histogram, memory_of, print_row, summary, Flags, Memory};
use hdrhistogram::Histogram;
use kiln_protocol::{ExecRequest, Frame, JobId, JobSpec, Limits, Outcome};
use kiln_sandbox::jail::Jail;
use kiln_sandbox::{run_job, Backend as _, Sandbox as _, SandboxSpec};

fn idle_memory(jail: &Jail) -> (Memory, u64) {
    let mut peak = Memory::default();
    let mut cgroup_bytes = 0;
    for _ in 0..20 {
        let pids = jail.cgroup().map(|c| c.procs()).unwrap_or_default();
        let m = memory_of(&pids);
        peak.processes = peak.processes.max(m.processes);
        peak.rss_kib = peak.rss_kib.max(m.rss_kib);
        peak.hwm_kib = peak.hwm_kib.max(m.hwm_kib);
        peak.pss_kib = peak.pss_kib.max(m.pss_kib);
        cgroup_bytes = cgroup_bytes.max(jail.stats().memory_bytes);
        std::thread::sleep(Duration::from_millis(50));
    }
    (peak, cgroup_bytes)
}

/// Where a warm exec's time goes, by protocol phase (microsecond histograms).
struct Phases {
    put: Histogram<u64>,
    to_started: Histogram<u64>,
    to_stdout: Histogram<u64>,
    to_exit: Histogram<u64>,
    agent_wall: Histogram<u64>,
    total: Histogram<u64>,
}

async fn phases(jail: &Jail, runs: usize, idle: Duration) -> Phases {
    let mut p = Phases {
        put: histogram(),
        to_started: histogram(),
        to_stdout: histogram(),
        to_exit: histogram(),
        agent_wall: histogram(),
        total: histogram(),
    };
    let us = |d: Duration| (d.as_micros() as u64).max(1);
    let agent = jail.agent();
    for _ in 0..runs {
        tokio::time::sleep(idle).await;
        let t0 = Instant::now();
        agent
            .put_file("main.py", b"print(1)\n".to_vec(), 0o644)
            .await
            .expect("put_file");
        let t1 = Instant::now();
        let req = ExecRequest {
            tag: 0,
            runtime: "python".into(),
            entrypoint: "main.py".into(),
            args: Vec::new(),
            env: Default::default(),
            output_limit: 1 << 20,
            warm_next: true,
        };
        let (_, mut exec) = agent.start_job(Vec::new(), req, &[]).await.expect("exec");
        let (mut started, mut stdout, mut warm) = (None, None, false);
        loop {
            match exec.next().await {
                Some(Frame::Started(s)) => {
                    started = Some(Instant::now());
                    warm = s.warm;
                }
                Some(Frame::Stdout { .. }) => stdout = stdout.or(Some(Instant::now())),
                Some(Frame::Exit(x)) => {
                    let t4 = Instant::now();
                    let (Some(t2), Some(t3)) = (started, stdout) else {
                        break;
                    };
                    if warm {
                        p.put.saturating_record(us(t1 - t0));
                        p.to_started.saturating_record(us(t2 - t1));
                        p.to_stdout.saturating_record(us(t3 - t2));
                        p.to_exit.saturating_record(us(t4 - t3));
                        p.agent_wall.saturating_record(x.wall_us.max(1));
                        p.total.saturating_record(us(t4 - t0));
                    }
                    break;
                }
                Some(_) => {}
                None => panic!("agent connection lost"),
            }
        }
    }
    p
}

fn main() {
    let flags = Flags::parse(300);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let backend = backend();
    let table = common::runtimes();
    let python = table.resolve("python").expect("python runtime").clone();
    let job = JobSpec::inline("python", "print(1)");
    let load_before = common::load_average();
    rt.block_on(async {
        let jail = backend
            .create(&SandboxSpec::for_job(&Limits::default(), "python"))
            .await
            .expect("creating the sandbox");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (fresh, fresh_cg) = idle_memory(&jail);

        let mut h = histogram();
        let mut samples_ms = Vec::new();
        let mut not_warm = 0;
        let mut failed = 0;
        for _ in 0..flags.runs {
            tokio::time::sleep(flags.idle).await;
            let t = Instant::now();
            let out = run_job(&jail, JobId::random(), &python, &job, true, &mut ()).await;
            let us = t.elapsed().as_micros() as u64;
            if out.result.outcome != Outcome::Ok || out.result.stdout != "1\n" {
                failed += 1;
                eprintln!("run failed: {:?}", out.result);
                continue;
            }
            if !out.warm {
                not_warm += 1;
                continue;
            }
            h.saturating_record(us.max(1));
            samples_ms.push(us as f64 / 1000.0);
        }
        let ph = phases(&jail, (flags.runs / 2).max(1), flags.idle).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (after, after_cg) = idle_memory(&jail);
        jail.destroy().await;

        let load_after = common::load_average();
        println!("warm exec of print(1), one sandbox, {} ms idle between runs", flags.idle.as_millis());
        print_row("warm exec (run_job)", &h);
        println!("runs not warm (excluded): {not_warm}; failed: {failed}");
        println!("breakdown over the protocol (warm runs only):");
        print_row("  PutFile round trip", &ph.put);
        print_row("  Exec -> Started", &ph.to_started);
        print_row("  Started -> first Stdout", &ph.to_stdout);
        print_row("  first Stdout -> Exit", &ph.to_exit);
        print_row("  agent wall_us", &ph.agent_wall);
        print_row("  total", &ph.total);
        for (name, m, cg) in [("idle, fresh sandbox", fresh, fresh_cg), ("idle, after the runs", after, after_cg)] {
            println!(
                "{name:<28} {} processes: VmRSS {:.1} MiB, VmHWM {:.1} MiB, Pss {:.1} MiB; cgroup memory {:.1} MiB",
                m.processes,
                m.rss_kib as f64 / 1024.0,
                m.hwm_kib as f64 / 1024.0,
                m.pss_kib as f64 / 1024.0,
                cg as f64 / 1048576.0
            );
        }
        println!("load average: before {load_before}, after {load_after}");
        let mem = |m: Memory, cg: u64| {
            serde_json::json!({"processes": m.processes, "rss_kib": m.rss_kib, "hwm_kib": m.hwm_kib,
                               "pss_kib": m.pss_kib, "cgroup_bytes": cg})
        };
        common::write_json(
            &flags,
            &serde_json::json!({
                "bench": "warm_exec",
                "idle_ms": flags.idle.as_millis() as u64,
                "warm_exec_ms": summary(&h),
                "samples_ms": samples_ms,
                "not_warm": not_warm,
                "breakdown_ms": {
                    "put_file": summary(&ph.put),
                    "exec_to_started": summary(&ph.to_started),
                    "started_to_stdout": summary(&ph.to_stdout),
                    "stdout_to_exit": summary(&ph.to_exit),
                    "agent_wall": summary(&ph.agent_wall),
                    "total": summary(&ph.total),
                },
                "failed": failed,
                "memory_idle_fresh": mem(fresh, fresh_cg),
                "memory_idle_after": mem(after, after_cg),
                "load_before": load_before,
                "load_after": load_after,
            }),
        );
    });
}

//! Numbers, not assertions: the idle memory of an agent with a warm Python,
//! how long `print(1)` takes from Exec to Exit, warm and cold, and what a
//! room's reset costs. Run with
//! `cargo test -p kiln-agent --release --test measure -- --ignored --nocapture`.

mod common;

use std::time::{Duration, Instant};

use std::path::{Path, PathBuf};

use common::{children, exec_request, vm_rss_kb, Host, TempDir};
use kiln_protocol::{Frame, RuntimeTable, DEFAULT_RUNTIMES_TOML};

fn median_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

#[test]
#[ignore = "a measurement: run with --release --ignored --nocapture"]
fn idle_memory_and_print_latency_warm_vs_cold() {
    println!("with the built-in runtime table:");
    measure(RuntimeTable::default(), "python", "p.py", "print(1)\n");
    // runpy.run_path imports pkgutil (and typing) lazily, i.e. after the job
    // arrived; importing it in the warm prelude takes that off the path.
    let toml = DEFAULT_RUNTIMES_TOML.replace(
        "import os, sys, json, runpy\n",
        "import os, sys, json, runpy, pkgutil\n",
    );
    assert_ne!(toml, DEFAULT_RUNTIMES_TOML);
    println!("with pkgutil imported by the warm prelude:");
    measure(
        RuntimeTable::from_toml(&toml).unwrap(),
        "python",
        "p.py",
        "print(1)\n",
    );
    println!("node, built-in table:");
    measure(RuntimeTable::default(), "node", "p.js", "console.log(1)\n");
}

fn measure(runtimes: RuntimeTable, runtime: &str, file: &str, code: &str) {
    let mut h = Host::start();
    let mut hello = h.hello_frame(&[runtime]);
    hello.runtimes = runtimes;
    h.send(&Frame::Hello(hello));
    assert!(matches!(h.recv(), Frame::HelloAck(_)));
    std::thread::sleep(Duration::from_millis(500));
    let agent = h.child.id();
    let kids = children(agent);
    let agent_kb = vm_rss_kb(agent);
    let kids_kb: u64 = kids.iter().map(|&p| vm_rss_kb(p)).sum();
    println!(
        "  idle RSS: agent {agent_kb} KiB + warm {runtime} {kids_kb} KiB ({} process) = {} KiB",
        kids.len(),
        agent_kb + kids_kb
    );

    h.put(file, 0o644, code.as_bytes());
    let mut warm = Vec::new();
    let mut cold = Vec::new();
    for i in 0..50 {
        // Let the replacement interpreter finish starting, as it would
        // between requests in a pool.
        std::thread::sleep(Duration::from_millis(120));
        let tag = h.tag();
        let mut req = exec_request(tag, runtime, file);
        req.warm_next = true;
        let t = Instant::now();
        let run = h.run(req, None);
        warm.push(t.elapsed());
        assert!(run.warm || i == 0, "run {i} was not warm");
        assert_eq!(run.stdout(), "1\n");
    }
    // Cold: no warm interpreter left (warm_next false empties the slot).
    let tag = h.tag();
    let _ = h.run(exec_request(tag, runtime, file), None);
    for _ in 0..50 {
        let tag = h.tag();
        let t = Instant::now();
        let run = h.run(exec_request(tag, runtime, file), None);
        cold.push(t.elapsed());
        assert!(!run.warm);
        assert_eq!(run.stdout(), "1\n");
    }
    println!(
        "  {code:?} Exec->Exit median of 50: warm {:.2} ms, cold {:.2} ms",
        median_ms(warm),
        median_ms(cold),
        code = code.trim()
    );
}

/// Clock ticks of CPU (user + system) of a process, its own and its reaped
/// children's.
fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<u64> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|x| x.parse().unwrap())
        .collect();
    (f[0] + f[1], f[2] + f[3])
}

#[test]
#[ignore = "a measurement: run with --release --ignored --nocapture"]
fn reset_latency_in_rooms() {
    // KILN_MEASURE_AGENTS="old=/path/to/kiln-agent new=/other/kiln-agent:N"
    // compares builds (interleaved rounds), `:N` sending Python's
    // `zygote_max_uses = N` (a build that knows it); the built agent
    // otherwise.
    let agents: Vec<(String, PathBuf, RuntimeTable)> = match std::env::var("KILN_MEASURE_AGENTS") {
        Ok(list) => list
            .split_whitespace()
            .map(|a| {
                let (name, path) = a.split_once('=').expect("NAME=PATH[:N]");
                let (path, table) = match path.split_once(':') {
                    Some((path, n)) => {
                        let toml: String = DEFAULT_RUNTIMES_TOML
                            .lines()
                            .filter(|l| !l.starts_with("zygote_max_uses"))
                            .map(|l| match l {
                                "zygote = true" => format!("{l}\nzygote_max_uses = {n}\n"),
                                _ => format!("{l}\n"),
                            })
                            .collect();
                        (path, RuntimeTable::from_toml(&toml).unwrap())
                    }
                    None => {
                        // Without the setting (which an older build refuses).
                        let toml: String = DEFAULT_RUNTIMES_TOML
                            .lines()
                            .filter(|l| !l.starts_with("zygote_max_uses"))
                            .map(|l| format!("{l}\n"))
                            .collect();
                        (path, RuntimeTable::from_toml(&toml).unwrap())
                    }
                };
                (name.to_owned(), PathBuf::from(path), table)
            })
            .collect(),
        Err(_) => vec![(
            "built".to_owned(),
            PathBuf::from(env!("CARGO_BIN_EXE_kiln-agent")),
            RuntimeTable::default(),
        )],
    };
    let (rounds, per_round) = (5, 100);
    let mut resets: Vec<Vec<Duration>> = vec![Vec::new(); agents.len()];
    let mut jobs: Vec<Vec<Duration>> = vec![Vec::new(); agents.len()];
    let mut cpu: Vec<(u64, u64)> = vec![(0, 0); agents.len()];
    for round in 0..rounds {
        for (i, (name, agent, table)) in agents.iter().enumerate() {
            let workdir = TempDir::new_in(Path::new("/run"), "room-work");
            let mut h = Host::start_binary(agent, &[]);
            let hello = h.rooms_hello_frame(table.clone(), &["python"], workdir.path(), vec![]);
            h.send(&Frame::Hello(hello));
            assert!(matches!(h.recv(), Frame::HelloAck(_)));
            std::thread::sleep(Duration::from_millis(500));
            let agent_pid = h.child.id();
            let before = cpu_ticks(agent_pid);
            for _ in 0..per_round {
                h.put("p.py", 0o644, b"print(1)\n");
                let tag = h.tag();
                let t = Instant::now();
                let run = h.run(exec_request(tag, "python", "p.py"), None);
                jobs[i].push(t.elapsed());
                assert_eq!(run.stdout(), "1\n");
                let t = Instant::now();
                assert!(matches!(h.reset(), Frame::Ack { .. }));
                resets[i].push(t.elapsed());
                // A pool's sandbox idles between leases.
                std::thread::sleep(Duration::from_millis(20));
            }
            let after = cpu_ticks(agent_pid);
            cpu[i].0 += after.0 - before.0;
            cpu[i].1 += after.1 - before.1;
            println!("  round {round} {name} done");
        }
    }
    let hz = 100.0; // USER_HZ
    let n = (rounds * per_round) as f64;
    for (i, (name, _, _)) in agents.iter().enumerate() {
        println!(
            "{name}: Reset->Ack median {:.3} ms, Exec->Exit median {:.3} ms, agent CPU {:.0} us per job+reset (its reaped children: {:.0} us)",
            median_ms(resets[i].clone()),
            median_ms(jobs[i].clone()),
            cpu[i].0 as f64 / hz / n * 1e6,
            cpu[i].1 as f64 / hz / n * 1e6,
        );
    }
}

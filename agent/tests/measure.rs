//! Numbers, not assertions: the idle memory of an agent with a warm Python,
//! and how long `print(1)` takes from Exec to Exit, warm and cold. Run with
//! `cargo test -p kiln-agent --release --test measure -- --ignored --nocapture`.

mod common;

use std::time::{Duration, Instant};

use common::{children, exec_request, vm_rss_kb, Host};
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

//! Sandbox creation time of the jail backend: `JailBackend::create` with
//! Python to pre-warm, timed until it returns (namespaces, cgroup, mounts,
//! agent start and the Hello/HelloAck handshake done; the agent then warms
//! Python in the background). Each sandbox is destroyed before the next one
//! is created; destruction is timed separately. Also reported: this
//! process's own CPU time (utime+stime, all threads, children excluded) per
//! create+destroy cycle, i.e. the host-side cost of a sandbox's life.
//!
//! `cargo build --release --bins && cargo bench -p kiln-sandbox --bench
//! create -- --runs 300 [--json-out FILE]` (as root).

mod common;

use std::time::{Duration, Instant};

use common::{backend, histogram, print_row, summary, Flags};
use kiln_protocol::Limits;
use kiln_sandbox::{Backend as _, Sandbox as _, SandboxSpec};

fn main() {
    let flags = Flags::parse(300);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let backend = backend();
    let spec = SandboxSpec::for_job(&Limits::default(), "python");
    let load_before = common::load_average();
    let cpu_before = common::own_cpu_us();
    rt.block_on(async {
        let mut create = histogram();
        let mut samples_ms = Vec::new();
        let mut destroy = histogram();
        let mut failed = 0;
        for _ in 0..flags.runs {
            let t = Instant::now();
            let jail = match backend.create(&spec).await {
                Ok(j) => j,
                Err(e) => {
                    failed += 1;
                    eprintln!("create failed: {e}");
                    continue;
                }
            };
            let us = (t.elapsed().as_micros() as u64).max(1);
            create.saturating_record(us);
            samples_ms.push(us as f64 / 1000.0);
            // Let the warm start happen, as it would in a pool, so that the
            // next creation does not compete with it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let t = Instant::now();
            jail.destroy().await;
            destroy.saturating_record((t.elapsed().as_micros() as u64).max(1));
        }
        let load_after = common::load_average();
        let cycles = create.len().max(1);
        let cpu_us_per_cycle = (common::own_cpu_us() - cpu_before) as f64 / cycles as f64;
        println!("jail sandbox creation (python to pre-warm)");
        print_row("create (until HelloAck)", &create);
        print_row("destroy", &destroy);
        println!("host-side CPU (this process, children excluded): {cpu_us_per_cycle:.0} us per create+destroy");
        println!("failed: {failed}; load average: before {load_before}, after {load_after}");
        common::write_json(
            &flags,
            &serde_json::json!({
                "bench": "create",
                "create_ms": summary(&create),
                "samples_ms": samples_ms,
                "destroy_ms": summary(&destroy),
                "failed": failed,
                "host_cpu_us_per_cycle": cpu_us_per_cycle,
                "load_before": load_before,
                "load_after": load_after,
            }),
        );
    });
}

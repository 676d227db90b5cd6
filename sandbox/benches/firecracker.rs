//! Per-sandbox costs of the Firecracker layer on a real Firecracker with
//! Kiln's test guest, directly and under the jailer: process start to API
//! ready, the configuration calls, `InstanceStart`, boot to the guest's
//! first line, and teardown; the VMM's memory per idle sandbox (RSS and
//! PSS of the Firecracker process, split into guest memory and the VMM's
//! own); and snapshot load to a running guest with the `File` backend and
//! with `Uffd` through Kiln's page server, lazy and prefetching a recorded
//! working set (then the time the guest takes to read 256 pattern pages,
//! where the backends differ).
//!
//! `KILN_FIRECRACKER_BIN=... KILN_JAILER_BIN=... cargo bench -p
//! kiln-sandbox --bench firecracker -- --runs 30 [--json-out FILE]` (as
//! root).

mod common;
#[path = "../tests/firecracker_harness/mod.rs"]
mod harness;

use std::fs;
use std::time::{Duration, Instant};

use common::{histogram, load_average, print_row, summary, Flags};
use hdrhistogram::Histogram;
use kiln_sandbox::firecracker::{FirecrackerVm, MemoryBackend, RestoreSpec, Snapshot};
use kiln_snapshotter::{PageServer, PageServerConfig, ServeMode, SnapshotSource};
use kiln_test_guest::Command;

/// Idle sandboxes measured together for memory.
const IDLE_VMS: usize = 10;
const PAGES: u64 = 256;
const SEED: u64 = 99;

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

struct Boot {
    api_ready: Histogram<u64>,
    configure: Histogram<u64>,
    instance_start: Histogram<u64>,
    to_guest_line: Histogram<u64>,
    teardown: Histogram<u64>,
}

async fn boots(scope: &harness::Scope, jailed: bool, runs: usize) -> Boot {
    let mut b = Boot {
        api_ready: histogram(),
        configure: histogram(),
        instance_start: histogram(),
        to_guest_line: histogram(),
        teardown: histogram(),
    };
    let config = scope.config(jailed);
    let spec = scope.boot_spec(harness::small());
    for _ in 0..runs {
        let t = Instant::now();
        let vm = FirecrackerVm::start(&config, &spec).await.expect("boot");
        harness::ready(&vm).await;
        record(&mut b.to_guest_line, t.elapsed());
        let timings = vm.boot_timings().expect("boot timings");
        record(&mut b.api_ready, timings.api_ready);
        record(&mut b.configure, timings.configure);
        record(&mut b.instance_start, timings.instance_start);
        let t = Instant::now();
        let report = vm.destroy().await;
        record(&mut b.teardown, t.elapsed());
        assert!(report.is_clean(), "{report:?}");
    }
    b
}

/// KiB of `key` summed over the mappings of `/proc/<pid>/smaps`, split into
/// the guest's RAM and everything else. Firecracker maps the RAM as one
/// anonymous mapping a little larger than it (measured: 131204 KiB for a
/// 128 MiB guest), which is how it is told apart.
fn smaps(pid: u32, guest_kib: u64, key: &str) -> (u64, u64) {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut guest, mut rest) = (0, 0);
    let mut in_guest = false;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Size:"), Some(kib)) => {
                in_guest = kib
                    .parse::<u64>()
                    .is_ok_and(|k| (guest_kib..guest_kib + 1024).contains(&k))
            }
            (Some(k), Some(kib)) if k.strip_suffix(':') == Some(key) => {
                let kib: u64 = kib.parse().unwrap_or(0);
                if in_guest {
                    guest += kib;
                } else {
                    rest += kib;
                }
            }
            _ => {}
        }
    }
    (guest, rest)
}

async fn idle_memory(scope: &harness::Scope, jailed: bool) -> serde_json::Value {
    let config = scope.config(jailed);
    let spec = scope.boot_spec(harness::small());
    let mut vms = Vec::new();
    for _ in 0..IDLE_VMS {
        let vm = FirecrackerVm::start(&config, &spec).await.expect("boot");
        harness::ready(&vm).await;
        vms.push(vm);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let guest_kib = harness::small().memory_mib * 1024;
    let (mut rss_guest, mut rss_vmm, mut pss_guest, mut pss_vmm) = (0, 0, 0, 0);
    for vm in &vms {
        let (g, v) = smaps(vm.pid(), guest_kib, "Rss");
        rss_guest += g;
        rss_vmm += v;
        let (g, v) = smaps(vm.pid(), guest_kib, "Pss");
        pss_guest += g;
        pss_vmm += v;
    }
    let n = vms.len() as u64;
    for vm in vms {
        assert!(vm.destroy().await.is_clean());
    }
    let per = |kib: u64| kib as f64 / n as f64 / 1024.0;
    println!(
        "idle memory per sandbox ({}, {n} VMs): RSS {:.2} MiB (guest {:.2} + VMM {:.2}), PSS {:.2} MiB (guest {:.2} + VMM {:.2})",
        if jailed { "jailed" } else { "direct" },
        per(rss_guest + rss_vmm),
        per(rss_guest),
        per(rss_vmm),
        per(pss_guest + pss_vmm),
        per(pss_guest),
        per(pss_vmm),
    );
    serde_json::json!({
        "vms": n,
        "rss_mib": per(rss_guest + rss_vmm), "rss_guest_mib": per(rss_guest), "rss_vmm_mib": per(rss_vmm),
        "pss_mib": per(pss_guest + pss_vmm), "pss_guest_mib": per(pss_guest), "pss_vmm_mib": per(pss_vmm),
    })
}

struct Restores {
    api_ready: Histogram<u64>,
    load: Histogram<u64>,
    to_running: Histogram<u64>,
    pattern: Histogram<u64>,
    /// Per restore through the page server: faults it served, pages it
    /// prefetched, and how long the prefetch took (microseconds).
    faults: Vec<u64>,
    prefetched: Vec<u64>,
    prefetch_us: Vec<u64>,
}

async fn restores(
    config: &kiln_sandbox::firecracker::FirecrackerConfig,
    snapshot: &Snapshot,
    backend: MemoryBackend,
    server: &PageServer,
    runs: usize,
) -> Restores {
    let mut r = Restores {
        api_ready: histogram(),
        load: histogram(),
        to_running: histogram(),
        pattern: histogram(),
        faults: Vec::new(),
        prefetched: Vec::new(),
        prefetch_us: Vec::new(),
    };
    let spec = RestoreSpec {
        snapshot: snapshot.clone(),
        backend,
        resume: true,
        cpu_millis: 0,
    };
    for _ in 0..runs {
        let t = Instant::now();
        let vm = FirecrackerVm::restore(config, &spec)
            .await
            .expect("restore");
        harness::ask(&vm, Command::Echo("up".into())).await;
        record(&mut r.to_running, t.elapsed());
        let timings = vm.restore_timings().expect("restore timings");
        record(&mut r.api_ready, timings.api_ready);
        record(&mut r.load, timings.load);
        let t = Instant::now();
        harness::assert_pattern(&vm, SEED, PAGES).await;
        record(&mut r.pattern, t.elapsed());
        if let Some(live) = server
            .restores()
            .into_iter()
            .find(|l| l.vmm_pid == vm.pid() as i32)
        {
            r.faults.push(live.metrics.faults_served);
            r.prefetched.push(live.metrics.prefetch_pages);
            r.prefetch_us.push(live.metrics.prefetch_ns / 1000);
        }
        assert!(vm.destroy().await.is_clean());
    }
    r
}

fn median(v: &[u64]) -> Option<u64> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

fn main() {
    let flags = Flags::parse(30);
    let (firecracker, jailer) = harness::binaries()
        .unwrap_or_else(|why| panic!("the Firecracker benchmark needs Firecracker: {why}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let load_before = load_average();
    let started = Instant::now();
    let scope = harness::Scope::new("bench", firecracker, jailer);
    let out = rt.block_on(async {
        let mut out = serde_json::json!({});
        for jailed in [false, true] {
            let name = if jailed { "jailed" } else { "direct" };
            let b = boots(&scope, jailed, flags.runs).await;
            println!("boot, {name} (test guest, 1 vCPU, 128 MiB)");
            print_row("  spawn to API ready", &b.api_ready);
            print_row("  configuration calls", &b.configure);
            print_row("  InstanceStart", &b.instance_start);
            print_row("  start() to guest's line", &b.to_guest_line);
            print_row("  teardown", &b.teardown);
            out[name] = serde_json::json!({
                "api_ready": summary(&b.api_ready),
                "configure": summary(&b.configure),
                "instance_start": summary(&b.instance_start),
                "to_guest_line": summary(&b.to_guest_line),
                "teardown": summary(&b.teardown),
                "idle_memory": idle_memory(&scope, jailed).await,
            });
        }

        // One snapshot of a guest that wrote its pattern.
        let vm = FirecrackerVm::start(&scope.config(false), &scope.boot_spec(harness::small()))
            .await
            .expect("boot");
        harness::ready(&vm).await;
        harness::write_pattern(&vm, SEED, PAGES).await;
        let snapshot = vm
            .snapshot(&scope.dir.join("snapshots/bench"))
            .await
            .expect("snapshot");
        assert!(vm.destroy().await.is_clean());
        let server = PageServer::with_config(PageServerConfig {
            socket_mode: 0o666,
            ..PageServerConfig::default()
        })
        .expect("page server");
        let lazy = scope.page_socket("lazy.sock");
        let rec = scope.page_socket("record.sock");
        let pre = scope.page_socket("prefetch.sock");
        for (socket, mode) in [(&lazy, ServeMode::Lazy), (&rec, ServeMode::Record)] {
            server
                .listen(socket, SnapshotSource::new(&snapshot.memory, mode))
                .expect("listen");
        }
        let config = scope.config(false);
        // The recording restore writes the working set the prefetch uses.
        restores(
            &config,
            &snapshot,
            MemoryBackend::Uffd { socket: rec },
            &server,
            1,
        )
        .await;
        let ws = kiln_snapshotter::working_set::default_path(&snapshot.memory);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ws.is_file() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
            .listen(
                &pre,
                SnapshotSource::new(&snapshot.memory, ServeMode::Prefetch),
            )
            .expect("listen");
        for (name, backend) in [
            ("file", MemoryBackend::File),
            (
                "uffd_lazy",
                MemoryBackend::Uffd {
                    socket: lazy.clone(),
                },
            ),
            (
                "uffd_prefetch",
                MemoryBackend::Uffd {
                    socket: pre.clone(),
                },
            ),
        ] {
            let r = restores(&config, &snapshot, backend, &server, flags.runs).await;
            println!("restore, {name} (direct; the guest's pattern: {PAGES} pages)");
            print_row("  spawn to API ready", &r.api_ready);
            print_row("  snapshot/load (+resume)", &r.load);
            print_row("  restore() to guest answer", &r.to_running);
            print_row("  guest reads its pattern", &r.pattern);
            if let (Some(f), Some(p), Some(us)) = (
                median(&r.faults),
                median(&r.prefetched),
                median(&r.prefetch_us),
            ) {
                println!(
                    "  page server (medians): {f} faults served, {p} pages prefetched in {us} µs"
                );
            }
            out[name] = serde_json::json!({
                "api_ready": summary(&r.api_ready),
                "load": summary(&r.load),
                "to_running": summary(&r.to_running),
                "pattern": summary(&r.pattern),
                "faults_served_p50": median(&r.faults),
                "prefetched_pages_p50": median(&r.prefetched),
                "prefetch_us_p50": median(&r.prefetch_us),
            });
        }
        out
    });
    let mut out = out;
    out["runs"] = flags.runs.into();
    out["load_before"] = load_before.clone().into();
    out["load_after"] = load_average().into();
    println!(
        "runs {} each; load {load_before} -> {}; took {:.0} s",
        flags.runs,
        load_average(),
        started.elapsed().as_secs_f64()
    );
    common::write_json(&flags, &out);
    drop(scope);
}

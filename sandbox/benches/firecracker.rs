//! Per-sandbox costs of the Firecracker layer on a real Firecracker with
//! Kiln's test guest, directly and under the jailer: process start to API
//! ready, the configuration calls, `InstanceStart`, boot to the guest's
//! first line, and teardown; the VMM's memory per idle sandbox (RSS and
//! PSS of the Firecracker process, split into guest memory and the VMM's
//! own).
//!
//! Then one snapshot restored side by side (each run restores once from
//! every source in turn) with the `File` backend, with `Uffd` through
//! Kiln's page server, lazy and prefetching a recorded working set, and
//! with `Uffd` through Firecracker's example on-demand handler (one process
//! per restore): load to a running guest, the guest reading its 256
//! pattern pages, the page server's CPU per restore and per fault (Kiln's
//! from its per-restore thread CPU counter, the handler's from its
//! process's scheduler runtime), faults recorded vs replayed, and restores
//! per second per core (restores back to back, divided by the CPU this
//! process and its reaped children used).
//!
//! `KILN_FIRECRACKER_BIN=... KILN_JAILER_BIN=... cargo bench -p
//! kiln-sandbox --bench firecracker -- --runs 30 [--restores-only]
//! [--json-out FILE]` (as root). The handler is `KILN_UFFD_HANDLER_BIN`,
//! else `uffd_on_demand_handler` next to the Firecracker binary; without
//! it that variant is skipped with a printed reason.

mod common;
#[path = "../tests/firecracker_harness/mod.rs"]
mod harness;

use std::fs;
use std::path::{Path, PathBuf};
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

/// Where a restore's memory comes from.
#[derive(Clone)]
enum Source {
    /// Firecracker's `File` backend (a private mapping of the memory file).
    File,
    /// Kiln's page server listening on this socket.
    Kiln(PathBuf),
    /// Firecracker's example on-demand handler at this path, one process
    /// per restore (it serves the first connection it accepts).
    Handler(PathBuf),
}

/// The example handler's path: `KILN_UFFD_HANDLER_BIN`, or
/// `uffd_on_demand_handler` next to the Firecracker binary.
const HANDLER_VAR: &str = "KILN_UFFD_HANDLER_BIN";

fn handler_bin(firecracker: &Path) -> Result<PathBuf, String> {
    let path = std::env::var_os(HANDLER_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| firecracker.with_file_name("uffd_on_demand_handler"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is not a file (set {HANDLER_VAR} to Firecracker's example uffd_on_demand_handler)",
            path.display()
        ))
    }
}

/// `/proc/self/task/<tid>` of the page server's thread serving restore
/// `id` (it is named `kiln-uffd-<id>`).
fn serving_thread(id: u64) -> Option<String> {
    let name = format!("kiln-uffd-{id}");
    fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .find(|t| fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name))
        .map(|t| t.path().display().to_string())
}

/// Nanoseconds the task (a process's or a thread's `/proc` directory) has
/// run on a CPU: its `schedstat` (for a process, summed over its threads).
fn task_runtime_ns(dir: &str) -> u64 {
    let read = |p: PathBuf| {
        fs::read_to_string(p)
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
    };
    match fs::read_dir(format!("{dir}/task")) {
        Ok(tasks) => tasks
            .flatten()
            .filter_map(|t| read(t.path().join("schedstat")))
            .sum(),
        Err(_) => read(PathBuf::from(dir).join("schedstat")).unwrap_or(0),
    }
}

/// Nanoseconds the process has run on a CPU: the first field of
/// `/proc/<pid>/task/<tid>/schedstat` (the scheduler's exact runtime),
/// summed over its threads.
fn process_runtime_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Minor faults of the process so far (`/proc/<pid>/stat`, field 10).
fn minor_faults(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    after
        .split_whitespace()
        .nth(7)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn timeval_ns(tv: libc::timeval) -> u64 {
    tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1000
}

/// User + system CPU of `who` (`RUSAGE_SELF` or `RUSAGE_CHILDREN`) in ns.
fn rusage_ns(who: libc::c_int) -> u64 {
    // SAFETY: an all-zero rusage is valid; getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is valid and writable for the call.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0;
    }
    timeval_ns(ru.ru_utime) + timeval_ns(ru.ru_stime)
}

/// One example handler process serving one restore.
struct Handler {
    child: std::process::Child,
    socket: PathBuf,
    /// CPU it used to start, bind and wait for the VMM (ns).
    startup_ns: u64,
}

impl Handler {
    async fn start(bin: &Path, socket: PathBuf, memory: &Path, log: &Path) -> Self {
        let _ = fs::remove_file(&socket);
        let log = fs::File::create(log).expect("handler log");
        let child = std::process::Command::new(bin)
            .arg(&socket)
            .arg(memory)
            // Not cargo's search path for the benchmark's own libraries.
            .env_remove("LD_LIBRARY_PATH")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let deadline = Instant::now() + harness::HOST;
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the example handler did not bind {}",
                socket.display()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let startup_ns = process_runtime_ns(child.id());
        Self {
            child,
            socket,
            startup_ns,
        }
    }

    /// Kills and reaps the handler; its total CPU (user + system, ns) from
    /// `wait4`'s resource usage.
    fn finish(self) -> u64 {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: `pid` is our unreaped child; kill has no memory effects.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: as above; `status` and `ru` are valid for writing.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: see above.
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        assert_eq!(reaped, pid, "wait4 on the example handler");
        let _ = fs::remove_file(&self.socket);
        timeval_ns(ru.ru_utime) + timeval_ns(ru.ru_stime)
    }
}

#[derive(Default)]
struct Restores {
    api_ready: Vec<Duration>,
    load: Vec<Duration>,
    to_running: Vec<Duration>,
    pattern: Vec<Duration>,
    /// Per restore: guest pages resident in the VMM after the pattern read
    /// (the pages installed, from smaps), faults the page server served
    /// (Kiln's count), pages prefetched, prefetch wall time (µs), page
    /// server CPU for the whole restore (ns; the example handler's up to
    /// the VMM's teardown, its process start included), and the example
    /// handler's CPU spent before the VMM connected (ns).
    resident_pages: Vec<u64>,
    faults: Vec<u64>,
    prefetched: Vec<u64>,
    prefetch_us: Vec<u64>,
    server_cpu_ns: Vec<u64>,
    handler_startup_ns: Vec<u64>,
    /// The example handler's CPU after its VMM exited, until killed (ns).
    handler_after_exit_ns: Vec<u64>,
    /// Minor page faults the example handler took itself (its own mapping
    /// of the memory file is new in every process).
    handler_minflt: Vec<u64>,
    /// Around the pattern read: the page server's CPU (Kiln's serving
    /// thread or the handler's process, from schedstat, ns) and the guest
    /// pages that came resident (each one a fault served).
    window_cpu_ns: Vec<u64>,
    window_faults: Vec<u64>,
}

impl Restores {
    fn hist(v: &[Duration]) -> Histogram<u64> {
        let mut h = histogram();
        for d in v {
            record(&mut h, *d);
        }
        h
    }
}

/// One restore from `source` to the guest answering (and, with `pattern`,
/// reading its pattern back), then teardown; what was measured goes to `r`.
#[allow(clippy::too_many_arguments)]
async fn restore_once(
    scope: &harness::Scope,
    config: &kiln_sandbox::firecracker::FirecrackerConfig,
    snapshot: &Snapshot,
    source: &Source,
    server: &PageServer,
    pattern: bool,
    n: usize,
    r: &mut Restores,
) {
    let handler = match source {
        Source::Handler(bin) => Some(
            Handler::start(
                bin,
                scope.page_socket(&format!("handler-{n}.sock")),
                &snapshot.memory,
                &scope.dir.join(format!("handler-{n}.log")),
            )
            .await,
        ),
        _ => None,
    };
    let backend = match (source, &handler) {
        (Source::File, _) => MemoryBackend::File,
        (Source::Kiln(socket), _) => MemoryBackend::Uffd {
            socket: socket.clone(),
        },
        (Source::Handler(_), Some(h)) => MemoryBackend::Uffd {
            socket: h.socket.clone(),
        },
        (Source::Handler(_), None) => unreachable!(),
    };
    let spec = RestoreSpec {
        snapshot: snapshot.clone(),
        backend,
        resume: true,
        cpu_millis: 0,
    };
    let last_report = server.recent_restores().last().map(|r| r.id);
    let t = Instant::now();
    let vm = FirecrackerVm::restore(config, &spec)
        .await
        .expect("restore");
    harness::ask(&vm, Command::Echo("up".into())).await;
    r.to_running.push(t.elapsed());
    let timings = vm.restore_timings().expect("restore timings");
    r.api_ready.push(timings.api_ready);
    r.load.push(timings.load);
    let guest_kib = harness::small().memory_mib * 1024;
    let resident = || smaps(vm.pid(), guest_kib, "Rss").0 / (page_size() / 1024);
    if pattern {
        // The serving thread's (or handler process's) scheduler runtime
        // around the pattern read: the same clock for both servers, over a
        // window that holds nothing but faults (no handshake, no start-up).
        let server_task = match (source, &handler) {
            (Source::Kiln(_), _) => server
                .restores()
                .into_iter()
                .find(|l| l.vmm_pid == vm.pid() as i32)
                .and_then(|l| serving_thread(l.id.0)),
            (Source::Handler(_), Some(h)) => Some(format!("/proc/{}", h.child.id())),
            _ => None,
        };
        let before = server_task.as_deref().map(task_runtime_ns);
        let pages_before = resident();
        let t = Instant::now();
        harness::assert_pattern(&vm, SEED, PAGES).await;
        r.pattern.push(t.elapsed());
        if let (Some(task), Some(before)) = (&server_task, before) {
            r.window_cpu_ns.push(task_runtime_ns(task) - before);
            r.window_faults.push(resident() - pages_before);
        }
    }
    r.resident_pages.push(resident());
    // The example handler's CPU now, while its VMM lives: once the VMM
    // exits it spins on the hung-up socket until killed, which is not
    // serving and is left out (kept apart as `handler_after_exit_ns`).
    let handler_serving = handler.as_ref().map(|h| process_runtime_ns(h.child.id()));
    if let Some(h) = &handler {
        r.handler_minflt.push(minor_faults(h.child.id()));
    }
    let pid = vm.pid() as i32;
    assert!(vm.destroy().await.is_clean());
    match (source, handler, handler_serving) {
        (Source::Kiln(_), _, _) => {
            // The restore ends when its VMM exits; its report has the final
            // counters, the CPU time among them.
            let deadline = Instant::now() + harness::HOST;
            let report = loop {
                let found = server
                    .recent_restores()
                    .into_iter()
                    .find(|x| x.vmm_pid == Some(pid) && Some(x.id) > last_report);
                if let Some(found) = found {
                    break found;
                }
                assert!(Instant::now() < deadline, "no page server report for {pid}");
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            r.faults.push(report.metrics.faults_served);
            r.prefetched.push(report.metrics.prefetch_pages);
            r.prefetch_us.push(report.metrics.prefetch_ns / 1000);
            r.server_cpu_ns.push(report.metrics.cpu_ns);
        }
        (Source::Handler(_), Some(h), Some(serving)) => {
            r.handler_startup_ns.push(h.startup_ns);
            r.server_cpu_ns.push(serving);
            let total = h.finish();
            r.handler_after_exit_ns.push(total.saturating_sub(serving));
        }
        _ => {}
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

fn median(v: &[u64]) -> Option<u64> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// Per-restore ratios `num[i] / den[i]` (skipping zero denominators), median.
fn median_ratio(num: &[u64], den: &[u64]) -> Option<f64> {
    let mut v: Vec<f64> = num
        .iter()
        .zip(den)
        .filter(|(_, d)| **d > 0)
        .map(|(n, d)| *n as f64 / *d as f64)
        .collect();
    v.sort_by(f64::total_cmp);
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
        let boots_measured: &[bool] = if flags.restores_only {
            &[]
        } else {
            &[false, true]
        };
        for &jailed in boots_measured {
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
        let mut recorded = Restores::default();
        restore_once(
            &scope,
            &config,
            &snapshot,
            &Source::Kiln(rec),
            &server,
            true,
            0,
            &mut recorded,
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
        let mut variants = vec![
            ("file", Source::File),
            ("uffd_lazy", Source::Kiln(lazy.clone())),
            ("uffd_prefetch", Source::Kiln(pre.clone())),
        ];
        match handler_bin(&scope.firecracker) {
            Ok(bin) => variants.push(("example_handler", Source::Handler(bin))),
            Err(why) => println!("SKIPPED the example handler: {why}"),
        }
        let recorded_faults = recorded.faults[0];
        println!(
            "recording restore: {recorded_faults} faults served, {} guest pages resident",
            recorded.resident_pages[0]
        );
        out["recorded_faults"] = recorded_faults.into();

        // Side by side: each run restores once from every source in turn,
        // so that the machine's load falls on all of them alike.
        let mut results: Vec<Restores> = variants.iter().map(|_| Restores::default()).collect();
        let mut n = 1;
        for _ in 0..flags.runs {
            for ((_, source), r) in variants.iter().zip(&mut results) {
                restore_once(&scope, &config, &snapshot, source, &server, true, n, r).await;
                n += 1;
            }
        }
        for ((name, _), r) in variants.iter().zip(&results) {
            println!("restore, {name} (direct; the guest's pattern: {PAGES} pages)");
            print_row("  spawn to API ready", &Restores::hist(&r.api_ready));
            print_row("  snapshot/load (+resume)", &Restores::hist(&r.load));
            print_row("  restore() to guest answer", &Restores::hist(&r.to_running));
            print_row("  guest reads its pattern", &Restores::hist(&r.pattern));
            let resident = median(&r.resident_pages);
            println!("  guest pages resident after the read (median): {resident:?}");
            let per_fault_ns = if r.faults.is_empty() {
                // The handler does not count: every page it installed is one
                // fault served (it serves single pages, no prefetch).
                let serving: Vec<u64> = r
                    .server_cpu_ns
                    .iter()
                    .zip(&r.handler_startup_ns)
                    .map(|(t, s)| t.saturating_sub(*s))
                    .collect();
                median_ratio(&serving, &r.resident_pages)
            } else {
                median_ratio(&r.server_cpu_ns, &r.faults)
            };
            // Only where faults were served (not with prefetch).
            let window_ns = median(&r.window_faults)
                .filter(|f| *f > 0)
                .and(median_ratio(&r.window_cpu_ns, &r.window_faults));
            if let Some(ns) = window_ns {
                println!(
                    "  page server CPU per fault while the guest reads (median): {:.1} µs ({:?} faults)",
                    ns / 1000.0,
                    median(&r.window_faults)
                );
            }
            if !r.server_cpu_ns.is_empty() {
                println!(
                    "  page server CPU per restore (median): {:.0} µs{}; per fault, whole restore less start-up: {}",
                    median(&r.server_cpu_ns).unwrap_or(0) as f64 / 1000.0,
                    median(&r.handler_startup_ns).map_or(String::new(), |s| format!(
                        " (of which process start {:.0} µs)",
                        s as f64 / 1000.0
                    )),
                    per_fault_ns.map_or("-".into(), |ns| format!("{:.1} µs", ns / 1000.0)),
                );
            }
            if let Some(minflt) = median(&r.handler_minflt) {
                println!("  the handler's own minor faults (median): {minflt}");
            }
            if let (Some(f), Some(p), Some(us)) = (
                median(&r.faults),
                median(&r.prefetched),
                median(&r.prefetch_us),
            ) {
                println!(
                    "  page server (medians): {f} faults served, {p} pages prefetched in {us} µs"
                );
            }
            out[*name] = serde_json::json!({
                "api_ready": summary(&Restores::hist(&r.api_ready)),
                "load": summary(&Restores::hist(&r.load)),
                "to_running": summary(&Restores::hist(&r.to_running)),
                "pattern": summary(&Restores::hist(&r.pattern)),
                "resident_pages_p50": resident,
                "faults_served_p50": median(&r.faults),
                "prefetched_pages_p50": median(&r.prefetched),
                "prefetch_us_p50": median(&r.prefetch_us),
                "server_cpu_us_p50": median(&r.server_cpu_ns).map(|ns| ns as f64 / 1000.0),
                "handler_startup_us_p50": median(&r.handler_startup_ns).map(|ns| ns as f64 / 1000.0),
                "handler_minflt_p50": median(&r.handler_minflt),
                "handler_after_exit_us_p50": median(&r.handler_after_exit_ns).map(|ns| ns as f64 / 1000.0),
                "server_cpu_per_fault_whole_restore_us_p50": per_fault_ns.map(|ns| ns / 1000.0),
                "server_cpu_per_fault_window_us_p50": window_ns.map(|ns| ns / 1000.0),
                "window_faults_p50": median(&r.window_faults),
            });
        }
        // Paired per run: the lazy restore and the handler's restore ran
        // one after the other, under the same load.
        let per_fault = |name: &str| -> Vec<f64> {
            variants
                .iter()
                .zip(&results)
                .find(|((n, _), _)| *n == name)
                .map(|(_, r)| {
                    r.window_cpu_ns
                        .iter()
                        .zip(&r.window_faults)
                        .map(|(c, f)| *c as f64 / (*f).max(1) as f64 / 1000.0)
                        .collect()
                })
                .unwrap_or_default()
        };
        let (kiln, handler) = (per_fault("uffd_lazy"), per_fault("example_handler"));
        if !kiln.is_empty() && kiln.len() == handler.len() {
            let mut ratios: Vec<f64> = kiln.iter().zip(&handler).map(|(k, h)| k / h).collect();
            ratios.sort_by(f64::total_cmp);
            let below = kiln.iter().zip(&handler).filter(|(k, h)| k < h).count();
            println!(
                "CPU per fault during the read, Kiln lazy / example handler, paired by run: median ratio {:.2}; Kiln lower in {below} of {} runs",
                ratios[ratios.len() / 2],
                ratios.len()
            );
            out["per_fault_window_us"] = serde_json::json!({
                "kiln_lazy": kiln,
                "example_handler": handler,
                "median_ratio": ratios[ratios.len() / 2],
                "kiln_lower_runs": below,
            });
        }
        if let Some(replayed) = results
            .iter()
            .zip(&variants)
            .find(|(_, (name, _))| *name == "uffd_prefetch")
            .and_then(|(r, _)| median(&r.faults))
        {
            let fewer = 100.0 * (1.0 - replayed as f64 / recorded_faults.max(1) as f64);
            println!(
                "faults per restore: recorded {recorded_faults}, replayed (prefetch, median) {replayed}: {fewer:.1}% fewer (target >= 90%)"
            );
            out["replayed_faults_p50"] = replayed.into();
            out["faults_fewer_percent"] = fewer.into();
        }

        // Throughput: restores back to back (restore, guest answers,
        // teardown; no pattern read), CPU of this process (Kiln's client and
        // page server) and of its reaped children (the VMMs, the example
        // handlers) over the batch.
        for (name, source) in &variants {
            let mut r = Restores::default();
            let (self0, kids0) = (rusage_ns(libc::RUSAGE_SELF), rusage_ns(libc::RUSAGE_CHILDREN));
            let t = Instant::now();
            for _ in 0..flags.runs {
                restore_once(&scope, &config, &snapshot, source, &server, false, n, &mut r).await;
                n += 1;
            }
            let wall = t.elapsed().as_secs_f64();
            let own = rusage_ns(libc::RUSAGE_SELF) - self0;
            // Less the example handlers' spinning after their VMM exited.
            let kids = (rusage_ns(libc::RUSAGE_CHILDREN) - kids0)
                .saturating_sub(r.handler_after_exit_ns.iter().sum::<u64>());
            let cpu = (own + kids) as f64 / 1e9;
            let runs = flags.runs as f64;
            println!(
                "throughput, {name}: {} restores in {wall:.2} s ({:.1}/s, one at a time); CPU {:.1} ms per restore (Kiln's process {:.1}, VMM{} {:.1}); {:.1} restores/s per core",
                flags.runs,
                runs / wall,
                cpu * 1000.0 / runs,
                own as f64 / 1e6 / runs,
                if matches!(source, Source::Handler(_)) { "s + handlers" } else { "s" },
                kids as f64 / 1e6 / runs,
                runs / cpu,
            );
            out[format!("{name}_throughput")] = serde_json::json!({
                "restores": flags.runs,
                "wall_s": wall,
                "cpu_ms_per_restore": cpu * 1000.0 / runs,
                "own_cpu_ms_per_restore": own as f64 / 1e6 / runs,
                "children_cpu_ms_per_restore": kids as f64 / 1e6 / runs,
                "page_server_cpu_us_p50": median(&r.server_cpu_ns).map(|ns| ns as f64 / 1000.0),
                "resident_pages_p50": median(&r.resident_pages),
                "faults_served_p50": median(&r.faults),
                "restores_per_s_per_core": runs / cpu,
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

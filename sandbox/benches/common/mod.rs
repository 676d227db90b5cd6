//! What the jail benchmarks share: a backend of their own (own state
//! directory and cgroup parent, the release agent), percentiles, memory
//! readings from /proc, and a tiny flag parser (`cargo bench` passes
//! `--bench` to harness-less programs; it is ignored).

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use hdrhistogram::Histogram;
use kiln_protocol::RuntimeTable;
use kiln_sandbox::jail::{JailBackend, JailConfig};
use kiln_sandbox::Backend as _;

/// Flags: `--runs N`, `--idle-ms N`, `--json-out FILE`, `--restores-only`
/// (the Firecracker benchmark: skip boots and idle memory), `--rate-mbit N`
/// (the network benchmark).
pub struct Flags {
    pub runs: usize,
    pub idle: Duration,
    pub json_out: Option<PathBuf>,
    pub restores_only: bool,
    /// A bandwidth limit to measure (the network benchmark).
    pub rate_mbit: u32,
}

impl Flags {
    pub fn parse(default_runs: usize) -> Self {
        let mut f = Self {
            runs: default_runs,
            idle: Duration::from_millis(100),
            json_out: None,
            restores_only: false,
            rate_mbit: 100,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .unwrap_or_else(|| panic!("{name} needs a value"))
            };
            match a.as_str() {
                "--runs" => f.runs = value("--runs").parse().expect("--runs N"),
                "--idle-ms" => {
                    f.idle = Duration::from_millis(value("--idle-ms").parse().expect("--idle-ms N"))
                }
                "--json-out" => f.json_out = Some(value("--json-out").into()),
                "--restores-only" => f.restores_only = true,
                "--rate-mbit" => f.rate_mbit = value("--rate-mbit").parse().expect("--rate-mbit N"),
                "--bench" => {}
                other => {
                    panic!("unknown flag {other}; known: --runs N --idle-ms N --json-out FILE --restores-only --rate-mbit N")
                }
            }
        }
        f
    }
}

/// The runtime table: the built-in one, or the TOML file named by
/// `KILN_RUNTIMES` (to measure a changed warm start without rebuilding).
pub fn runtimes() -> RuntimeTable {
    match std::env::var_os("KILN_RUNTIMES") {
        None => RuntimeTable::default(),
        Some(p) => {
            let text = std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("reading KILN_RUNTIMES={}: {e}", p.to_string_lossy()));
            eprintln!("runtimes: {}", p.to_string_lossy());
            RuntimeTable::from_toml(&text).expect("KILN_RUNTIMES is a valid runtime table")
        }
    }
}

/// The release agent (or `KILN_AGENT`), and a backend whose sandboxes live
/// under their own state directory and cgroup parent.
pub fn backend() -> JailBackend {
    backend_with(|_| {})
}

/// [`backend`] with the configuration changed by `change` first.
pub fn backend_with(change: impl FnOnce(&mut JailConfig)) -> JailBackend {
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the jail benchmarks need root"
    );
    let agent = std::env::var_os("KILN_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/kiln-agent")
        });
    assert!(
        agent.is_file(),
        "{} is missing: run `cargo build --release --bins` first (or set KILN_AGENT)",
        agent.display()
    );
    eprintln!("agent: {}", agent.display());
    let mut cfg = JailConfig::new(agent, runtimes());
    cfg.state_dir = PathBuf::from("/run/kiln-bench");
    cfg.cgroup_parent = "kiln-bench".into();
    change(&mut cfg);
    let b = JailBackend::new(cfg).expect("jail backend");
    let _ = b.reap_orphans();
    b
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds")
}

/// Percentiles of a histogram of microseconds, in milliseconds, as JSON.
pub fn summary(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |us: u64| us as f64 / 1000.0;
    serde_json::json!({
        "count": h.len(),
        "min": ms(h.min()),
        "p50": ms(h.value_at_quantile(0.5)),
        "p90": ms(h.value_at_quantile(0.9)),
        "p99": ms(h.value_at_quantile(0.99)),
        "max": ms(h.max()),
        "mean": h.mean() / 1000.0,
    })
}

pub fn print_row(name: &str, h: &Histogram<u64>) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "{name:<28} n={:<5} min {:>8.3}  p50 {:>8.3}  p90 {:>8.3}  p99 {:>8.3}  max {:>8.3} ms",
        h.len(),
        ms(h.min()),
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.9)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    );
}

/// A `kB` figure from a /proc key-value file.
fn kib(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let rest = l.strip_prefix(key)?.strip_prefix(':')?;
                rest.trim().trim_end_matches("kB").trim().parse().ok()
            })
        })
        .unwrap_or(0)
}

/// Memory of a set of processes, KiB: sums of VmRSS, VmHWM (each
/// process's own peak RSS) and Pss (shared pages divided among users).
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub processes: usize,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub pss_kib: u64,
}

pub fn memory_of(pids: &[i32]) -> Memory {
    let mut m = Memory {
        processes: pids.len(),
        ..Memory::default()
    };
    for p in pids {
        m.rss_kib += kib(&format!("/proc/{p}/status"), "VmRSS");
        m.hwm_kib += kib(&format!("/proc/{p}/status"), "VmHWM");
        m.pss_kib += kib(&format!("/proc/{p}/smaps_rollup"), "Pss");
    }
    m
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn write_json(flags: &Flags, v: &serde_json::Value) {
    if let Some(p) = &flags.json_out {
        std::fs::write(p, serde_json::to_string_pretty(v).expect("json") + "\n")
            .unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    }
}

/// utime + stime of this process (all threads, children excluded), in
/// microseconds, from /proc/self/stat (fields 14 and 15, in clock ticks).
pub fn own_cpu_us() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    ticks * 1_000_000 / hz
}

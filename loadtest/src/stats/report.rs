//! The report of a run: its JSON shape (`--json-out`, read back by
//! `--compare`, versioned by [`REPORT_VERSION`]) and its text rendering.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::cold::{ColdSplit, Part};
use super::series::{Cdfs, Timeline};

/// Version of the JSON report. Raised when a field changes meaning or goes
/// away; added fields do not raise it (readers ignore what they do not
/// know). Version 1 is the first that carries it.
pub const REPORT_VERSION: u32 = 1;

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// `None` for an empty histogram.
    pub(crate) fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Self {
            count: h.len(),
            min: ms(h.min()),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        })
    }
}

/// Job and request counters of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    /// Jobs whose ending was recorded.
    pub jobs: u64,
    /// Jobs that ran (a JobResult came back / the program exited).
    pub ran: u64,
    /// Jobs that ran with outcome `ok` (and the expected stdout, if given).
    pub ok: u64,
    /// Jobs that ran but whose stdout differed from `--expect-stdout`.
    pub stdout_mismatch: u64,
    /// 429 answers received (a retried job may meet several).
    pub http_429: u64,
    /// Jobs given up after a 429 (`--on-429 count`).
    pub throttled_jobs: u64,
    /// Jobs answered with another non-200 status.
    pub http_other: u64,
    /// Jobs whose answer was not a JobResult.
    pub bad_body: u64,
    /// Jobs lost to transport, publish, spawn or timeout failures.
    pub failed: u64,
    /// Jobs still in flight when the drain timeout ended the run.
    pub abandoned: u64,
    /// Results by how the sandbox was acquired (`timings.acquire`).
    pub acquire_warm: u64,
    pub acquire_cold: u64,
    pub acquire_unknown: u64,
}

/// How the run was set up, echoed into the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    /// `"http"`, `"amqp"` or `"spawn"`.
    pub target: String,
    /// The URL (and queue), or the command line spawned per job.
    pub endpoint: String,
    /// `"closed"` or `"open"`.
    pub loop_kind: String,
    pub concurrency: Option<usize>,
    pub rate_per_s: Option<f64>,
    pub arrivals: Option<String>,
    pub requests: u64,
    pub duration_limit_s: f64,
    pub warmup: u64,
    pub cold: bool,
    pub on_429: String,
    /// Unix time at the start of the measured phase.
    pub started_unix_s: f64,
    /// 1-minute load average of the host at the start.
    pub load_average_1m: Option<f64>,
    /// Whether the open loop ever waited for an in-flight slot (its
    /// latencies still count from the intended send time).
    pub in_flight_cap_hit: bool,
}

/// The server's own timings from `JobResult.timings`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerTimings {
    pub queued: Option<Percentiles>,
    pub acquire: Option<Percentiles>,
    pub run: Option<Percentiles>,
    pub total: Option<Percentiles>,
}

/// CPU and memory of the server process (`--server-pid`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServerUsage {
    pub pid: i32,
    /// utime+stime of the process itself (all threads, children
    /// excluded) over the measured phase.
    pub cpu_ms: f64,
    /// `cpu_ms` over the jobs that ran, in microseconds.
    pub cpu_us_per_job: Option<f64>,
    /// VmRSS of the server process at the end, KiB.
    pub rss_kib: u64,
    /// Sum of VmRSS and of Pss over the server and all its descendants
    /// (the sandboxes) at the end, KiB.
    pub tree_rss_kib: u64,
    pub tree_pss_kib: u64,
    pub tree_processes: usize,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// [`REPORT_VERSION`] of the writer.
    pub report_version: u32,
    /// The kiln-loadtest that wrote it.
    #[serde(default)]
    pub tool_version: String,
    pub run: RunInfo,
    pub elapsed_s: f64,
    /// Jobs that ran, per second of the measured phase.
    pub throughput_per_s: f64,
    /// Jobs with outcome `ok`, per second.
    pub ok_per_s: f64,
    pub counts: Counts,
    /// Jobs that ran, by outcome.
    pub outcomes: BTreeMap<String, u64>,
    /// Non-200, non-429 statuses.
    pub other_statuses: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    /// End-to-end latency of the jobs that ran.
    pub latency_ms: Option<Percentiles>,
    /// The same, split by `timings.acquire`.
    pub latency_warm_ms: Option<Percentiles>,
    pub latency_cold_ms: Option<Percentiles>,
    pub server_ms: ServerTimings,
    /// The cold-start split by how the sandbox was made (`boot`,
    /// `restore`): cold jobs whose result carries `timings.sandbox`.
    #[serde(default)]
    pub cold_start: BTreeMap<String, ColdSplit>,
    /// The latency CDFs the plots draw.
    #[serde(default)]
    pub latency_cdf_ms: Cdfs,
    /// Latency by send time, for the latency-over-time plot.
    #[serde(default)]
    pub timeline: Timeline,
    pub server: Option<ServerUsage>,
}

const HEAD: [&str; 8] = ["count", "min", "p50", "p90", "p99", "p99.9", "max", "mean"];

fn percentile_row(s: &mut String, name: &str, p: &Percentiles) {
    let _ = writeln!(
        s,
        "{name:<18} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
        p.count, p.min, p.p50, p.p90, p.p99, p.p999, p.max, p.mean
    );
}

fn header_row(s: &mut String, first: &str) {
    let _ = write!(s, "{first:<18}");
    for (i, h) in HEAD.iter().enumerate() {
        let w = if i == 0 { 7 } else { 9 };
        let _ = write!(s, " {h:>w$}");
    }
    s.push('\n');
}

impl Report {
    /// A human-readable summary.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let r = &self.run;
        let _ = writeln!(s, "target   {} {}", r.target, r.endpoint);
        let _ = writeln!(
            s,
            "load     {}{}{}",
            r.shape(),
            if r.cold { ", cold requested" } else { "" },
            match r.load_average_1m {
                Some(l) => format!(", host load {l:.2}"),
                None => String::new(),
            }
        );
        let c = &self.counts;
        let _ = writeln!(
            s,
            "jobs     {} in {:.2} s: {} ran ({:.1}/s), {} ok ({:.1}/s)",
            c.jobs, self.elapsed_s, c.ran, self.throughput_per_s, c.ok, self.ok_per_s
        );
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(s, "outcomes {}", outcomes.join(", "));
        let _ = writeln!(
            s,
            "problems 429s {} (jobs given up {}), other status {}, bad body {}, failed {}, abandoned {}, stdout mismatch {}",
            c.http_429, c.throttled_jobs, c.http_other, c.bad_body, c.failed, c.abandoned, c.stdout_mismatch
        );
        if r.target != "spawn" {
            let _ = writeln!(
                s,
                "acquire  warm {}, cold {}, unreported {}",
                c.acquire_warm, c.acquire_cold, c.acquire_unknown
            );
        }
        for (k, v) in &self.errors {
            let _ = writeln!(s, "  error x{v}: {k}");
        }
        header_row(&mut s, "ms");
        let rows = [
            ("end-to-end", &self.latency_ms),
            ("  acquire=warm", &self.latency_warm_ms),
            ("  acquire=cold", &self.latency_cold_ms),
            ("server queued", &self.server_ms.queued),
            ("server acquire", &self.server_ms.acquire),
            ("server run", &self.server_ms.run),
            ("server total", &self.server_ms.total),
        ];
        for (name, p) in rows {
            if let Some(p) = p {
                percentile_row(&mut s, name, p);
            }
        }
        for (how, split) in &self.cold_start {
            s.push('\n');
            let _ = writeln!(
                s,
                "cold starts ({how}), jobs {}: each part of the end-to-end latency (means add up, percentiles do not)",
                split.jobs
            );
            let mut head = String::new();
            header_row(&mut head, "ms");
            let _ = writeln!(s, "{}  share", head.trim_end());
            percentile_row(&mut s, "end-to-end", &split.end_to_end_ms);
            for part in Part::ALL {
                let p = split.part(part);
                let share = if split.end_to_end_ms.mean > 0.0 {
                    format!(" {:>5.1}%", 100.0 * p.mean / split.end_to_end_ms.mean)
                } else {
                    String::new()
                };
                let mut row = String::new();
                percentile_row(&mut row, &format!("  {}", part.label(how)), p);
                let _ = writeln!(s, "{}{share}", row.trim_end());
            }
        }
        if let Some(u) = &self.server {
            let _ = writeln!(
                s,
                "server   pid {}: cpu {:.1} ms ({} per job), rss {} KiB; with descendants ({} processes): rss {} KiB, pss {} KiB",
                u.pid,
                u.cpu_ms,
                u.cpu_us_per_job
                    .map_or("-".into(), |v| format!("{v:.0} us")),
                u.rss_kib,
                u.tree_processes,
                u.tree_rss_kib,
                u.tree_pss_kib
            );
        }
        s
    }
}

impl RunInfo {
    /// "closed loop, concurrency 4" or "open loop, 20/s poisson arrivals".
    pub fn shape(&self) -> String {
        match (self.concurrency, self.rate_per_s) {
            (Some(c), _) => format!("closed loop, concurrency {c}"),
            (None, Some(rate)) => format!(
                "open loop, {rate}/s {} arrivals",
                self.arrivals.as_deref().unwrap_or("?")
            ),
            _ => self.loop_kind.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Ending, Recorder, Sample};
    use kiln_protocol::{Acquire, Outcome, SandboxStart, SandboxTimings, Timings};
    use std::time::Duration;

    #[test]
    fn the_report_round_trips_through_json_and_renders_the_cold_split() {
        let mut r = Recorder::default();
        r.add(&Sample {
            sent: Duration::ZERO,
            latency: Duration::from_millis(40),
            ending: Ending::Ran {
                outcome: Outcome::Ok,
                timings: Some(Timings {
                    queued_ms: 0.5,
                    acquire_ms: 21.0,
                    acquire: Some(Acquire::Cold),
                    run_ms: 12.0,
                    total_ms: 36.0,
                    sandbox: Some(SandboxTimings {
                        how: SandboxStart::Restore,
                        start_ms: 14.0,
                        connect_ms: 1.0,
                        setup_ms: 5.0,
                    }),
                }),
                stdout_ok: true,
            },
            throttled: 0,
        });
        let rep = r.report(crate::stats::tests::info(), Duration::from_secs(1), None);
        let text = serde_json::to_string(&rep).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back.report_version, REPORT_VERSION);
        assert_eq!(back.cold_start, rep.cold_start);
        assert_eq!(back.timeline, rep.timeline);
        let out = rep.render();
        assert!(out.contains("cold starts (restore), jobs 1"), "{out}");
        assert!(out.contains("  start (restore)"), "{out}");
        assert!(out.contains("  transport"), "{out}");
    }
}

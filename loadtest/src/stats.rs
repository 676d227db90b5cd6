//! What a run measured: one [`Sample`] per job, folded into HDR histograms
//! and counters by a [`Recorder`], and summarised as a [`Report`] (JSON for
//! machines, [`Report::render`] for people).
//!
//! Latencies are kept in microseconds with three significant digits, which
//! is HDR's usual precision and far finer than the noise of a shared host.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use kiln_protocol::{Acquire, Outcome, Timings};
use serde::Serialize;

/// Largest latency a histogram holds: one hour, in microseconds. Longer
/// values are clamped (they would be failures of the run anyway).
const MAX_US: u64 = 3_600_000_000;

/// How one job ended, as seen by the load generator.
#[derive(Debug, Clone)]
pub enum Ending {
    /// The job ran: a `JobResult` came back (HTTP 200), or the spawned
    /// program exited.
    Ran {
        outcome: Outcome,
        /// The server's own timings (HTTP only).
        timings: Option<Timings>,
        /// Whether stdout matched `--expect-stdout` (true when unchecked).
        stdout_ok: bool,
    },
    /// The server answered 429 and the job was not retried.
    Throttled,
    /// Any other HTTP status.
    Status(u16),
    /// A 200 whose body was not a `JobResult`.
    BadBody(String),
    /// Connection, spawn or timeout failure.
    Failed(String),
}

/// One job: its ending, its end-to-end latency (measured from the
/// intended send time, so that a stalled server cannot hide its queue), and
/// how many 429s it met on the way.
#[derive(Debug, Clone)]
pub struct Sample {
    pub latency: Duration,
    pub ending: Ending,
    pub throttled: u32,
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
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

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("static bounds are valid")
}

fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, MAX_US));
}

fn ms_to_us(ms: f64) -> u64 {
    if ms.is_finite() && ms > 0.0 {
        (ms * 1000.0).round() as u64
    } else {
        0
    }
}

impl Percentiles {
    /// `None` for an empty histogram.
    fn of(h: &Histogram<u64>) -> Option<Self> {
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

/// Folds samples into histograms and counters.
pub struct Recorder {
    latency: Histogram<u64>,
    latency_warm: Histogram<u64>,
    latency_cold: Histogram<u64>,
    queued: Histogram<u64>,
    acquire: Histogram<u64>,
    run: Histogram<u64>,
    total: Histogram<u64>,
    counts: Counts,
    outcomes: BTreeMap<String, u64>,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    /// Every end-to-end latency in microseconds, when asked for
    /// (`--samples-out`), so that runs can be merged exactly.
    samples: Option<Vec<u64>>,
}

/// Job and request counters of a run.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
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
    /// Jobs whose 200 body was not a JobResult.
    pub bad_body: u64,
    /// Jobs lost to transport, spawn or timeout failures.
    pub failed: u64,
    /// Jobs still in flight when the drain timeout ended the run.
    pub abandoned: u64,
    /// Results by how the sandbox was acquired (`timings.acquire`).
    pub acquire_warm: u64,
    pub acquire_cold: u64,
    pub acquire_unknown: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            latency: histogram(),
            latency_warm: histogram(),
            latency_cold: histogram(),
            queued: histogram(),
            acquire: histogram(),
            run: histogram(),
            total: histogram(),
            counts: Counts::default(),
            outcomes: BTreeMap::new(),
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
            samples: None,
        }
    }
}

/// Most distinct error messages kept in a report; the rest are counted
/// under one key so that a failing run cannot grow the report unboundedly.
const MAX_ERROR_KINDS: usize = 32;

impl Recorder {
    /// A recorder that also keeps every latency (see [`Recorder::samples`]).
    pub fn keeping_samples() -> Self {
        Self {
            samples: Some(Vec::new()),
            ..Self::default()
        }
    }

    /// The end-to-end latencies of the jobs that ran, in microseconds, in
    /// the order they ended (only with [`Recorder::keeping_samples`]).
    pub fn samples(&self) -> Option<&[u64]> {
        self.samples.as_deref()
    }

    pub fn add(&mut self, s: &Sample) {
        let c = &mut self.counts;
        c.jobs += 1;
        c.http_429 += u64::from(s.throttled);
        let us = u64::try_from(s.latency.as_micros()).unwrap_or(u64::MAX);
        match &s.ending {
            Ending::Ran {
                outcome,
                timings,
                stdout_ok,
            } => {
                c.ran += 1;
                *self.outcomes.entry(outcome.to_string()).or_default() += 1;
                if !stdout_ok {
                    c.stdout_mismatch += 1;
                } else if *outcome == Outcome::Ok {
                    c.ok += 1;
                }
                record(&mut self.latency, us);
                if let Some(v) = &mut self.samples {
                    v.push(us);
                }
                match timings.as_ref().and_then(|t| t.acquire) {
                    Some(Acquire::Warm) => {
                        c.acquire_warm += 1;
                        record(&mut self.latency_warm, us);
                    }
                    Some(Acquire::Cold) => {
                        c.acquire_cold += 1;
                        record(&mut self.latency_cold, us);
                    }
                    None => c.acquire_unknown += 1,
                }
                if let Some(t) = timings {
                    record(&mut self.queued, ms_to_us(t.queued_ms));
                    record(&mut self.acquire, ms_to_us(t.acquire_ms));
                    record(&mut self.run, ms_to_us(t.run_ms));
                    record(&mut self.total, ms_to_us(t.total_ms));
                }
            }
            Ending::Throttled => c.throttled_jobs += 1,
            Ending::Status(code) => {
                c.http_other += 1;
                *self.statuses.entry(*code).or_default() += 1;
            }
            Ending::BadBody(e) => {
                c.bad_body += 1;
                self.error(format!("bad body: {e}"));
            }
            Ending::Failed(e) => {
                c.failed += 1;
                self.error(e.clone());
            }
        }
    }

    fn error(&mut self, e: String) {
        let key = if self.errors.len() < MAX_ERROR_KINDS || self.errors.contains_key(&e) {
            e
        } else {
            "(other errors)".into()
        };
        *self.errors.entry(key).or_default() += 1;
    }

    pub fn abandoned(&mut self, n: u64) {
        self.counts.abandoned += n;
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// The report of a run that took `elapsed` (the measured phase only).
    pub fn report(&self, run: RunInfo, elapsed: Duration, server: Option<ServerUsage>) -> Report {
        let secs = elapsed.as_secs_f64();
        let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        Report {
            run,
            elapsed_s: secs,
            throughput_per_s: per_s(self.counts.ran),
            ok_per_s: per_s(self.counts.ok),
            counts: self.counts.clone(),
            outcomes: self.outcomes.clone(),
            other_statuses: self
                .statuses
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            errors: self.errors.clone(),
            latency_ms: Percentiles::of(&self.latency),
            latency_warm_ms: Percentiles::of(&self.latency_warm),
            latency_cold_ms: Percentiles::of(&self.latency_cold),
            server_ms: ServerTimings {
                queued: Percentiles::of(&self.queued),
                acquire: Percentiles::of(&self.acquire),
                run: Percentiles::of(&self.run),
                total: Percentiles::of(&self.total),
            },
            server,
        }
    }
}

/// How the run was set up, echoed into the report.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// `"http"` or `"spawn"`.
    pub target: String,
    /// The URL, or the command line spawned per job.
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
#[derive(Debug, Clone, Serialize)]
pub struct ServerTimings {
    pub queued: Option<Percentiles>,
    pub acquire: Option<Percentiles>,
    pub run: Option<Percentiles>,
    pub total: Option<Percentiles>,
}

/// CPU and memory of the server process (`--server-pid`).
#[derive(Debug, Clone, Serialize, PartialEq)]
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
#[derive(Debug, Clone, Serialize)]
pub struct Report {
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
    pub server: Option<ServerUsage>,
}

impl Report {
    /// A human-readable summary.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let r = &self.run;
        let shape = match (r.concurrency, r.rate_per_s) {
            (Some(c), _) => format!("closed loop, concurrency {c}"),
            (None, Some(rate)) => format!(
                "open loop, {rate}/s {} arrivals",
                r.arrivals.as_deref().unwrap_or("?")
            ),
            _ => r.loop_kind.clone(),
        };
        let _ = writeln!(s, "target   {} {}", r.target, r.endpoint);
        let _ = writeln!(
            s,
            "load     {shape}{}{}",
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
        if r.target == "http" {
            let _ = writeln!(
                s,
                "acquire  warm {}, cold {}, unreported {}",
                c.acquire_warm, c.acquire_cold, c.acquire_unknown
            );
        }
        for (k, v) in &self.errors {
            let _ = writeln!(s, "  error x{v}: {k}");
        }
        let _ = writeln!(
            s,
            "{:<16} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "ms", "count", "min", "p50", "p90", "p99", "p99.9", "max"
        );
        let mut row = |name: &str, p: &Option<Percentiles>| {
            if let Some(p) = p {
                let _ = writeln!(
                    s,
                    "{name:<16} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    p.count, p.min, p.p50, p.p90, p.p99, p.p999, p.max
                );
            }
        };
        row("end-to-end", &self.latency_ms);
        row("  acquire=warm", &self.latency_warm_ms);
        row("  acquire=cold", &self.latency_cold_ms);
        row("server queued", &self.server_ms.queued);
        row("server acquire", &self.server_ms.acquire);
        row("server run", &self.server_ms.run);
        row("server total", &self.server_ms.total);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ran(ms: u64, acquire: Option<Acquire>) -> Sample {
        Sample {
            latency: Duration::from_millis(ms),
            ending: Ending::Ran {
                outcome: Outcome::Ok,
                timings: Some(Timings {
                    queued_ms: 0.5,
                    acquire_ms: 0.25,
                    acquire,
                    run_ms: ms as f64 / 2.0,
                    total_ms: ms as f64,
                    sandbox: None,
                }),
                stdout_ok: true,
            },
            throttled: 0,
        }
    }

    fn info() -> RunInfo {
        RunInfo {
            target: "http".into(),
            endpoint: "x".into(),
            loop_kind: "closed".into(),
            concurrency: Some(1),
            rate_per_s: None,
            arrivals: None,
            requests: 0,
            duration_limit_s: 1.0,
            warmup: 0,
            cold: false,
            on_429: "count".into(),
            started_unix_s: 0.0,
            load_average_1m: None,
            in_flight_cap_hit: false,
        }
    }

    #[test]
    fn percentiles_are_ordered_and_split_by_acquire() {
        let mut r = Recorder::default();
        for ms in 1..=1000 {
            let acq = if ms % 10 == 0 {
                Some(Acquire::Cold)
            } else {
                Some(Acquire::Warm)
            };
            r.add(&ran(ms, acq));
        }
        let rep = r.report(info(), Duration::from_secs(2), None);
        let p = rep.latency_ms.unwrap();
        assert_eq!(p.count, 1000);
        assert!(p.min <= p.p50 && p.p50 <= p.p90 && p.p90 <= p.p99);
        assert!(p.p99 <= p.p999 && p.p999 <= p.max);
        assert!((p.p50 - 500.0).abs() < 1.0, "{p:?}");
        assert_eq!(rep.counts.acquire_cold, 100);
        assert_eq!(rep.counts.acquire_warm, 900);
        assert_eq!(rep.latency_cold_ms.unwrap().count, 100);
        assert!((rep.throughput_per_s - 500.0).abs() < 1e-9);
        assert_eq!(rep.server_ms.run.unwrap().count, 1000);
    }

    #[test]
    fn samples_are_kept_only_when_asked() {
        let mut r = Recorder::default();
        r.add(&ran(3, None));
        assert!(r.samples().is_none());
        let mut r = Recorder::keeping_samples();
        r.add(&ran(3, None));
        r.add(&Sample {
            latency: Duration::from_millis(1),
            ending: Ending::Throttled,
            throttled: 1,
        });
        assert_eq!(r.samples().unwrap(), [3000]);
    }

    #[test]
    fn failures_are_counted_but_not_timed() {
        let mut r = Recorder::default();
        r.add(&Sample {
            latency: Duration::from_millis(3),
            ending: Ending::Throttled,
            throttled: 2,
        });
        r.add(&Sample {
            latency: Duration::from_millis(3),
            ending: Ending::Status(503),
            throttled: 0,
        });
        for _ in 0..100 {
            r.add(&Sample {
                latency: Duration::from_millis(3),
                ending: Ending::Failed("connection refused".into()),
                throttled: 0,
            });
        }
        let rep = r.report(info(), Duration::from_secs(1), None);
        assert!(rep.latency_ms.is_none());
        assert_eq!(rep.counts.http_429, 2);
        assert_eq!(rep.counts.throttled_jobs, 1);
        assert_eq!(rep.other_statuses["503"], 1);
        assert_eq!(rep.errors["connection refused"], 100);
        assert_eq!(rep.counts.jobs, 102);
    }

    #[test]
    fn distinct_errors_are_bounded() {
        let mut r = Recorder::default();
        for i in 0..100 {
            r.add(&Sample {
                latency: Duration::ZERO,
                ending: Ending::Failed(format!("e{i}")),
                throttled: 0,
            });
        }
        let rep = r.report(info(), Duration::from_secs(1), None);
        assert_eq!(rep.errors.len(), MAX_ERROR_KINDS + 1);
        assert_eq!(rep.errors.values().sum::<u64>(), 100);
    }
}

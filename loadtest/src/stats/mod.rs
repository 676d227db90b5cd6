//! What a run measured: one [`Sample`] per job, folded by a [`Recorder`]
//! into HDR histograms, counters, the cold-start split ([`cold`]) and the
//! per-job points the timeline is drawn from, and summarised as a
//! [`Report`] (JSON for machines and `--compare`, [`Report::render`] for
//! people).
//!
//! Latencies are kept in microseconds with three significant digits, which
//! is HDR's usual precision and far finer than the noise of a shared host.

mod cold;
mod report;
mod series;

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use kiln_protocol::{Acquire, Outcome, Timings};

pub use cold::{ColdSplit, Part};
pub use report::{
    Counts, Percentiles, Report, RunInfo, ServerTimings, ServerUsage, REPORT_VERSION,
};
pub use series::{Bucket, Cdfs, Timeline};

/// Largest latency a histogram holds: one hour, in microseconds. Longer
/// values are clamped (they would be failures of the run anyway).
const MAX_US: u64 = 3_600_000_000;

/// How one job ended, as seen by the load generator.
#[derive(Debug, Clone)]
pub enum Ending {
    /// The job ran: a `JobResult` came back (HTTP 200, an AMQP reply), or
    /// the spawned program exited.
    Ran {
        outcome: Outcome,
        /// The server's own timings (HTTP and AMQP).
        timings: Option<Timings>,
        /// Whether stdout matched `--expect-stdout` (true when unchecked).
        stdout_ok: bool,
    },
    /// The server answered 429 and the job was not retried.
    Throttled,
    /// Any other HTTP status.
    Status(u16),
    /// An answer whose body was not a `JobResult`.
    BadBody(String),
    /// Connection, publish, spawn or timeout failure.
    Failed(String),
}

/// One job: when it was meant to be sent, its ending, its end-to-end
/// latency (measured from that intended send time, so that a stalled
/// server cannot hide its queue), and how many 429s it met on the way.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The intended send time, from the start of the measured phase.
    pub sent: Duration,
    pub latency: Duration,
    pub ending: Ending,
    pub throttled: u32,
}

/// One job on the timeline: 12 bytes, kept for every job of the run.
#[derive(Debug, Clone, Copy)]
struct Point {
    /// Intended send time from the start of the phase, ms.
    sent_ms: u32,
    /// End-to-end latency, µs (at most [`MAX_US`], which fits).
    latency_us: u32,
    ran: bool,
}

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("static bounds are valid")
}

pub(crate) fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, MAX_US));
}

pub(crate) fn ms_to_us(ms: f64) -> u64 {
    if ms.is_finite() && ms > 0.0 {
        (ms * 1000.0).round() as u64
    } else {
        0
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
    /// The cold-start split, by how the sandbox was made (`boot`, `restore`).
    cold: BTreeMap<String, cold::Accumulator>,
    counts: Counts,
    outcomes: BTreeMap<String, u64>,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    /// Every job, in the order they ended: the timeline and
    /// `--samples-out` are made from these.
    points: Vec<Point>,
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
            cold: BTreeMap::new(),
            counts: Counts::default(),
            outcomes: BTreeMap::new(),
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
            points: Vec::new(),
        }
    }
}

/// Most distinct error messages kept in a report; the rest are counted
/// under one key so that a failing run cannot grow the report unboundedly.
const MAX_ERROR_KINDS: usize = 32;

/// What the live progress line shows, read under the recorder's lock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// Jobs whose ending was recorded.
    pub done: u64,
    /// Jobs that did not end `ok` (any outcome but ok, 429s given up,
    /// failures).
    pub failed: u64,
    /// p50 and p99 of the end-to-end latency so far, ms.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Recorder {
    /// The end-to-end latencies of the jobs that ran, in microseconds, in
    /// the order they ended.
    pub fn samples(&self) -> impl Iterator<Item = u64> + '_ {
        self.points
            .iter()
            .filter(|p| p.ran)
            .map(|p| u64::from(p.latency_us))
    }

    pub fn add(&mut self, s: &Sample) {
        let c = &mut self.counts;
        c.jobs += 1;
        c.http_429 += u64::from(s.throttled);
        let us = u64::try_from(s.latency.as_micros())
            .unwrap_or(u64::MAX)
            .min(MAX_US);
        let ran = matches!(s.ending, Ending::Ran { .. });
        self.points.push(Point {
            sent_ms: u32::try_from(s.sent.as_millis()).unwrap_or(u32::MAX),
            latency_us: u32::try_from(us).unwrap_or(u32::MAX),
            ran,
        });
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
                    if let (Some(Acquire::Cold), Some(sb)) = (t.acquire, &t.sandbox) {
                        let e2e_ms = s.latency.as_secs_f64() * 1000.0;
                        self.cold
                            .entry(cold::how_name(sb.how).to_owned())
                            .or_default()
                            .add(e2e_ms, t, sb);
                    }
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

    /// The figures of the live progress line.
    pub fn snapshot(&self) -> Snapshot {
        let c = &self.counts;
        let q = |q: f64| {
            (!self.latency.is_empty()).then(|| self.latency.value_at_quantile(q) as f64 / 1000.0)
        };
        Snapshot {
            done: c.jobs,
            failed: c.jobs - c.ok,
            p50_ms: q(0.5),
            p99_ms: q(0.99),
        }
    }

    /// The report of a run that took `elapsed` (the measured phase only).
    pub fn report(&self, run: RunInfo, elapsed: Duration, server: Option<ServerUsage>) -> Report {
        let secs = elapsed.as_secs_f64();
        let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let span_s = self
            .points
            .iter()
            .map(|p| f64::from(p.sent_ms) / 1000.0)
            .fold(secs, f64::max);
        Report {
            report_version: REPORT_VERSION,
            tool_version: env!("CARGO_PKG_VERSION").into(),
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
            cold_start: self
                .cold
                .iter()
                .filter_map(|(how, acc)| Some((how.clone(), acc.split()?)))
                .collect(),
            latency_cdf_ms: Cdfs {
                all: series::cdf(&self.latency),
                warm: series::cdf(&self.latency_warm),
                cold: series::cdf(&self.latency_cold),
            },
            timeline: series::timeline(
                self.points
                    .iter()
                    .map(|p| (f64::from(p.sent_ms) / 1000.0, p.ran.then_some(p.latency_us))),
                span_s,
            ),
            server,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kiln_protocol::{SandboxStart, SandboxTimings};

    fn ran(ms: u64, acquire: Option<Acquire>) -> Sample {
        Sample {
            sent: Duration::from_millis(ms),
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

    fn not_ran(ending: Ending, throttled: u32) -> Sample {
        Sample {
            sent: Duration::ZERO,
            latency: Duration::from_millis(3),
            ending,
            throttled,
        }
    }

    pub(crate) fn info() -> RunInfo {
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
        // Cold results without `timings.sandbox` (an older server) have no
        // split.
        assert!(rep.cold_start.is_empty());
        let cdf = &rep.latency_cdf_ms.all;
        assert_eq!(cdf.last().unwrap()[1], 1.0);
        assert_eq!(rep.latency_cdf_ms.cold.last().unwrap()[1], 1.0);
    }

    #[test]
    fn samples_are_the_latencies_of_jobs_that_ran() {
        let mut r = Recorder::default();
        r.add(&ran(3, None));
        r.add(&not_ran(Ending::Throttled, 1));
        r.add(&ran(5, None));
        assert_eq!(r.samples().collect::<Vec<_>>(), [3000, 5000]);
    }

    #[test]
    fn failures_are_counted_but_not_timed() {
        let mut r = Recorder::default();
        r.add(&not_ran(Ending::Throttled, 2));
        r.add(&not_ran(Ending::Status(503), 0));
        for _ in 0..100 {
            r.add(&not_ran(Ending::Failed("connection refused".into()), 0));
        }
        let rep = r.report(info(), Duration::from_secs(1), None);
        assert!(rep.latency_ms.is_none());
        assert_eq!(rep.counts.http_429, 2);
        assert_eq!(rep.counts.throttled_jobs, 1);
        assert_eq!(rep.other_statuses["503"], 1);
        assert_eq!(rep.errors["connection refused"], 100);
        assert_eq!(rep.counts.jobs, 102);
        assert_eq!(r.snapshot().failed, 102);
        assert!(r.snapshot().p50_ms.is_none());
        let not_ran: u64 = rep.timeline.buckets.iter().map(|b| b.not_ran).sum();
        assert_eq!(not_ran, 102);
    }

    #[test]
    fn distinct_errors_are_bounded() {
        let mut r = Recorder::default();
        for i in 0..100 {
            r.add(&not_ran(Ending::Failed(format!("e{i}")), 0));
        }
        let rep = r.report(info(), Duration::from_secs(1), None);
        assert_eq!(rep.errors.len(), MAX_ERROR_KINDS + 1);
        assert_eq!(rep.errors.values().sum::<u64>(), 100);
    }

    #[test]
    fn cold_jobs_with_sandbox_timings_are_split_by_how() {
        let mut r = Recorder::default();
        for (i, how) in [
            SandboxStart::Boot,
            SandboxStart::Restore,
            SandboxStart::Restore,
        ]
        .into_iter()
        .enumerate()
        {
            r.add(&Sample {
                sent: Duration::from_millis(i as u64),
                latency: Duration::from_millis(50),
                ending: Ending::Ran {
                    outcome: Outcome::Ok,
                    timings: Some(Timings {
                        queued_ms: 1.0,
                        acquire_ms: 30.0,
                        acquire: Some(Acquire::Cold),
                        run_ms: 10.0,
                        total_ms: 45.0,
                        sandbox: Some(SandboxTimings {
                            how,
                            start_ms: 20.0,
                            connect_ms: 2.0,
                            setup_ms: 5.0,
                        }),
                    }),
                    stdout_ok: true,
                },
                throttled: 0,
            });
        }
        let rep = r.report(info(), Duration::from_secs(1), None);
        assert_eq!(rep.cold_start["boot"].jobs, 1);
        let restore = &rep.cold_start["restore"];
        assert_eq!(restore.jobs, 2);
        let mean = |p: Part| restore.part(p).mean;
        assert_eq!(mean(Part::Start), 20.0);
        assert_eq!(mean(Part::AcquireOther), 3.0);
        assert_eq!(mean(Part::AfterRun), 4.0);
        assert_eq!(mean(Part::Transport), 5.0);
        let sum: f64 = Part::ALL.iter().map(|&p| mean(p)).sum();
        assert!((sum - restore.end_to_end_ms.mean).abs() < 1e-9, "{sum}");
    }
}

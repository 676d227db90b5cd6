//! The cold-start split: where the time of a job whose sandbox was made
//! for it went. A cold result carries `timings.sandbox` (how the sandbox
//! came to be, `boot` or `restore`, and its `start`, `connect` and `setup`
//! steps); with the server's `queued`, `acquire`, `run` and `total` and the
//! load generator's own end-to-end latency, each such job's latency is cut
//! into parts that add up to it exactly:
//!
//! ```text
//! end-to-end = queue + start + connect + setup + acquire other + run + after run + transport
//!   acquire other = acquire − (start + connect + setup)   pool and cgroup work around the making
//!   after run     = total − queued − acquire − run        teardown, result assembly
//!   transport     = end-to-end − total                    HTTP or AMQP, the client's own wait
//! ```
//!
//! Percentiles of parts do not add up (the slowest start and the slowest
//! run are rarely the same job), means do: the report gives both.

use hdrhistogram::Histogram;
use kiln_protocol::{SandboxStart, SandboxTimings, Timings};
use serde::{Deserialize, Serialize};

use super::{histogram, ms_to_us, Percentiles, MAX_US};

/// The parts of a cold job's latency, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Queue,
    Start,
    Connect,
    Setup,
    AcquireOther,
    Run,
    AfterRun,
    Transport,
}

impl Part {
    pub const ALL: [Part; 8] = [
        Part::Queue,
        Part::Start,
        Part::Connect,
        Part::Setup,
        Part::AcquireOther,
        Part::Run,
        Part::AfterRun,
        Part::Transport,
    ];

    /// A row label; `start` names how the sandbox was made.
    pub fn label(self, how: &str) -> String {
        match self {
            Part::Queue => "queue".into(),
            Part::Start => format!("start ({how})"),
            Part::Connect => "connect".into(),
            Part::Setup => "setup".into(),
            Part::AcquireOther => "acquire other".into(),
            Part::Run => "run".into(),
            Part::AfterRun => "after run".into(),
            Part::Transport => "transport".into(),
        }
    }

    /// This part of one job, ms.
    fn of(self, e2e_ms: f64, t: &Timings, s: &SandboxTimings) -> f64 {
        match self {
            Part::Queue => t.queued_ms,
            Part::Start => s.start_ms,
            Part::Connect => s.connect_ms,
            Part::Setup => s.setup_ms,
            Part::AcquireOther => t.acquire_ms - (s.start_ms + s.connect_ms + s.setup_ms),
            Part::Run => t.run_ms,
            Part::AfterRun => t.total_ms - t.queued_ms - t.acquire_ms - t.run_ms,
            Part::Transport => e2e_ms - t.total_ms,
        }
    }
}

/// The name of `how` in the report (`timings.sandbox.how` as the API
/// spells it).
pub fn how_name(how: SandboxStart) -> &'static str {
    match how {
        SandboxStart::Boot => "boot",
        SandboxStart::Restore => "restore",
    }
}

/// One histogram and the exact sum of what went into it (so that means
/// add up even where the histogram clamps or rounds).
struct Summed {
    h: Histogram<u64>,
    sum_ms: f64,
}

impl Default for Summed {
    fn default() -> Self {
        Self {
            h: histogram(),
            sum_ms: 0.0,
        }
    }
}

impl Summed {
    fn add(&mut self, ms: f64) {
        if ms.is_finite() {
            self.sum_ms += ms;
        }
        // A part may be 0 (a jail has no connect step); a negative one
        // (clock granularity) is recorded as 0.
        self.h.saturating_record(ms_to_us(ms).min(MAX_US));
    }

    fn percentiles(&self) -> Option<Percentiles> {
        let n = self.h.len();
        Percentiles::of(&self.h).map(|p| Percentiles {
            mean: self.sum_ms / n as f64,
            ..p
        })
    }
}

/// The split of one kind of cold start while it is being recorded.
#[derive(Default)]
pub(super) struct Accumulator {
    end_to_end: Summed,
    parts: [Summed; 8],
}

impl Accumulator {
    pub(super) fn add(&mut self, e2e_ms: f64, t: &Timings, s: &SandboxTimings) {
        self.end_to_end.add(e2e_ms);
        for (acc, part) in self.parts.iter_mut().zip(Part::ALL) {
            acc.add(part.of(e2e_ms, t, s));
        }
    }

    /// `None` before the first job.
    pub(super) fn split(&self) -> Option<ColdSplit> {
        let p = |i: usize| self.parts[i].percentiles();
        Some(ColdSplit {
            jobs: self.end_to_end.h.len(),
            end_to_end_ms: self.end_to_end.percentiles()?,
            queue_ms: p(0)?,
            start_ms: p(1)?,
            connect_ms: p(2)?,
            setup_ms: p(3)?,
            acquire_other_ms: p(4)?,
            run_ms: p(5)?,
            after_run_ms: p(6)?,
            transport_ms: p(7)?,
        })
    }
}

/// The cold-start split of the jobs whose sandbox was made one way, in the
/// report. Every `mean` is exact, and the parts' means add up to
/// `end_to_end_ms.mean`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ColdSplit {
    /// Cold jobs that reported how their sandbox was made.
    pub jobs: u64,
    pub end_to_end_ms: Percentiles,
    pub queue_ms: Percentiles,
    pub start_ms: Percentiles,
    pub connect_ms: Percentiles,
    pub setup_ms: Percentiles,
    pub acquire_other_ms: Percentiles,
    pub run_ms: Percentiles,
    pub after_run_ms: Percentiles,
    pub transport_ms: Percentiles,
}

impl ColdSplit {
    pub fn part(&self, p: Part) -> &Percentiles {
        match p {
            Part::Queue => &self.queue_ms,
            Part::Start => &self.start_ms,
            Part::Connect => &self.connect_ms,
            Part::Setup => &self.setup_ms,
            Part::AcquireOther => &self.acquire_other_ms,
            Part::Run => &self.run_ms,
            Part::AfterRun => &self.after_run_ms,
            Part::Transport => &self.transport_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::Acquire;

    #[test]
    fn parts_add_up_to_the_end_to_end_latency_and_may_be_zero() {
        let t = Timings {
            queued_ms: 0.5,
            acquire_ms: 21.0,
            acquire: Some(Acquire::Cold),
            run_ms: 12.0,
            total_ms: 36.0,
            sandbox: None,
        };
        let s = SandboxTimings {
            how: SandboxStart::Boot,
            start_ms: 14.0,
            connect_ms: 0.0,
            setup_ms: 6.0,
        };
        let sum: f64 = Part::ALL.iter().map(|p| p.of(40.0, &t, &s)).sum();
        assert!((sum - 40.0).abs() < 1e-9, "{sum}");
        let mut a = Accumulator::default();
        a.add(40.0, &t, &s);
        let split = a.split().unwrap();
        assert_eq!(split.connect_ms.p50, 0.0);
        assert_eq!(split.acquire_other_ms.mean, 1.0);
        assert_eq!(split.transport_ms.mean, 4.0);
        assert_eq!(Part::Start.label("restore"), "start (restore)");
    }
}

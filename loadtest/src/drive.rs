//! The two ways of applying load. A closed loop keeps N jobs in flight:
//! each worker sends its next job when the previous one ends, so it measures
//! throughput at a concurrency. An open loop sends jobs at a target rate
//! whatever the server does (constant or Poisson arrivals), and measures each
//! latency from the job's *intended* send time: a server that stalls cannot
//! hide its queue by slowing the generator down (coordinated omission).
//!
//! Every loop is bounded by a job count and by a deadline; jobs still in
//! flight after the deadline get a drain period and are then abandoned.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant};

use crate::stats::{Ending, Recorder, Sample};
use crate::target::{Attempt, Target};

/// What to do when the server answers 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum On429 {
    /// Record the job as throttled; a closed-loop worker then waits the
    /// `Retry-After` before its next job.
    Count,
    /// Wait the `Retry-After` and resend the same job (its latency keeps
    /// counting) until it is accepted or the run's deadline passes.
    Retry,
}

/// How arrivals are spaced in an open loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arrivals {
    /// Exponential gaps (a Poisson process), like independent clients.
    Poisson,
    /// Evenly spaced.
    Constant,
}

/// Limits shared by both loops.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Most jobs to send.
    pub requests: u64,
    /// No job is sent after this much time.
    pub duration: Duration,
    /// Longest a single attempt may take.
    pub timeout: Duration,
    /// How long jobs in flight at the deadline may still finish.
    pub drain: Duration,
    pub on_429: On429,
}

/// What a loop hands back besides the samples in the recorder.
#[derive(Debug, Clone, Copy)]
pub struct Ran {
    /// From the first send to the last ending.
    pub elapsed: Duration,
    /// Whether the open loop ever waited for an in-flight slot.
    pub cap_hit: bool,
}

/// Runs one job, meant to be sent at `intended` in a phase that began at
/// `start`, to its ending. Returns the sample and, for a job given up on a
/// 429, the wait the server asked for.
async fn job(
    target: &Target,
    start: Instant,
    intended: Instant,
    b: &Bounds,
    deadline: Instant,
) -> (Sample, Option<Duration>) {
    let sent = intended.saturating_duration_since(start);
    let mut throttled = 0;
    loop {
        let ending = match timeout(b.timeout, target.attempt()).await {
            Err(_) => Ending::Failed(format!("no answer within {:?}", b.timeout)),
            Ok(Attempt::Done(e)) => e,
            Ok(Attempt::Throttled(wait)) => {
                throttled += 1;
                if b.on_429 == On429::Retry && Instant::now() + wait < deadline {
                    sleep(wait).await;
                    continue;
                }
                let s = Sample {
                    sent,
                    latency: intended.elapsed(),
                    ending: Ending::Throttled,
                    throttled,
                };
                return (s, Some(wait));
            }
        };
        let s = Sample {
            sent,
            latency: intended.elapsed(),
            ending,
            throttled,
        };
        return (s, None);
    }
}

/// `concurrency` workers, each sending its next job when the last ended.
pub async fn closed(
    target: Arc<Target>,
    concurrency: usize,
    b: Bounds,
    rec: Arc<Mutex<Recorder>>,
) -> Ran {
    let start = Instant::now();
    let deadline = start + b.duration;
    let hard_stop = deadline + b.drain;
    let issued = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (target, issued, rec) = (target.clone(), issued.clone(), rec.clone());
        workers.spawn(async move {
            let mut abandoned = 0;
            while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < b.requests {
                let intended = Instant::now();
                let Ok((s, backoff)) =
                    tokio::time::timeout_at(hard_stop, job(&target, start, intended, &b, deadline))
                        .await
                else {
                    abandoned += 1;
                    break;
                };
                rec.lock().expect("recorder lock").add(&s);
                if let Some(wait) = backoff {
                    sleep_until((Instant::now() + wait).min(deadline)).await;
                }
            }
            abandoned
        });
    }
    let mut abandoned = 0;
    while let Some(r) = workers.join_next().await {
        abandoned += r.unwrap_or(1);
    }
    rec.lock().expect("recorder lock").abandoned(abandoned);
    Ran {
        elapsed: start.elapsed(),
        cap_hit: false,
    }
}

/// A small deterministic generator (SplitMix64), so that a seed reproduces
/// the same arrival schedule.
struct SplitMix(u64);

impl SplitMix {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 53 random bits in [0, 1).
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The gaps between intended send times.
struct Schedule {
    mean: Duration,
    arrivals: Arrivals,
    rng: SplitMix,
}

impl Schedule {
    fn new(rate_per_s: f64, arrivals: Arrivals, seed: u64) -> Self {
        Self {
            mean: Duration::from_secs_f64(1.0 / rate_per_s),
            arrivals,
            rng: SplitMix(seed),
        }
    }

    fn gap(&mut self) -> Duration {
        match self.arrivals {
            Arrivals::Constant => self.mean,
            // Inverse transform of the exponential distribution; 1 - u is
            // in (0, 1], so the logarithm is finite.
            Arrivals::Poisson => self.mean.mul_f64(-(1.0 - self.rng.next_f64()).ln()),
        }
    }
}

/// Sends jobs at `rate_per_s` with at most `max_in_flight` outstanding.
pub async fn open(
    target: Arc<Target>,
    rate_per_s: f64,
    arrivals: Arrivals,
    seed: u64,
    max_in_flight: usize,
    b: Bounds,
    rec: Arc<Mutex<Recorder>>,
) -> Ran {
    let start = Instant::now();
    let deadline = start + b.duration;
    let slots = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut schedule = Schedule::new(rate_per_s, arrivals, seed);
    let mut tasks = JoinSet::new();
    let mut cap_hit = false;
    let mut intended = start;
    let last_end = Arc::new(Mutex::new(start));
    for _ in 0..b.requests {
        if intended >= deadline {
            break;
        }
        sleep_until(intended).await;
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                cap_hit = true;
                slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        let (target, rec, last_end) = (target.clone(), rec.clone(), last_end.clone());
        tasks.spawn(async move {
            let (s, _) = job(&target, start, intended, &b, deadline).await;
            rec.lock().expect("recorder lock").add(&s);
            *last_end.lock().expect("end lock") = Instant::now();
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
        intended += schedule.gap();
    }
    let drain_until = deadline.max(Instant::now()) + b.drain;
    let drained = tokio::time::timeout_at(drain_until, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    if !drained {
        rec.lock()
            .expect("recorder lock")
            .abandoned(tasks.len() as u64);
        tasks.abort_all();
    }
    let end = *last_end.lock().expect("end lock");
    Ran {
        elapsed: end.saturating_duration_since(start),
        cap_hit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_gaps_average_the_rate() {
        let mut s = Schedule::new(1000.0, Arrivals::Poisson, 7);
        let n = 20_000;
        let total: Duration = (0..n).map(|_| s.gap()).sum();
        let mean_ms = total.as_secs_f64() * 1000.0 / n as f64;
        assert!((mean_ms - 1.0).abs() < 0.05, "{mean_ms}");
        let mut c = Schedule::new(50.0, Arrivals::Constant, 7);
        assert_eq!(c.gap(), Duration::from_millis(20));
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let mut a = Schedule::new(10.0, Arrivals::Poisson, 42);
        let mut b = Schedule::new(10.0, Arrivals::Poisson, 42);
        for _ in 0..100 {
            assert_eq!(a.gap(), b.gap());
        }
    }
}

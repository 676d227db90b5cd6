//! AMQP intake: `kiln serve` consumes jobs from a RabbitMQ queue, runs them
//! through the same [`Scheduler`] as HTTP jobs, and answers each with one
//! result to its `reply_to` (RPC pattern), acking the job message only after
//! the broker confirmed that result. Poison messages go to a dead-letter
//! queue with the reason; redeliveries are answered from a bounded result
//! store instead of running again; a lost connection is re-established with
//! backoff and jitter. The topology, message format and what "exactly once"
//! covers are in `docs/amqp.md`.
//!
//! The data path: [`topology`] declares the broker objects, [`consumer`]
//! holds the session loop and the per-delivery tasks, [`publish`] the
//! confirmed publications, [`store`] the results by job id.

mod config;
mod consumer;
pub(crate) mod message;
mod metrics;
mod publish;
mod store;
mod topology;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{AmqpArgs, AmqpConfig};
pub use metrics::AmqpMetrics;

use crate::scheduler::Scheduler;
use consumer::Shared;
use store::{ResultStore, StoreBounds};

/// A session that consumed for this long counts as healthy: the next
/// failure starts the backoff from the minimum again.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// The running AMQP intake. Stop it with [`AmqpIntake::shutdown`].
#[must_use = "dropping the intake leaves it running without a way to drain it"]
pub struct AmqpIntake {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl AmqpIntake {
    /// Starts consuming (in the background; connection failures are retried
    /// for ever with backoff, and logged). Must run inside a tokio runtime.
    pub fn start(cfg: AmqpConfig, scheduler: Scheduler, metrics: AmqpMetrics) -> Self {
        let store = ResultStore::new(StoreBounds {
            max_finished: cfg.result_store_max,
            ttl: cfg.result_store_ttl(),
        });
        let shared = Arc::new(Shared::new(cfg, scheduler, metrics, store));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(supervise(shared.clone(), stop_rx));
        Self { stop, task, shared }
    }

    /// SIGTERM: stops consuming (messages not yet delivered, and those
    /// delivered but not started, stay in / go back to the queue), waits up
    /// to `grace` for the jobs in flight to be answered and acked, then
    /// closes the connection. Run it alongside the scheduler's drain.
    pub async fn shutdown(self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        *self
            .shared
            .stop_deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(deadline);
        let _ = self.stop.send(true);
        // The session waits for in-flight jobs (up to the deadline) before
        // it closes its connection; bound the wait for it too.
        let mut task = self.task;
        if tokio::time::timeout_at(deadline + Duration::from_secs(10), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// Runs sessions until stopped, reconnecting with exponential backoff and
/// jitter.
async fn supervise(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let cfg = &shared.cfg;
    let mut delay = cfg.reconnect_min();
    let mut jitter = Jitter::new();
    loop {
        let started = Instant::now();
        let mut consuming = false;
        let r = consumer::session(&shared, &mut stop, || consuming = true).await;
        if *stop.borrow() {
            // Wait for in-flight jobs before the session's connection goes
            // away is done inside the session; here only log.
            if let Err(e) = r {
                tracing::warn!(
                    "AMQP session ended while stopping: {}",
                    crate::error_chain(&e)
                );
            }
            break;
        }
        match r {
            Ok(()) => break,
            Err(e) => {
                shared.metrics.reconnect();
                if consuming && started.elapsed() >= HEALTHY_SESSION {
                    delay = cfg.reconnect_min();
                }
                let wait = jitter.around(delay);
                tracing::warn!(retry_in = ?wait, "AMQP: {}", crate::error_chain(&e));
                delay = (delay * 2).min(cfg.reconnect_max());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        }
    }
}

/// "Equal jitter": a delay uniformly in [d/2, d], so that nodes that lost
/// the broker together do not reconnect in lockstep, while the delay still
/// grows. A xorshift generator is plenty for spreading retries.
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(std::process::id()) << 32);
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn around(&mut self, d: Duration) -> Duration {
        let half = d / 2;
        let span = half.as_micros().max(1) as u64;
        half + Duration::from_micros(self.next() % span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_and_whole_and_varies() {
        let mut j = Jitter::new();
        let d = Duration::from_millis(800);
        let xs: Vec<_> = (0..100).map(|_| j.around(d)).collect();
        assert!(xs.iter().all(|x| *x >= d / 2 && *x <= d));
        assert!(xs.iter().any(|x| *x != xs[0]));
    }
}

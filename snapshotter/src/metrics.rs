//! Counters and latency histograms of the page server, globally and per
//! restore.
//!
//! A VM whose page server stalls simply hangs, so the server must be
//! observable: how many faults it served, how many bytes it copied, how long
//! each fault took to service, how big and how fast each prefetch was. The
//! hot path only touches relaxed atomics; readers take a [`snapshot`] or
//! register the set with a `prometheus-client` registry, which reads the same
//! atomics at scrape time.
//!
//! [`snapshot`]: PageServerMetrics::snapshot

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// Number of histogram buckets: half-octave steps from 256 ns to ~70 s.
const BUCKETS: usize = 57;

/// Upper bound of bucket `i` in nanoseconds: 256 ns x 2^(i/2).
fn bucket_bound_ns(i: usize) -> u64 {
    let base = 256u64 << (i / 2);
    if i.is_multiple_of(2) {
        base
    } else {
        base + base * 41 / 100
    }
}

/// The first bucket whose bound holds `ns` (`BUCKETS` past the last), in
/// constant time: this runs on every fault served.
fn bucket_index(ns: u64) -> usize {
    if ns <= bucket_bound_ns(0) {
        return 0;
    }
    // 256 x 2^(j-1) <= ns - 1 < 256 x 2^j, so ns <= bound(2j) and
    // ns > bound(2j - 2): the bucket is 2j - 1 or 2j.
    let j = (64 - ((ns - 1) >> 8).leading_zeros()) as usize;
    if 2 * j > BUCKETS {
        return BUCKETS;
    }
    let i = if ns <= bucket_bound_ns(2 * j - 1) {
        2 * j - 1
    } else {
        2 * j
    };
    i.min(BUCKETS)
}

/// A lock-free latency histogram with half-octave buckets (so quantiles are
/// exact to within ~41%) plus an exact count and sum.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// A point-in-time copy of a [`LatencyHistogram`].
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct HistogramSnapshot {
    /// Number of observations.
    pub count: u64,
    /// Sum of all observations in nanoseconds.
    pub sum_ns: u64,
    /// `(upper bound in ns, observations in this bucket)`; the last bound is `u64::MAX`.
    pub buckets: Vec<(u64, u64)>,
}

impl HistogramSnapshot {
    /// The upper bound of the bucket holding quantile `q` (0..=1), or zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((self.count as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bound, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return Duration::from_nanos(*bound);
            }
        }
        Duration::from_nanos(u64::MAX)
    }

    /// Mean observation.
    pub fn mean(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.checked_div(self.count).unwrap_or(0))
    }
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        self.buckets[bucket_index(ns)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Copies the current state.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            count: self.count.load(Relaxed),
            sum_ns: self.sum_ns.load(Relaxed),
            buckets: (0..=BUCKETS)
                .map(|i| {
                    let bound = if i == BUCKETS {
                        u64::MAX
                    } else {
                        bucket_bound_ns(i)
                    };
                    (bound, self.buckets[i].load(Relaxed))
                })
                .collect(),
        }
    }
}

/// Counters of one restore (one VM), updated by its serving thread.
#[derive(Debug, Default)]
pub struct RestoreMetrics {
    /// Faults served by copying a page from the memory file.
    pub faults_served: AtomicU64,
    /// Faults served with a zero page because the range was removed.
    pub zero_pages_served: AtomicU64,
    /// Faults whose page was already present (`EEXIST`): only a wake was needed.
    pub faults_already_present: AtomicU64,
    /// Copies retried because a remove event was pending (`EAGAIN`).
    pub copy_retries: AtomicU64,
    /// `UFFD_EVENT_REMOVE` events received.
    pub remove_events: AtomicU64,
    /// Bytes installed by lazy faults.
    pub fault_bytes: AtomicU64,
    /// Pages installed by prefetch.
    pub prefetch_pages: AtomicU64,
    /// Bytes installed by prefetch.
    pub prefetch_bytes: AtomicU64,
    /// Wall time of the prefetch in nanoseconds (0 when none ran).
    pub prefetch_ns: AtomicU64,
    /// CPU time (user + system) of the threads that served this restore:
    /// the serving thread from its start (handshake included) and the
    /// prefetch helpers. The serving thread's share is added when the
    /// restore ends, the helpers' after each prefetch slice; so it is final
    /// in a [`RestoreReport`](crate::RestoreReport), partial while live.
    pub cpu_ns: AtomicU64,
    /// Time from reading a fault message to the page being installed.
    pub fault_latency: LatencyHistogram,
}

/// A point-in-time copy of [`RestoreMetrics`].
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct RestoreMetricsSnapshot {
    /// See [`RestoreMetrics::faults_served`].
    pub faults_served: u64,
    /// See [`RestoreMetrics::zero_pages_served`].
    pub zero_pages_served: u64,
    /// See [`RestoreMetrics::faults_already_present`].
    pub faults_already_present: u64,
    /// See [`RestoreMetrics::copy_retries`].
    pub copy_retries: u64,
    /// See [`RestoreMetrics::remove_events`].
    pub remove_events: u64,
    /// See [`RestoreMetrics::fault_bytes`].
    pub fault_bytes: u64,
    /// See [`RestoreMetrics::prefetch_pages`].
    pub prefetch_pages: u64,
    /// See [`RestoreMetrics::prefetch_bytes`].
    pub prefetch_bytes: u64,
    /// See [`RestoreMetrics::prefetch_ns`].
    pub prefetch_ns: u64,
    /// See [`RestoreMetrics::cpu_ns`].
    pub cpu_ns: u64,
    /// See [`RestoreMetrics::fault_latency`].
    pub fault_latency: HistogramSnapshot,
}

impl RestoreMetrics {
    /// Copies the current state.
    pub fn snapshot(&self) -> RestoreMetricsSnapshot {
        RestoreMetricsSnapshot {
            faults_served: self.faults_served.load(Relaxed),
            zero_pages_served: self.zero_pages_served.load(Relaxed),
            faults_already_present: self.faults_already_present.load(Relaxed),
            copy_retries: self.copy_retries.load(Relaxed),
            remove_events: self.remove_events.load(Relaxed),
            fault_bytes: self.fault_bytes.load(Relaxed),
            prefetch_pages: self.prefetch_pages.load(Relaxed),
            prefetch_bytes: self.prefetch_bytes.load(Relaxed),
            prefetch_ns: self.prefetch_ns.load(Relaxed),
            cpu_ns: self.cpu_ns.load(Relaxed),
            fault_latency: self.fault_latency.snapshot(),
        }
    }
}

/// Server-wide counters: the sum over all restores plus connection outcomes.
#[derive(Debug, Default)]
pub struct PageServerMetrics {
    /// Connections whose handshake was accepted.
    pub restores_started: AtomicU64,
    /// Restores that ended (VMM exit, uffd error or shutdown).
    pub restores_finished: AtomicU64,
    /// Connections refused for a bad handshake.
    pub handshakes_refused: AtomicU64,
    /// Restores being served now.
    pub restores_active: AtomicI64,
    /// Sum of [`RestoreMetrics::faults_served`].
    pub faults_served: AtomicU64,
    /// Sum of [`RestoreMetrics::zero_pages_served`].
    pub zero_pages_served: AtomicU64,
    /// Sum of [`RestoreMetrics::faults_already_present`].
    pub faults_already_present: AtomicU64,
    /// Faults at addresses outside every region (a VMM bug; the thread stays blocked).
    pub faults_outside_regions: AtomicU64,
    /// Sum of [`RestoreMetrics::copy_retries`].
    pub copy_retries: AtomicU64,
    /// Sum of [`RestoreMetrics::remove_events`].
    pub remove_events: AtomicU64,
    /// Bytes copied into guests by faults and prefetch.
    pub bytes_copied: AtomicU64,
    /// Bytes installed by prefetch.
    pub prefetch_bytes: AtomicU64,
    /// Working sets written by recording restores.
    pub working_sets_written: AtomicU64,
    /// Prefetch restores that found no usable working set and served lazily.
    pub working_sets_unusable: AtomicU64,
    /// Fault service latency over all restores.
    pub fault_latency: LatencyHistogram,
    /// Prefetch durations over all restores.
    pub prefetch_duration: LatencyHistogram,
}

/// A point-in-time copy of [`PageServerMetrics`].
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct PageServerMetricsSnapshot {
    /// See [`PageServerMetrics::restores_started`].
    pub restores_started: u64,
    /// See [`PageServerMetrics::restores_finished`].
    pub restores_finished: u64,
    /// See [`PageServerMetrics::handshakes_refused`].
    pub handshakes_refused: u64,
    /// See [`PageServerMetrics::restores_active`].
    pub restores_active: i64,
    /// See [`PageServerMetrics::faults_served`].
    pub faults_served: u64,
    /// See [`PageServerMetrics::zero_pages_served`].
    pub zero_pages_served: u64,
    /// See [`PageServerMetrics::faults_already_present`].
    pub faults_already_present: u64,
    /// See [`PageServerMetrics::faults_outside_regions`].
    pub faults_outside_regions: u64,
    /// See [`PageServerMetrics::copy_retries`].
    pub copy_retries: u64,
    /// See [`PageServerMetrics::remove_events`].
    pub remove_events: u64,
    /// See [`PageServerMetrics::bytes_copied`].
    pub bytes_copied: u64,
    /// See [`PageServerMetrics::prefetch_bytes`].
    pub prefetch_bytes: u64,
    /// See [`PageServerMetrics::working_sets_written`].
    pub working_sets_written: u64,
    /// See [`PageServerMetrics::working_sets_unusable`].
    pub working_sets_unusable: u64,
    /// See [`PageServerMetrics::fault_latency`].
    pub fault_latency: HistogramSnapshot,
    /// See [`PageServerMetrics::prefetch_duration`].
    pub prefetch_duration: HistogramSnapshot,
}

impl PageServerMetrics {
    /// Copies the current state.
    pub fn snapshot(&self) -> PageServerMetricsSnapshot {
        PageServerMetricsSnapshot {
            restores_started: self.restores_started.load(Relaxed),
            restores_finished: self.restores_finished.load(Relaxed),
            handshakes_refused: self.handshakes_refused.load(Relaxed),
            restores_active: self.restores_active.load(Relaxed),
            faults_served: self.faults_served.load(Relaxed),
            zero_pages_served: self.zero_pages_served.load(Relaxed),
            faults_already_present: self.faults_already_present.load(Relaxed),
            faults_outside_regions: self.faults_outside_regions.load(Relaxed),
            copy_retries: self.copy_retries.load(Relaxed),
            remove_events: self.remove_events.load(Relaxed),
            bytes_copied: self.bytes_copied.load(Relaxed),
            prefetch_bytes: self.prefetch_bytes.load(Relaxed),
            working_sets_written: self.working_sets_written.load(Relaxed),
            working_sets_unusable: self.working_sets_unusable.load(Relaxed),
            fault_latency: self.fault_latency.snapshot(),
            prefetch_duration: self.prefetch_duration.snapshot(),
        }
    }

    /// Registers every metric with `registry`; values are read at scrape time.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(Box::new(PromCollector(Arc::clone(self))));
    }
}

#[derive(Debug)]
struct PromCollector(Arc<PageServerMetrics>);

fn counter(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> std::fmt::Result {
    e.encode_descriptor(name, help, unit, MetricType::Counter)?
        .encode_counter::<(), u64, u64>(&v, None)
}

fn histogram(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    h: &HistogramSnapshot,
) -> std::fmt::Result {
    let buckets: Vec<(f64, u64)> = h
        .buckets
        .iter()
        .map(|(bound, n)| {
            let secs = if *bound == u64::MAX {
                f64::INFINITY
            } else {
                *bound as f64 / 1e9
            };
            (secs, *n)
        })
        .collect();
    e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?
        .encode_histogram::<()>(h.sum_ns as f64 / 1e9, h.count, &buckets, None)
}

impl Collector for PromCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = self.0.snapshot();
        let p = "kiln_page_server";
        let c =
            |e: &mut DescriptorEncoder<'_>, n: &str, help: &str, unit: Option<&Unit>, v: u64| {
                counter(e, &format!("{p}_{n}"), help, unit, v)
            };
        c(
            &mut e,
            "restores_started",
            "Restores whose handshake was accepted.",
            None,
            s.restores_started,
        )?;
        c(
            &mut e,
            "restores_finished",
            "Restores that ended (VMM exit, uffd error, shutdown).",
            None,
            s.restores_finished,
        )?;
        c(
            &mut e,
            "handshakes_refused",
            "Connections refused for an invalid handshake.",
            None,
            s.handshakes_refused,
        )?;
        c(
            &mut e,
            "faults_served",
            "Page faults served by copying from the memory file.",
            None,
            s.faults_served,
        )?;
        c(
            &mut e,
            "zero_pages_served",
            "Page faults served with zeros after a remove event.",
            None,
            s.zero_pages_served,
        )?;
        c(
            &mut e,
            "faults_already_present",
            "Fault messages whose page was already installed.",
            None,
            s.faults_already_present,
        )?;
        c(
            &mut e,
            "faults_outside_regions",
            "Faults at addresses outside every region.",
            None,
            s.faults_outside_regions,
        )?;
        c(
            &mut e,
            "copy_retries",
            "UFFDIO_COPY calls retried because a remove event was pending.",
            None,
            s.copy_retries,
        )?;
        c(
            &mut e,
            "remove_events",
            "UFFD_EVENT_REMOVE events received.",
            None,
            s.remove_events,
        )?;
        c(
            &mut e,
            "copied",
            "Bytes copied into guest memory by faults and prefetch.",
            Some(&Unit::Bytes),
            s.bytes_copied,
        )?;
        c(
            &mut e,
            "prefetched",
            "Bytes installed into guest memory by working-set prefetch.",
            Some(&Unit::Bytes),
            s.prefetch_bytes,
        )?;
        c(
            &mut e,
            "working_sets_written",
            "Working-set files written by recording restores.",
            None,
            s.working_sets_written,
        )?;
        c(
            &mut e,
            "working_sets_unusable",
            "Prefetch restores that found no usable working set.",
            None,
            s.working_sets_unusable,
        )?;
        e.encode_descriptor(
            &format!("{p}_restores_active"),
            "Restores being served now.",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&s.restores_active)?;
        histogram(
            &mut e,
            &format!("{p}_fault_service"),
            "Time from reading a fault message to the page being installed.",
            &s.fault_latency,
        )?;
        histogram(
            &mut e,
            &format!("{p}_prefetch_duration"),
            "Wall time of one working-set prefetch.",
            &s.prefetch_duration,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_index_is_the_first_bucket_holding_the_value() {
        let linear = |ns: u64| {
            (0..BUCKETS)
                .find(|&i| ns <= bucket_bound_ns(i))
                .unwrap_or(BUCKETS)
        };
        let mut values: Vec<u64> = vec![0, 1, 255, 256, 257, u64::MAX - 1, u64::MAX];
        for i in 0..BUCKETS {
            let b = bucket_bound_ns(i);
            values.extend([b - 1, b, b + 1]);
        }
        // And a spread of values in between (a fixed pseudo-random walk).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x >> (x % 64));
        }
        for ns in values {
            assert_eq!(bucket_index(ns), linear(ns), "{ns} ns");
        }
    }

    #[test]
    fn histogram_quantiles_bracket_the_observations() {
        let h = LatencyHistogram::default();
        for us in 1..=100u64 {
            h.observe(Duration::from_micros(us));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 100);
        let p50 = s.quantile(0.5);
        assert!(
            p50 >= Duration::from_micros(50) && p50 <= Duration::from_micros(71),
            "{p50:?}"
        );
        let p99 = s.quantile(0.99);
        assert!(
            p99 >= Duration::from_micros(99) && p99 <= Duration::from_micros(141),
            "{p99:?}"
        );
        assert_eq!(s.mean(), Duration::from_nanos(50_500));
    }

    #[test]
    fn prometheus_text_names_carry_units_and_help() {
        let m = Arc::new(PageServerMetrics::default());
        m.faults_served.fetch_add(3, Relaxed);
        m.bytes_copied.fetch_add(4096, Relaxed);
        m.fault_latency.observe(Duration::from_micros(40));
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("kiln_page_server_faults_served_total 3"),
            "{text}"
        );
        assert!(
            text.contains("kiln_page_server_copied_bytes_total 4096"),
            "{text}"
        );
        assert!(
            text.contains("# HELP kiln_page_server_fault_service_seconds"),
            "{text}"
        );
        assert!(
            text.contains("kiln_page_server_fault_service_seconds_count 1"),
            "{text}"
        );
    }
}

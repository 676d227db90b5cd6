//! The pool's Prometheus metrics, one series per template. The pool updates
//! them as events happen; [`Pool::register`](crate::Pool::register) exposes
//! them in the executor's registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::TemplateKey;

/// Buckets of `kiln_pool_create_seconds`: 5 ms (a jail with a pre-warmed
/// runtime) doubling to ~41 s (a cold microVM boot on a slow host).
const CREATE_SECONDS_START: f64 = 0.005;
const CREATE_SECONDS_BUCKETS: u16 = 14;

/// Buckets of `kiln_pool_recycle_seconds`: 0.5 ms (below the ~3 ms of a
/// verified snapshot reset) doubling to ~4 s (a reset stuck on a slow disk,
/// long enough that creating would have been faster).
const RECYCLE_SECONDS_START: f64 = 0.0005;
const RECYCLE_SECONDS_BUCKETS: u16 = 14;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TemplateLabel {
    template: String,
}

impl TemplateLabel {
    pub(crate) fn new(key: &TemplateKey) -> Self {
        Self {
            template: key.as_str().to_owned(),
        }
    }
}

type HistogramFamily = Family<TemplateLabel, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    pub(crate) hits: Family<TemplateLabel, Counter>,
    pub(crate) misses: Family<TemplateLabel, Counter>,
    pub(crate) creates: Family<TemplateLabel, Counter>,
    pub(crate) create_failures: Family<TemplateLabel, Counter>,
    pub(crate) destroys: Family<TemplateLabel, Counter>,
    pub(crate) recycles: Family<TemplateLabel, Counter>,
    pub(crate) recycle_failures: Family<TemplateLabel, Counter>,
    pub(crate) idle: Family<TemplateLabel, Gauge>,
    pub(crate) busy: Family<TemplateLabel, Gauge>,
    pub(crate) recycling: Family<TemplateLabel, Gauge>,
    pub(crate) create_seconds: HistogramFamily,
    pub(crate) recycle_seconds: HistogramFamily,
}

fn create_seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        CREATE_SECONDS_START,
        2.0,
        CREATE_SECONDS_BUCKETS,
    ))
}

fn recycle_seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        RECYCLE_SECONDS_START,
        2.0,
        RECYCLE_SECONDS_BUCKETS,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            hits: Family::default(),
            misses: Family::default(),
            creates: Family::default(),
            create_failures: Family::default(),
            destroys: Family::default(),
            recycles: Family::default(),
            recycle_failures: Family::default(),
            idle: Family::default(),
            busy: Family::default(),
            recycling: Family::default(),
            create_seconds: Family::new_with_constructor(create_seconds_histogram),
            recycle_seconds: Family::new_with_constructor(recycle_seconds_histogram),
        }
    }
}

/// One template's series, looked up once when the template is set up: the
/// handles share their values with the families, so the pool updates them
/// without a family look-up (a lock and a label hash) per event.
#[derive(Clone, Debug)]
pub(crate) struct Series {
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) creates: Counter,
    pub(crate) create_failures: Counter,
    pub(crate) destroys: Counter,
    pub(crate) recycles: Counter,
    pub(crate) recycle_failures: Counter,
    pub(crate) idle: Gauge,
    pub(crate) busy: Gauge,
    pub(crate) recycling: Gauge,
    pub(crate) create_seconds: Histogram,
    pub(crate) recycle_seconds: Histogram,
}

impl Metrics {
    /// A template's series, created at zero so that they show before the
    /// first event.
    pub(crate) fn series(&self, label: &TemplateLabel) -> Series {
        Series {
            hits: self.hits.get_or_create(label).clone(),
            misses: self.misses.get_or_create(label).clone(),
            creates: self.creates.get_or_create(label).clone(),
            create_failures: self.create_failures.get_or_create(label).clone(),
            destroys: self.destroys.get_or_create(label).clone(),
            recycles: self.recycles.get_or_create(label).clone(),
            recycle_failures: self.recycle_failures.get_or_create(label).clone(),
            idle: self.idle.get_or_create(label).clone(),
            busy: self.busy.get_or_create(label).clone(),
            recycling: self.recycling.get_or_create(label).clone(),
            create_seconds: self.create_seconds.get_or_create(label).clone(),
            recycle_seconds: self.recycle_seconds.get_or_create(label).clone(),
        }
    }

    /// Registers every family. Counter names get their `_total` suffix from
    /// the encoder.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "kiln_pool_hits",
            "Leases served by a healthy idle sandbox (warm)",
            self.hits.clone(),
        );
        registry.register(
            "kiln_pool_misses",
            "Leases that found no idle sandbox and created one on the spot (cold)",
            self.misses.clone(),
        );
        registry.register(
            "kiln_pool_creates",
            "Sandboxes created, by the background refill or by a miss",
            self.creates.clone(),
        );
        registry.register(
            "kiln_pool_create_failures",
            "Sandbox creates that failed",
            self.create_failures.clone(),
        );
        registry.register(
            "kiln_pool_destroys",
            "Sandboxes destroyed (remove-on-exit, retired by max_uses or max_age, failed health check, failed recycle, shutdown)",
            self.destroys.clone(),
        );
        registry.register(
            "kiln_pool_recycles",
            "Sandboxes reset after a lease and made fresh for the next one",
            self.recycles.clone(),
        );
        registry.register(
            "kiln_pool_recycle_failures",
            "Sandbox resets after a lease that failed (the sandbox was destroyed)",
            self.recycle_failures.clone(),
        );
        registry.register(
            "kiln_pool_idle_sandboxes",
            "Sandboxes ready and waiting for a lease",
            self.idle.clone(),
        );
        registry.register(
            "kiln_pool_busy_sandboxes",
            "Sandboxes leased out (including those being health-checked for a lease)",
            self.busy.clone(),
        );
        registry.register(
            "kiln_pool_recycling_sandboxes",
            "Sandboxes being reset after a lease, on their way back to idle",
            self.recycling.clone(),
        );
        registry.register(
            "kiln_pool_create_seconds",
            "Time to create a sandbox that came up, in seconds",
            self.create_seconds.clone(),
        );
        registry.register(
            "kiln_pool_recycle_seconds",
            "Time to reset a sandbox that came back fresh, in seconds",
            self.recycle_seconds.clone(),
        );
    }
}

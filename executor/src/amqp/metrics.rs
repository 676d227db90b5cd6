//! Metrics of the AMQP path, registered into the daemon's registry next to
//! the scheduler's: what was consumed, how each message was settled, how
//! long the broker took to confirm results, and how often the connection
//! had to be re-established.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// Shared handles to every AMQP family; cheap to clone.
#[derive(Clone, Debug)]
pub struct AmqpMetrics {
    consumed: Counter,
    acked: Counter,
    rejected: Family<ReasonLabels, Counter>,
    requeued: Counter,
    redelivered: Counter,
    republished: Counter,
    duplicates: Counter,
    confirm_latency: Histogram,
    reconnects: Counter,
    connected: Gauge,
    prefetch: Gauge,
}

impl Default for AmqpMetrics {
    fn default() -> Self {
        Self {
            consumed: Counter::default(),
            acked: Counter::default(),
            rejected: Family::default(),
            requeued: Counter::default(),
            redelivered: Counter::default(),
            republished: Counter::default(),
            duplicates: Counter::default(),
            // 50 µs doubling to ~26 s: a loopback confirm takes well under a
            // millisecond, a broker under disk pressure seconds.
            confirm_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 20)),
            reconnects: Counter::default(),
            connected: Gauge::default(),
            prefetch: Gauge::default(),
        }
    }
}

impl AmqpMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "kiln_amqp_messages_consumed",
            "Job messages delivered by the broker (redeliveries included)",
            self.consumed.clone(),
        );
        r.register(
            "kiln_amqp_messages_acked",
            "Job messages acknowledged after their result was confirmed by the broker",
            self.acked.clone(),
        );
        r.register(
            "kiln_amqp_messages_rejected",
            "Job messages dead-lettered, by reason (body, job, id, runtime, expired, ...: the field at fault)",
            self.rejected.clone(),
        );
        r.register(
            "kiln_amqp_messages_requeued",
            "Job messages handed back to the queue unanswered (shutdown, broker nack)",
            self.requeued.clone(),
        );
        r.register(
            "kiln_amqp_messages_redelivered",
            "Job messages that arrived with the redelivered flag",
            self.redelivered.clone(),
        );
        r.register(
            "kiln_amqp_results_republished",
            "Stored results published again for a redelivered or repeated job id instead of running it again",
            self.republished.clone(),
        );
        r.register(
            "kiln_amqp_duplicates_suppressed",
            "Messages for a job id whose result was already confirmed: acked without a second result",
            self.duplicates.clone(),
        );
        r.register_with_unit(
            "kiln_amqp_publish_confirm",
            "Time from publishing a result (or dead letter) to the broker's confirm",
            Unit::Seconds,
            self.confirm_latency.clone(),
        );
        r.register(
            "kiln_amqp_consumer_reconnects",
            "Times the AMQP connection was lost (or could not be made) and re-established",
            self.reconnects.clone(),
        );
        r.register(
            "kiln_amqp_connected",
            "1 while connected to the broker (consuming, or paused for capacity), else 0",
            self.connected.clone(),
        );
        r.register(
            "kiln_amqp_prefetch",
            "The prefetch count last sent to the broker (0: consumer paused)",
            self.prefetch.clone(),
        );
    }

    pub(crate) fn consumed(&self, redelivered: bool) {
        self.consumed.inc();
        if redelivered {
            self.redelivered.inc();
        }
    }

    pub(crate) fn acked(&self) {
        self.acked.inc();
    }

    pub(crate) fn rejected(&self, reason: &str) {
        self.rejected
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    pub(crate) fn requeued(&self) {
        self.requeued.inc();
    }

    pub(crate) fn republished(&self) {
        self.republished.inc();
    }

    pub(crate) fn duplicate(&self) {
        self.duplicates.inc();
    }

    pub(crate) fn confirmed_in(&self, d: Duration) {
        self.confirm_latency.observe(d.as_secs_f64());
    }

    pub(crate) fn reconnect(&self) {
        self.reconnects.inc();
    }

    pub(crate) fn set_connected(&self, up: bool) {
        self.connected.set(i64::from(up));
    }

    pub(crate) fn set_prefetch(&self, n: u16) {
        self.prefetch.set(i64::from(n));
    }
}

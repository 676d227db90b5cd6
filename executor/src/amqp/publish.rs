//! Publishing with publisher confirms: results to `reply_to` and the results
//! exchange, dead letters to the dead-letter exchange. A publication counts
//! only once the broker confirmed it; the job message is acked after that,
//! never before.

use std::time::{Duration, Instant};

use kiln_protocol::JobResult;
use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};

use super::message::{self, Poison};
use super::metrics::AmqpMetrics;

/// Longest wait for a confirm. A broker under memory or disk alarm blocks
/// publishers; past this the connection is treated as lost (the job message
/// stays unacked and is redelivered).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a publication did not count.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The channel or connection failed; the job message will be redelivered.
    #[error("publishing failed: the channel is gone")]
    Lost(#[from] lapin::Error),
    /// The broker refused the message (`basic.nack`).
    #[error("the broker refused the publication (basic.nack)")]
    Nacked,
    /// No confirm came within the bound.
    #[error("no publisher confirm within {0:?}")]
    Timeout(Duration),
}

/// A channel in confirm mode, with the metrics it reports to.
#[derive(Clone)]
pub struct Outbox {
    pub channel: Channel,
    pub metrics: AmqpMetrics,
    pub results_exchange: String,
    pub dead_letter_exchange: String,
    pub queue: String,
}

impl Outbox {
    async fn start(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
        mandatory: bool,
    ) -> Result<(Instant, PublisherConfirm), PublishError> {
        let t = Instant::now();
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                body,
                props,
            )
            .await?;
        Ok((t, confirm))
    }

    async fn finish(&self, (t, confirm): (Instant, PublisherConfirm)) -> Result<(), PublishError> {
        let c = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map_err(|_| PublishError::Timeout(CONFIRM_TIMEOUT))??;
        self.metrics.confirmed_in(t.elapsed());
        match c {
            Confirmation::Ack(returned) => {
                if let Some(r) = returned {
                    // The reply queue does not exist (any more): the producer
                    // is gone; nothing will ever read this result.
                    tracing::warn!(
                        routing_key = %r.delivery.routing_key,
                        reply = %r.reply_text,
                        "a result was unroutable and dropped by the broker"
                    );
                }
                Ok(())
            }
            Confirmation::Nack(_) => Err(PublishError::Nacked),
            Confirmation::NotRequested => Ok(()),
        }
    }

    /// Publishes `result` to `reply_to` (default exchange) and to the
    /// results exchange when configured, and waits for both confirms.
    pub async fn result(
        &self,
        result: &JobResult,
        reply_to: Option<&ShortString>,
        correlation_id: Option<&ShortString>,
    ) -> Result<(), PublishError> {
        let body = serde_json::to_vec(result).unwrap_or_default();
        let props = message::result_properties(result, correlation_id);
        let mut pending = Vec::with_capacity(2);
        if let Some(r) = reply_to.filter(|r| !r.as_str().is_empty()) {
            pending.push(
                self.start("", r.as_str(), &body, props.clone(), true)
                    .await?,
            );
        }
        if !self.results_exchange.is_empty() {
            pending.push(
                self.start(
                    &self.results_exchange,
                    result.outcome.as_str(),
                    &body,
                    props,
                    false,
                )
                .await?,
            );
        }
        for p in pending {
            self.finish(p).await?;
        }
        Ok(())
    }

    /// Publishes a copy of `d` to the dead-letter exchange with the reason
    /// in its headers, and waits for the confirm.
    pub async fn dead_letter(&self, d: &Delivery, poison: &Poison) -> Result<(), PublishError> {
        let props = message::dead_letter_properties(d, poison, &self.queue);
        let p = self
            .start(
                &self.dead_letter_exchange,
                &self.queue,
                &d.data,
                props,
                false,
            )
            .await?;
        self.finish(p).await
    }
}

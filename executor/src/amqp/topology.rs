//! The broker objects Kiln uses, declared idempotently on every (re)connect:
//!
//! ```text
//! producer ──► [jobs queue, durable] ──► kiln serve ──► reply_to (default exchange)
//!                   │ x-dead-letter-exchange            └─► [results exchange, topic] (optional)
//!                   ▼
//!              [dead-letter exchange, fanout] ──► [dead-letter queue, durable]
//! ```
//!
//! Kiln publishes poison messages to the dead-letter exchange itself (so it
//! can add `x-kiln-error`); the broker dead-letters there too (expired
//! messages, quorum delivery-limit). Redeclaring with the same arguments is a
//! no-op; different arguments make RabbitMQ refuse (`PRECONDITION_FAILED`),
//! which is reported with what to do.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use super::config::{AmqpConfig, QueueType};

/// Why the topology could not be declared.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// Declaring one object failed (for an existing queue with other
    /// arguments: delete it, or set the config to match it).
    #[error("declaring {what} {name:?} (an existing one with other arguments must be deleted or matched by the config)")]
    Declare {
        what: &'static str,
        name: String,
        #[source]
        source: lapin::Error,
    },
}

/// The jobs queue's arguments.
pub fn jobs_queue_arguments(cfg: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(
            cfg.dead_letter_exchange.as_bytes().to_vec(),
        )),
    );
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(
            cfg.queue_type.as_str().as_bytes().to_vec(),
        )),
    );
    if cfg.queue_type == QueueType::Classic && cfg.max_priority > 0 {
        args.insert(
            "x-max-priority".into(),
            AMQPValue::LongInt(i32::from(cfg.max_priority)),
        );
    }
    args
}

/// Declares the dead-letter exchange and queue, the jobs queue and the
/// results exchange (when configured).
pub async fn declare(ch: &Channel, cfg: &AmqpConfig) -> Result<(), TopologyError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let err = |what: &'static str, name: &str| {
        let name = name.to_owned();
        move |source| TopologyError::Declare { what, name, source }
    };
    ch.exchange_declare(
        cfg.dead_letter_exchange.as_str().into(),
        ExchangeKind::Fanout,
        durable,
        FieldTable::default(),
    )
    .await
    .map_err(err("the dead-letter exchange", &cfg.dead_letter_exchange))?;
    ch.queue_declare(
        cfg.dead_letter_queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .map_err(err("the dead-letter queue", &cfg.dead_letter_queue))?;
    ch.queue_bind(
        cfg.dead_letter_queue.as_str().into(),
        cfg.dead_letter_exchange.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(err("the dead-letter binding of", &cfg.dead_letter_queue))?;
    ch.queue_declare(
        cfg.queue.as_str().into(),
        QueueDeclareOptions::durable(),
        jobs_queue_arguments(cfg),
    )
    .await
    .map_err(err("the jobs queue", &cfg.queue))?;
    if !cfg.results_exchange.is_empty() {
        ch.exchange_declare(
            cfg.results_exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(err("the results exchange", &cfg.results_exchange))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_queues_get_priorities_and_quorum_queues_do_not() {
        let mut cfg = AmqpConfig::default();
        let args = jobs_queue_arguments(&cfg);
        assert!(args.contains_key("x-max-priority"));
        assert!(args.contains_key("x-dead-letter-exchange"));
        cfg.queue_type = QueueType::Quorum;
        cfg.max_priority = 0;
        let args = jobs_queue_arguments(&cfg);
        assert!(!args.contains_key("x-max-priority"));
        assert_eq!(
            args.inner().get("x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
    }
}

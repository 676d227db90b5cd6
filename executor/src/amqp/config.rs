//! The `[amqp]` section of `kiln serve`'s configuration and its flags. AMQP
//! intake is off until `url` is set (`--amqp-url`, `KILN_AMQP_URL`).

use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

/// Which kind of RabbitMQ queue holds the jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// A durable classic queue: message priorities, and a prefetch that
    /// follows free capacity at once (channel-wide `basic.qos`).
    #[default]
    Classic,
    /// A quorum queue (replicated; redeliveries bounded by a delivery-limit
    /// policy). Quorum queues refuse channel-wide QoS, so the prefetch is set
    /// per consumer and follows capacity only when the consumer restarts.
    Quorum,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// `[amqp]`: job intake from RabbitMQ. See `docs/amqp.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// Broker URI, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`; empty
    /// disables AMQP intake.
    pub url: String,
    /// The durable queue jobs are consumed from.
    pub queue: String,
    /// `classic` or `quorum`.
    pub queue_type: QueueType,
    /// `x-max-priority` of a classic jobs queue (0: no priorities). Changing
    /// it for an existing queue needs the queue deleted first (RabbitMQ
    /// refuses to redeclare a queue with other arguments).
    pub max_priority: u8,
    /// The dead-letter exchange (fanout) for messages that can never succeed.
    pub dead_letter_exchange: String,
    /// The queue bound to the dead-letter exchange.
    pub dead_letter_queue: String,
    /// A topic exchange every result is also published to, routing key = the
    /// outcome (`ok`, `error`, ...); empty: results go to `reply_to` only.
    pub results_exchange: String,
    /// Upper bound of the prefetch (0: the scheduler's capacity,
    /// `scheduler.max_running + scheduler.queue_depth`).
    pub prefetch_max: u16,
    /// First reconnect delay after the connection is lost, in ms.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, in ms (the delay doubles up to it, jittered).
    pub reconnect_max_ms: u64,
    /// Largest job message body accepted, in bytes; larger ones are
    /// dead-lettered unparsed (the same bound as the HTTP API's default).
    pub max_message_bytes: u64,
    /// Finished results remembered to answer redeliveries, at most.
    pub result_store_max: usize,
    /// How long a finished result is remembered, in seconds.
    pub result_store_ttl_s: u64,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            queue: "kiln.jobs".into(),
            queue_type: QueueType::Classic,
            max_priority: 9,
            dead_letter_exchange: "kiln.jobs.dlx".into(),
            dead_letter_queue: "kiln.jobs.dead".into(),
            results_exchange: String::new(),
            prefetch_max: 0,
            reconnect_min_ms: 100,
            reconnect_max_ms: 10_000,
            max_message_bytes: 16 * 1024 * 1024,
            result_store_max: 100_000,
            result_store_ttl_s: 3600,
        }
    }
}

impl AmqpConfig {
    /// Whether AMQP intake is configured.
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// Refuses values that cannot work, naming the key.
    pub fn check(&self) -> anyhow::Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        anyhow::ensure!(
            self.url.starts_with("amqp://") || self.url.starts_with("amqps://"),
            "amqp.url must start with amqp:// or amqps://"
        );
        for (key, v) in [
            ("amqp.queue", &self.queue),
            ("amqp.dead_letter_exchange", &self.dead_letter_exchange),
            ("amqp.dead_letter_queue", &self.dead_letter_queue),
        ] {
            anyhow::ensure!(
                !v.is_empty() && v.len() <= 255,
                "{key} must be 1 to 255 bytes long"
            );
        }
        anyhow::ensure!(
            self.results_exchange.len() <= 255,
            "amqp.results_exchange must be at most 255 bytes long"
        );
        anyhow::ensure!(
            self.reconnect_min_ms >= 1 && self.reconnect_min_ms <= self.reconnect_max_ms,
            "amqp.reconnect_min_ms must be between 1 and amqp.reconnect_max_ms ({})",
            self.reconnect_max_ms
        );
        anyhow::ensure!(
            self.max_message_bytes >= 1024,
            "amqp.max_message_bytes is below 1024: jobs could not be submitted"
        );
        anyhow::ensure!(
            self.result_store_max >= 1,
            "amqp.result_store_max is 0: set it to at least 1"
        );
        anyhow::ensure!(
            self.queue_type == QueueType::Classic || self.max_priority == 0,
            "amqp.max_priority must be 0 with amqp.queue_type = \"quorum\" (quorum queues have no priorities)"
        );
        Ok(())
    }

    pub fn reconnect_min(&self) -> Duration {
        Duration::from_millis(self.reconnect_min_ms)
    }

    pub fn reconnect_max(&self) -> Duration {
        Duration::from_millis(self.reconnect_max_ms)
    }

    pub fn result_store_ttl(&self) -> Duration {
        Duration::from_secs(self.result_store_ttl_s)
    }

    /// The URL with any password replaced, for logs and `--print-config`.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

/// `amqp://user:secret@host/` → `amqp://user:<redacted>@host/`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.split_once('@') {
        Some(x) => x,
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => url.to_owned(),
    }
}

/// `kiln serve`'s AMQP flags; each overrides the `[amqp]` key of the same
/// name.
#[derive(Debug, Clone, Default, Args)]
pub struct AmqpArgs {
    /// amqp.url
    #[arg(
        long,
        env = "KILN_AMQP_URL",
        value_name = "URI",
        hide_env_values = true
    )]
    pub amqp_url: Option<String>,
    /// amqp.queue
    #[arg(long, env = "KILN_AMQP_QUEUE", value_name = "NAME")]
    pub amqp_queue: Option<String>,
    /// amqp.queue_type
    #[arg(long, env = "KILN_AMQP_QUEUE_TYPE", value_name = "TYPE")]
    pub amqp_queue_type: Option<QueueType>,
    /// amqp.max_priority
    #[arg(long, env = "KILN_AMQP_MAX_PRIORITY", value_name = "N")]
    pub amqp_max_priority: Option<u8>,
    /// amqp.dead_letter_exchange
    #[arg(long, env = "KILN_AMQP_DEAD_LETTER_EXCHANGE", value_name = "NAME")]
    pub amqp_dead_letter_exchange: Option<String>,
    /// amqp.dead_letter_queue
    #[arg(long, env = "KILN_AMQP_DEAD_LETTER_QUEUE", value_name = "NAME")]
    pub amqp_dead_letter_queue: Option<String>,
    /// amqp.results_exchange
    #[arg(long, env = "KILN_AMQP_RESULTS_EXCHANGE", value_name = "NAME")]
    pub amqp_results_exchange: Option<String>,
    /// amqp.prefetch_max
    #[arg(long, env = "KILN_AMQP_PREFETCH_MAX", value_name = "N")]
    pub amqp_prefetch_max: Option<u16>,
    /// amqp.reconnect_min_ms
    #[arg(long, env = "KILN_AMQP_RECONNECT_MIN_MS", value_name = "MS")]
    pub amqp_reconnect_min_ms: Option<u64>,
    /// amqp.reconnect_max_ms
    #[arg(long, env = "KILN_AMQP_RECONNECT_MAX_MS", value_name = "MS")]
    pub amqp_reconnect_max_ms: Option<u64>,
    /// amqp.max_message_bytes
    #[arg(long, env = "KILN_AMQP_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub amqp_max_message_bytes: Option<u64>,
    /// amqp.result_store_max
    #[arg(long, env = "KILN_AMQP_RESULT_STORE_MAX", value_name = "N")]
    pub amqp_result_store_max: Option<usize>,
    /// amqp.result_store_ttl_s
    #[arg(long, env = "KILN_AMQP_RESULT_STORE_TTL_S", value_name = "SECONDS")]
    pub amqp_result_store_ttl_s: Option<u64>,
}

impl AmqpArgs {
    /// Overlays the flags given onto `c`.
    pub fn apply(&self, c: &mut AmqpConfig) {
        macro_rules! over {
            ($flag:ident => $key:ident) => {
                if let Some(v) = self.$flag.clone() {
                    c.$key = v;
                }
            };
        }
        over!(amqp_url => url);
        over!(amqp_queue => queue);
        over!(amqp_queue_type => queue_type);
        over!(amqp_max_priority => max_priority);
        over!(amqp_dead_letter_exchange => dead_letter_exchange);
        over!(amqp_dead_letter_queue => dead_letter_queue);
        over!(amqp_results_exchange => results_exchange);
        over!(amqp_prefetch_max => prefetch_max);
        over!(amqp_reconnect_min_ms => reconnect_min_ms);
        over!(amqp_reconnect_max_ms => reconnect_max_ms);
        over!(amqp_max_message_bytes => max_message_bytes);
        over!(amqp_result_store_max => result_store_max);
        over!(amqp_result_store_ttl_s => result_store_ttl_s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_by_default_and_defaults_pass_the_check() {
        let c = AmqpConfig::default();
        assert!(!c.enabled());
        c.check().unwrap();
        let on = AmqpConfig {
            url: "amqp://127.0.0.1:5672/%2f".into(),
            ..c
        };
        on.check().unwrap();
    }

    #[test]
    fn flags_override_the_file() {
        let mut c: AmqpConfig = toml::from_str("queue = 'a'\nprefetch_max = 3\n").unwrap();
        AmqpArgs {
            amqp_queue: Some("b".into()),
            ..AmqpArgs::default()
        }
        .apply(&mut c);
        assert_eq!(c.queue, "b");
        assert_eq!(c.prefetch_max, 3);
    }

    #[test]
    fn quorum_queues_refuse_priorities_by_key() {
        let c = AmqpConfig {
            url: "amqp://h".into(),
            queue_type: QueueType::Quorum,
            ..AmqpConfig::default()
        };
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("amqp.max_priority"), "{e}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("amqp://kiln:s3cret@127.0.0.1:5672/%2f"),
            "amqp://kiln:<redacted>@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}

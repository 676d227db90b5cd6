//! `kiln serve`'s AMQP intake as a target, in the RPC pattern of
//! `docs/amqp.md`: every job is published to the jobs queue (default
//! exchange, routing key = the queue, `mandatory`, persistent JSON) with
//! `reply_to` = this run's exclusive reply queue and a fresh
//! `correlation_id`, which is also its `message_id` and so its job id. Ids
//! are unique per run because the server answers a repeated id from its
//! result store without running the job again. Publishes wait for the
//! broker's confirm; replies are matched back to their job by correlation
//! id.
//!
//! One connection: a channel in confirm mode publishes, another consumes
//! the reply queue (no acks: the queue is this run's alone). A job's
//! latency runs from its intended send time to its reply, so it includes
//! the publish, the confirm, the time in the queue and the reply. The load
//! generator does not reconnect: a lost connection fails the jobs in flight
//! and every later one, which the report counts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use tokio::sync::oneshot;

use super::{ending_of, Attempt};
use crate::stats::Ending;

/// AMQP 0-9-1 `delivery-mode` 2: the broker writes the job to disk, as
/// `docs/amqp.md` asks of producers (basic properties, spec section 1.8.2).
const PERSISTENT: u8 = 2;

/// Longest wait for the connection to close at the end of the run.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the AMQP target could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AmqpSetupError {
    /// The URL does not parse.
    #[error("--amqp-url {url}: {reason}; expected e.g. amqp://guest:guest@127.0.0.1:5672/%2f")]
    Url { url: String, reason: String },
    /// The broker is not on this host.
    #[error("--amqp-url {url}: the broker must be on loopback (127.0.0.0/8, ::1 or localhost), not {host:?}")]
    NotLoopback { url: String, host: String },
    /// The job names its own id, so every message would be the same job.
    #[error("the job carries an `id`, so every AMQP job would be the same job (the server answers a repeated id from its result store without running it); remove `id`: each job gets its own id as its message_id")]
    FixedId,
    /// Connecting (TCP, AMQP handshake, credentials) failed.
    #[error("connecting to the broker at {url}")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    /// The jobs queue is not there; `kiln serve` declares it when it
    /// connects.
    #[error("the jobs queue {queue:?} does not exist on the broker: start `kiln serve --amqp-url ... --amqp-queue {queue}` first (it declares the queue), or name the queue it consumes")]
    NoQueue {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    /// Opening a channel, confirm mode, the reply queue or its consumer
    /// failed.
    #[error("{what}")]
    Setup {
        what: &'static str,
        #[source]
        source: lapin::Error,
    },
}

/// The URL with any password replaced, for the report and errors.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Replies still awaited, by correlation id; `closed` says why no more
/// will come once the reply consumer stopped. One lock for both, so that a
/// job cannot register after the consumer gave up and wait for nothing.
#[derive(Default)]
struct Waiting {
    replies: HashMap<String, oneshot::Sender<Vec<u8>>>,
    closed: Option<String>,
}

/// Removes a job's entry when its attempt ends, however it ends (a reply,
/// an error, the caller's timeout), so the map holds only jobs in flight.
struct Registered<'a> {
    waiting: &'a Mutex<Waiting>,
    id: String,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.waiting
            .lock()
            .expect("waiting lock")
            .replies
            .remove(&self.id);
    }
}

/// The jobs queue of a broker, with this run's reply queue.
pub struct AmqpTarget {
    conn: Connection,
    publish: Channel,
    queue: String,
    reply_to: ShortString,
    body: Vec<u8>,
    expect_stdout: Option<String>,
    /// Prefix of this run's job ids.
    run_id: String,
    next: AtomicU64,
    waiting: Arc<Mutex<Waiting>>,
    endpoint: String,
    /// Consumers of the jobs queue when the run began (0: nobody will
    /// answer until a `kiln serve` starts consuming).
    pub consumers_at_start: u32,
    dispatcher: tokio::task::JoinHandle<()>,
}

impl AmqpTarget {
    /// Connects to the broker at `url` (loopback only), checks that `queue`
    /// exists, and opens this run's reply queue.
    pub async fn connect(
        url: &str,
        queue: &str,
        body: Vec<u8>,
        expect_stdout: Option<String>,
    ) -> Result<Self, AmqpSetupError> {
        let shown = redacted(url);
        let uri: AMQPUri = url.parse().map_err(|reason| AmqpSetupError::Url {
            url: shown.clone(),
            reason,
        })?;
        let host = uri
            .authority
            .host
            .trim_start_matches('[')
            .trim_end_matches(']');
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(AmqpSetupError::NotLoopback {
                url: shown,
                host: host.to_owned(),
            });
        }
        if serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .is_some_and(|v| v.get("id").is_some())
        {
            return Err(AmqpSetupError::FixedId);
        }
        let props = ConnectionProperties::default().with_connection_name(LongString::from(
            format!("kiln-loadtest pid {}", std::process::id()).into_bytes(),
        ));
        let conn =
            Connection::connect(url, props)
                .await
                .map_err(|source| AmqpSetupError::Connect {
                    url: shown.clone(),
                    source,
                })?;
        let setup = |what: &'static str| move |source| AmqpSetupError::Setup { what, source };
        // A passive declare of a missing queue closes its channel (404), so
        // it gets a channel of its own.
        let probe = conn
            .create_channel()
            .await
            .map_err(setup("opening a channel"))?;
        let jobs = probe
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|source| AmqpSetupError::NoQueue {
                queue: queue.to_owned(),
                source,
            })?;
        let _ = probe.close(200, "checked".into()).await;
        let publish = conn
            .create_channel()
            .await
            .map_err(setup("opening the publishing channel"))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(setup("turning on publisher confirms"))?;
        let consume = conn
            .create_channel()
            .await
            .map_err(setup("opening the reply channel"))?;
        // Server-named, exclusive to this connection, gone with it.
        let replies = consume
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(setup("declaring the reply queue"))?;
        let reply_to = replies.name().clone();
        let consumer = consume
            .basic_consume(
                reply_to.clone(),
                "kiln-loadtest".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(setup("consuming the reply queue"))?;
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let dispatcher = tokio::spawn(dispatch(consumer, waiting.clone()));
        Ok(Self {
            conn,
            publish,
            queue: queue.to_owned(),
            reply_to,
            body,
            expect_stdout,
            run_id: format!("lt-{}", kiln_protocol::JobId::random().as_str()),
            next: AtomicU64::new(0),
            waiting,
            endpoint: format!("{shown} queue {queue}"),
            consumers_at_start: jobs.consumer_count(),
            dispatcher,
        })
    }

    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// Publishes the job once and waits for its reply.
    pub async fn attempt(&self) -> Attempt {
        let fail = |e: String| Attempt::Done(Ending::Failed(e));
        let id = format!(
            "{}-{}",
            self.run_id,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = oneshot::channel();
        {
            let mut w = self.waiting.lock().expect("waiting lock");
            if let Some(why) = &w.closed {
                return fail(why.clone());
            }
            w.replies.insert(id.clone(), tx);
        }
        let _registered = Registered {
            waiting: &self.waiting,
            id: id.clone(),
        };
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(PERSISTENT)
            .with_reply_to(self.reply_to.clone())
            .with_correlation_id(id.as_str().into())
            .with_message_id(id.as_str().into());
        let confirm = match self
            .publish
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &self.body,
                props,
            )
            .await
        {
            Ok(c) => c,
            Err(e) => return fail(format!("publishing the job: {e}")),
        };
        match confirm.await {
            Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => {}
            Ok(Confirmation::Ack(Some(r))) => {
                return fail(format!(
                "the broker returned the job as unroutable ({}): is the queue {:?} still there?",
                r.reply_text, self.queue
            ))
            }
            Ok(Confirmation::Nack(_)) => {
                return fail("the broker refused the job (basic.nack)".into())
            }
            Err(e) => return fail(format!("waiting for the publisher confirm: {e}")),
        }
        match rx.await {
            Ok(body) => Attempt::Done(ending_of(&body, self.expect_stdout.as_deref())),
            Err(_) => {
                let why = self.waiting.lock().expect("waiting lock").closed.clone();
                fail(why.unwrap_or_else(|| "the reply consumer stopped".into()))
            }
        }
    }

    /// Closes the connection (the reply queue goes with it).
    pub async fn close(&self) {
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            self.conn.close(200, "kiln-loadtest is done".into()),
        )
        .await;
    }
}

impl Drop for AmqpTarget {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

/// Hands every reply to the job waiting for its correlation id, until the
/// consumer ends (the connection closed); then fails every job still
/// waiting. Replies nobody waits for (their job timed out) are dropped.
async fn dispatch(mut consumer: Consumer, waiting: Arc<Mutex<Waiting>>) {
    let why = loop {
        match consumer.next().await {
            Some(Ok(d)) => {
                let Some(corr) = d.properties.correlation_id() else {
                    continue;
                };
                let tx = waiting
                    .lock()
                    .expect("waiting lock")
                    .replies
                    .remove(corr.as_str());
                if let Some(tx) = tx {
                    let _ = tx.send(d.data);
                }
            }
            Some(Err(e)) => break format!("the reply consumer failed: {e}"),
            None => break "the AMQP connection closed".to_owned(),
        }
    };
    let mut w = waiting.lock().expect("waiting lock");
    w.closed = Some(why);
    // Dropping the senders wakes every job still waiting.
    w.replies.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redacted("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redacted("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }

    #[tokio::test]
    async fn only_loopback_brokers_and_jobs_without_ids_are_accepted() {
        let e = AmqpTarget::connect("amqp://u:p@10.1.2.3:5672/%2f", "q", b"{}".to_vec(), None)
            .await
            .err()
            .unwrap();
        assert!(matches!(e, AmqpSetupError::NotLoopback { .. }), "{e}");
        assert!(!e.to_string().contains(":p@"), "{e}");
        let e = AmqpTarget::connect(
            "amqp://127.0.0.1:1/%2f",
            "q",
            br#"{"id":"x","runtime":"python","code":"1"}"#.to_vec(),
            None,
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(e, AmqpSetupError::FixedId), "{e}");
        let e = AmqpTarget::connect("http://127.0.0.1/", "q", b"{}".to_vec(), None)
            .await
            .err()
            .unwrap();
        assert!(matches!(e, AmqpSetupError::Url { .. }), "{e}");
    }
}

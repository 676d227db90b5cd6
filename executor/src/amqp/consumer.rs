//! The consumer: one connection at a time (a *session*), two channels (one
//! consuming, one publishing in confirm mode), a prefetch that follows the
//! scheduler's free capacity, and one task per delivery that runs the job
//! (or reuses the stored result), publishes the result with confirms, and
//! only then acks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_lite::StreamExt as _;
use kiln_protocol::{JobId, JobResult, JobSpec, Outcome};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use tokio::sync::{watch, Notify};
use tracing::Instrument as _;

use super::config::{AmqpConfig, QueueType};
use super::message::{self, Poison};
use super::metrics::AmqpMetrics;
use super::publish::{Outbox, PublishError};
use super::store::{Claim, ResultStore, Slot, SlotState};
use super::topology;
use crate::jobs::JobRecord;
use crate::scheduler::{AdmitError, JobSource, Phase, Scheduler, SubmitOptions};

/// How often the session re-checks the connection and the prefetch even
/// without an event (a backstop; events drive both).
const TICK: Duration = Duration::from_millis(250);

/// How many times (about a second apart) a delivery that lost the race for
/// a slot to HTTP retries before it goes back to the queue.
const BUSY_RETRIES: usize = 30;

/// How long buffered deliveries of a cancelled consumer are waited for.
const CANCEL_DRAIN: Duration = Duration::from_secs(5);

/// Why a session ended other than by request.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The broker could not be reached or refused the connection.
    #[error("connecting to the broker")]
    Connect(#[source] lapin::Error),
    /// Opening a channel or setting it up failed.
    #[error("setting up a channel")]
    Channel(#[source] lapin::Error),
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    /// The connection or the consumer failed while consuming.
    #[error("the connection to the broker was lost")]
    Lost(#[source] Option<lapin::Error>),
}

/// What every session and delivery task shares.
pub struct Shared {
    pub cfg: AmqpConfig,
    pub scheduler: Scheduler,
    pub metrics: AmqpMetrics,
    pub store: ResultStore,
    /// Deliveries taken from the broker and not yet settled (acked, nacked,
    /// or abandoned with their channel).
    pub held: watch::Sender<usize>,
    /// This intake's jobs admitted by the scheduler, until their result
    /// was handed over (their records say whether they finished).
    admitted: Mutex<HashMap<JobId, Arc<JobRecord>>>,
    /// Poked whenever `admitted` changes (the prefetch depends on it).
    recalc: Notify,
    /// Set by shutdown: until when in-flight jobs may still be answered.
    pub stop_deadline: Mutex<Option<tokio::time::Instant>>,
}

impl Shared {
    pub fn new(
        cfg: AmqpConfig,
        scheduler: Scheduler,
        metrics: AmqpMetrics,
        store: ResultStore,
    ) -> Self {
        Self {
            cfg,
            scheduler,
            metrics,
            store,
            held: watch::Sender::new(0),
            admitted: Mutex::new(HashMap::new()),
            recalc: Notify::new(),
            stop_deadline: Mutex::new(None),
        }
    }

    /// The prefetch the broker should use now: this intake's running jobs
    /// plus the scheduler's free capacity (which already subtracts what HTTP
    /// holds), so that unacked messages never exceed what can be started.
    /// 0 means "pause": AMQP's prefetch 0 would mean unlimited.
    fn prefetch_target(&self) -> u16 {
        // Free capacity first, then this intake's unfinished jobs: a job
        // finishes (its record says Done) before the scheduler frees its
        // slot, so in this order no job is counted twice (once as running,
        // once as a free slot); at worst one is counted in neither, which
        // only makes the prefetch briefly smaller.
        let free = self.scheduler.free_capacity();
        let running = self
            .admitted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|r| r.phase() != Phase::Done)
            .count();
        let n = free + running;
        let cap = match self.cfg.prefetch_max {
            0 => u16::MAX,
            m => m,
        };
        n.min(usize::from(cap)) as u16
    }
}

/// Counts a delivery as held until dropped.
struct HeldGuard<'a>(&'a Shared);

impl<'a> HeldGuard<'a> {
    fn new(s: &'a Shared) -> Self {
        s.held.send_modify(|n| *n += 1);
        Self(s)
    }
}

impl Drop for HeldGuard<'_> {
    fn drop(&mut self) {
        self.0.held.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// One connection's channels.
pub struct Link {
    consume: Channel,
    outbox: Outbox,
}

impl Link {
    /// Whether acks and publications on this link can still work.
    fn alive(&self) -> bool {
        self.consume.status().connected() && self.outbox.channel.status().connected()
    }
}

/// Connects, declares, consumes until `stop` or a failure. `on_consuming`
/// runs once the consumer is registered (resets the reconnect backoff).
pub async fn session(
    shared: &Arc<Shared>,
    stop: &mut watch::Receiver<bool>,
    on_consuming: impl FnOnce(),
) -> Result<(), SessionError> {
    let cfg = &shared.cfg;
    let props = ConnectionProperties::default().with_connection_name(LongString::from(
        format!("kiln serve pid {}", std::process::id()).into_bytes(),
    ));
    let conn = Connection::connect(&cfg.url, props)
        .await
        .map_err(SessionError::Connect)?;
    let result = consume(shared, &conn, stop, on_consuming).await;
    shared.metrics.set_connected(false);
    if conn.status().connected() {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            conn.close(200, "kiln serve is stopping".into()),
        )
        .await;
    }
    result
}

async fn consume(
    shared: &Arc<Shared>,
    conn: &Connection,
    stop: &mut watch::Receiver<bool>,
    on_consuming: impl FnOnce(),
) -> Result<(), SessionError> {
    let cfg = &shared.cfg;
    let consume_ch = conn.create_channel().await.map_err(SessionError::Channel)?;
    let publish_ch = conn.create_channel().await.map_err(SessionError::Channel)?;
    publish_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(SessionError::Channel)?;
    topology::declare(&consume_ch, cfg).await?;
    let link = Arc::new(Link {
        consume: consume_ch.clone(),
        outbox: Outbox {
            channel: publish_ch,
            metrics: shared.metrics.clone(),
            results_exchange: cfg.results_exchange.clone(),
            dead_letter_exchange: cfg.dead_letter_exchange.clone(),
            queue: cfg.queue.clone(),
        },
    });
    // Classic queues take a channel-wide prefetch that can change while
    // consuming; quorum queues refuse it and keep a consumer's prefetch for
    // its life.
    let global = cfg.queue_type == QueueType::Classic;
    let mut capacity = shared.scheduler.capacity_watch();
    let mut sent_prefetch: Option<u16> = None;
    let mut consumer: Option<Consumer> = None;
    let mut consuming_reported = Some(on_consuming);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(url = %cfg.redacted_url(), queue = %cfg.queue, "AMQP connected");
    loop {
        if *stop.borrow() {
            break;
        }
        if !conn.status().connected() || !link.alive() {
            return Err(SessionError::Lost(None));
        }
        // Follow capacity: resume, pause or resize.
        let target = shared.prefetch_target();
        if target == 0 {
            if let Some(c) = consumer.take() {
                cancel(shared, &link, c, false).await?;
                shared.metrics.set_prefetch(0);
                sent_prefetch = Some(0);
            }
        } else if consumer.is_none() {
            consume_ch
                .basic_qos(target, BasicQosOptions { global })
                .await
                .map_err(|e| SessionError::Lost(Some(e)))?;
            let c = consume_ch
                .basic_consume(
                    cfg.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| SessionError::Lost(Some(e)))?;
            consumer = Some(c);
            sent_prefetch = Some(target);
            shared.metrics.set_prefetch(target);
            shared.metrics.set_connected(true);
            if let Some(f) = consuming_reported.take() {
                f();
            }
        } else if global && sent_prefetch != Some(target) {
            consume_ch
                .basic_qos(target, BasicQosOptions { global })
                .await
                .map_err(|e| SessionError::Lost(Some(e)))?;
            sent_prefetch = Some(target);
            shared.metrics.set_prefetch(target);
        }
        tokio::select! {
            d = next(&mut consumer) => match d {
                Some(Ok(d)) => {
                    tokio::spawn(handle(shared.clone(), link.clone(), d));
                }
                Some(Err(e)) => return Err(SessionError::Lost(Some(e))),
                None => {
                    // Cancelled by the broker (queue deleted, node down).
                    return Err(SessionError::Lost(None));
                }
            },
            _ = capacity.changed() => {}
            _ = shared.recalc.notified() => {}
            _ = tick.tick() => {}
            _ = stop.changed() => {}
        }
    }
    // Stop: no new deliveries; those already buffered go back to the queue
    // unrun; in-flight jobs finish and are answered on this link.
    if let Some(c) = consumer.take() {
        cancel(shared, &link, c, true).await?;
    }
    shared.metrics.set_prefetch(0);
    let deadline = *shared
        .stop_deadline
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let deadline = deadline.unwrap_or_else(tokio::time::Instant::now);
    let mut held = shared.held.subscribe();
    loop {
        if *held.borrow_and_update() == 0 || !link.alive() {
            break;
        }
        tokio::select! {
            r = held.changed() => if r.is_err() { break },
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(
                    in_flight = *held.borrow(),
                    "AMQP drain grace ended; unanswered jobs go back to the queue"
                );
                break;
            }
            _ = tick.tick() => {}
        }
    }
    // Close the channels before the connection, so that dropping the last
    // handle later does not try to close them on a closed connection.
    let _ = link
        .consume
        .close(200, "kiln serve is stopping".into())
        .await;
    let _ = link
        .outbox
        .channel
        .close(200, "kiln serve is stopping".into())
        .await;
    Ok(())
}

/// The next delivery of the consumer, or never when paused.
async fn next(consumer: &mut Option<Consumer>) -> Option<lapin::Result<Delivery>> {
    match consumer {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// Cancels `c` and settles what the broker had already sent it: run it
/// (pause) or requeue it (stop).
async fn cancel(
    shared: &Arc<Shared>,
    link: &Arc<Link>,
    mut c: Consumer,
    requeue: bool,
) -> Result<(), SessionError> {
    link.consume
        .basic_cancel(c.tag(), BasicCancelOptions::default())
        .await
        .map_err(|e| SessionError::Lost(Some(e)))?;
    let drained = tokio::time::timeout(CANCEL_DRAIN, async {
        while let Some(d) = c.next().await {
            match d {
                Ok(d) if requeue => {
                    shared.metrics.consumed(d.redelivered);
                    requeue_delivery(shared, &d).await;
                }
                Ok(d) => {
                    tokio::spawn(handle(shared.clone(), link.clone(), d));
                }
                Err(_) => break,
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("the cancelled consumer did not end in {CANCEL_DRAIN:?}");
    }
    Ok(())
}

async fn requeue_delivery(shared: &Shared, d: &Delivery) {
    shared.metrics.requeued();
    let _ = d
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await;
}

async fn ack(shared: &Shared, d: &Delivery) {
    match d.acker.ack(BasicAckOptions::default()).await {
        Ok(_) => shared.metrics.acked(),
        // The channel is gone: the broker redelivers the message, and the
        // store answers it without running the job again.
        Err(e) => tracing::debug!("ack failed ({e}); the message will be redelivered"),
    }
}

/// What running a job came to.
enum Ran {
    Result(JobResult),
    /// Not run (shutdown): hand the message back to the queue.
    Requeue,
    Poison(Poison),
}

/// One delivery, from parse to ack.
async fn handle(shared: Arc<Shared>, link: Arc<Link>, d: Delivery) {
    let _held = HeldGuard::new(&shared);
    shared.metrics.consumed(d.redelivered);
    let spec = match message::parse_job(&d, shared.cfg.max_message_bytes) {
        Ok(s) => s,
        Err(p) => return poison(&shared, &link, &d, p).await,
    };
    let Some(id) = spec.id.clone() else {
        return;
    };
    let span = tracing::info_span!("amqp_job", id = %id, redelivered = d.redelivered);
    handle_job(&shared, &link, &d, spec, id)
        .instrument(span)
        .await;
}

async fn handle_job(shared: &Arc<Shared>, link: &Link, d: &Delivery, spec: JobSpec, id: JobId) {
    let (shared, link, d) = (&**shared, link, d);
    match shared.store.claim(&id) {
        Claim::New(slot) => match run(shared, spec, &id).await {
            Ran::Result(r) => {
                shared.store.finish(&id, &slot, r);
                answer(shared, link, d, &slot, false).await;
            }
            Ran::Requeue => {
                shared.store.abandon(&id, slot);
                requeue_delivery(shared, d).await;
            }
            Ran::Poison(p) => {
                shared.store.abandon(&id, slot);
                poison(shared, link, d, p).await;
            }
        },
        Claim::Known(slot) => match slot.finished().await {
            Some(_) => answer(shared, link, d, &slot, true).await,
            None => requeue_delivery(shared, d).await,
        },
    }
}

/// Submits the job and waits for its result.
async fn run(shared: &Shared, spec: JobSpec, id: &JobId) -> Ran {
    let opts = SubmitOptions {
        remove_on_exit: true,
        source: JobSource::Amqp,
    };
    let mut capacity = shared.scheduler.capacity_watch();
    for _ in 0..BUSY_RETRIES {
        match shared.scheduler.submit(spec.clone(), opts.clone()) {
            Ok(handle) => {
                let admitted = || {
                    shared
                        .admitted
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                };
                if let Some(rec) = shared.scheduler.job(&handle.id) {
                    admitted().insert(handle.id.clone(), rec);
                }
                shared.recalc.notify_one();
                let r = handle.result().await;
                admitted().remove(id);
                shared.recalc.notify_one();
                // A job stopped by our own shutdown is not an answer: let
                // another node run it.
                if shared.scheduler.is_shutting_down()
                    && matches!(r.outcome, Outcome::Killed | Outcome::Internal)
                {
                    return Ran::Requeue;
                }
                return Ran::Result(r);
            }
            Err(AdmitError::Rejected(r)) => {
                // The scheduler still knows this id (its own retention can
                // outlast the store's): reuse that result.
                if let Some(rec) = shared.scheduler.job(id) {
                    return Ran::Result(rec.wait().await);
                }
                let reason = r.message.unwrap_or_else(|| "rejected".into());
                let field = reason.split(':').next().unwrap_or("job").to_owned();
                return Ran::Poison(Poison::new(&field, reason, id.clone()));
            }
            Err(AdmitError::ShuttingDown) => return Ran::Requeue,
            Err(AdmitError::Busy { .. }) => {
                // The prefetch follows capacity, so this is a race with HTTP
                // intake: wait for a slot (bounded: a drain makes submit
                // answer ShuttingDown).
                let _ = tokio::time::timeout(Duration::from_secs(1), capacity.changed()).await;
            }
        }
    }
    // Still no slot: let another node have it.
    Ran::Requeue
}

/// Publishes the slot's result for `d` (unless a confirmed one exists),
/// then acks `d`.
async fn answer(shared: &Shared, link: &Link, d: &Delivery, slot: &Slot, known: bool) {
    // A redelivered message whose result the broker already confirmed (the
    // connection died between confirm and ack) is settled without a second
    // result. A message sent again by the producer (not redelivered) gets
    // the stored result again: it asked again.
    let publishing = if d.redelivered {
        slot.begin_publish().await
    } else {
        Some(slot.publish_lock().await)
    };
    let Some(_publishing) = publishing else {
        shared.metrics.duplicate();
        ack(shared, d).await;
        return;
    };
    let SlotState::Finished { result, .. } = slot.state() else {
        return;
    };
    if !link.alive() {
        // The message went back to the queue with its channel; its
        // redelivery finds this result in the store.
        return;
    }
    if known {
        shared.metrics.republished();
    }
    let p = &d.properties;
    match link
        .outbox
        .result(&result, p.reply_to().as_ref(), p.correlation_id().as_ref())
        .await
    {
        Ok(()) => {
            slot.confirmed();
            ack(shared, d).await;
        }
        Err(PublishError::Nacked) => {
            tracing::warn!(id = %result.id, "the broker refused the result; requeueing the job message");
            requeue_delivery(shared, d).await;
        }
        Err(e) => tracing::info!(id = %result.id, "{e}; the job message will be redelivered"),
    }
}

/// Dead-letters `d` with the reason, replies `rejected` when asked to, and
/// acks `d` once both are confirmed.
async fn poison(shared: &Shared, link: &Link, d: &Delivery, p: Poison) {
    tracing::info!(id = %p.id, reason = %p.reason, "dead-lettering a job message");
    let rejected = JobResult::rejected(p.id.clone(), p.reason.clone());
    let props = &d.properties;
    let published = async {
        link.outbox.dead_letter(d, &p).await?;
        if props.reply_to().is_some() {
            link.outbox
                .result(
                    &rejected,
                    props.reply_to().as_ref(),
                    props.correlation_id().as_ref(),
                )
                .await?;
        }
        Ok::<(), PublishError>(())
    }
    .await;
    match published {
        Ok(()) => {
            shared.metrics.rejected(&p.field);
            ack(shared, d).await;
        }
        Err(e) => tracing::info!(id = %p.id, "{e}; the poison message will be redelivered"),
    }
}

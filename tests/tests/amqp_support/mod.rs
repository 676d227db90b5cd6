//! Shared harness of the AMQP tests: the real RabbitMQ broker (started by
//! `scripts/rabbitmq.sh` when it is not running), per-test queue names, a
//! producer that publishes jobs with publisher confirms and collects every
//! reply by job id, and the broker's own view of queues and channels
//! (`rabbitmqctl`). No mock broker anywhere.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_lite::StreamExt as _;
use kiln_tests::server::Server;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{json, Value};

/// The broker the tests use: `KILN_TEST_AMQP_URL`, else the local
/// RabbitMQ's default guest account (allowed on loopback only).
pub fn url() -> String {
    std::env::var("KILN_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `scripts/rabbitmq.sh <cmd>`, panicking with its output on failure.
pub fn rabbitmq(cmd: &str) {
    let out = Command::new("bash")
        .arg(repo().join("scripts/rabbitmq.sh"))
        .arg(cmd)
        .output()
        .expect("running scripts/rabbitmq.sh");
    assert!(
        out.status.success(),
        "scripts/rabbitmq.sh {cmd} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes sure the broker runs (once per test binary).
pub fn ensure_broker() {
    static UP: OnceLock<()> = OnceLock::new();
    UP.get_or_init(|| rabbitmq("start"));
}

/// One test's broker objects, unique per test and process.
#[derive(Debug, Clone)]
pub struct Names {
    pub queue: String,
    pub dlx: String,
    pub dlq: String,
    pub replies: String,
    /// `classic` (default) or `quorum`.
    pub queue_type: &'static str,
}

impl Names {
    pub fn new(test: &str) -> Self {
        let base = format!("kiln.test.{test}.{}", std::process::id());
        Self {
            queue: format!("{base}.jobs"),
            dlx: format!("{base}.dlx"),
            dlq: format!("{base}.dead"),
            replies: format!("{base}.replies"),
            queue_type: "classic",
        }
    }

    /// The same with a quorum jobs queue.
    pub fn quorum(test: &str) -> Self {
        Self {
            queue_type: "quorum",
            ..Self::new(test)
        }
    }

    /// `kiln serve` flags for this topology.
    pub fn serve_args(&self) -> Vec<String> {
        vec![
            "--amqp-url".into(),
            url(),
            "--amqp-queue".into(),
            self.queue.clone(),
            "--amqp-dead-letter-exchange".into(),
            self.dlx.clone(),
            "--amqp-dead-letter-queue".into(),
            self.dlq.clone(),
            "--amqp-reconnect-max-ms".into(),
            "2000".into(),
            "--amqp-queue-type".into(),
            self.queue_type.into(),
            "--amqp-max-priority".into(),
            if self.queue_type == "quorum" {
                "0"
            } else {
                "9"
            }
            .into(),
        ]
    }

    /// Declares the topology of `docs/amqp.md` as `kiln serve` does (same
    /// arguments, or the broker refuses): dead-letter exchange and queue,
    /// and the jobs queue.
    pub async fn declare_jobs_queue(&self, ch: &Channel, max_priority: i32) {
        ch.exchange_declare(
            self.dlx.as_str().into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declaring the dead-letter exchange");
        ch.queue_declare(
            self.dlq.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .expect("declaring the dead-letter queue");
        ch.queue_bind(
            self.dlq.as_str().into(),
            self.dlx.as_str().into(),
            "".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("binding the dead-letter queue");
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dlx.as_str().into()),
        );
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(self.queue_type.into()),
        );
        if max_priority > 0 && self.queue_type == "classic" {
            args.insert("x-max-priority".into(), AMQPValue::LongInt(max_priority));
        }
        ch.queue_declare(
            self.queue.as_str().into(),
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .expect("declaring the jobs queue");
    }

    /// Deletes every object of the test (best effort).
    pub async fn delete(&self) {
        let Ok(conn) = Connection::connect(&url(), ConnectionProperties::default()).await else {
            return;
        };
        if let Ok(ch) = conn.create_channel().await {
            for q in [&self.queue, &self.dlq, &self.replies] {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = ch
                .exchange_delete(self.dlx.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "done".into()).await;
    }
}

/// The producer's view of one reply message.
#[derive(Debug, Clone)]
pub struct Reply {
    pub result: Value,
    pub correlation_id: Option<String>,
    pub message_id: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    /// The broker redelivered this same reply message to the producer (its
    /// own connection dropped before its ack): not a second result.
    pub redelivered: bool,
}

impl Reply {
    pub fn id(&self) -> String {
        self.result["id"].as_str().unwrap_or_default().to_owned()
    }
    pub fn outcome(&self) -> &str {
        self.result["outcome"].as_str().unwrap_or_default()
    }
}

/// Every reply received, by job id, in arrival order.
#[derive(Debug, Default)]
pub struct Replies {
    pub by_id: HashMap<String, Vec<Reply>>,
    pub order: Vec<String>,
}

impl Replies {
    /// Distinct result publications per id: broker redeliveries of a reply
    /// already seen do not count.
    pub fn results_for(&self, id: &str) -> usize {
        self.by_id
            .get(id)
            .map_or(0, |v| v.iter().filter(|r| !r.redelivered).count().max(1))
    }

    /// (ids answered, ids answered more than once, extra results in total).
    pub fn tally<'a>(&self, ids: impl IntoIterator<Item = &'a String>) -> (usize, usize, usize) {
        let (mut answered, mut dup_ids, mut extra) = (0, 0, 0);
        for id in ids {
            let n = self.results_for(id);
            if n >= 1 {
                answered += 1;
            }
            if n > 1 {
                dup_ids += 1;
                extra += n - 1;
            }
        }
        (answered, dup_ids, extra)
    }
}

/// Publishes jobs (persistent, confirmed) and collects replies from a
/// durable reply queue, reconnecting on its own when the broker restarts.
pub struct Producer {
    pub names: Names,
    publish: Mutex<Option<(Connection, Channel)>>,
    pub replies: Arc<Mutex<Replies>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    collector: Option<tokio::task::JoinHandle<()>>,
}

/// Connects with retries for up to `within` (the broker may be restarting).
pub async fn connect(within: Duration) -> Connection {
    let deadline = Instant::now() + within;
    loop {
        match Connection::connect(&url(), ConnectionProperties::default()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("cannot connect to the broker at {}: {e}", url()),
        }
    }
}

impl Producer {
    pub async fn new(names: &Names) -> Self {
        ensure_broker();
        let replies = Arc::new(Mutex::new(Replies::default()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conn = connect(Duration::from_secs(30)).await;
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm_select");
        // Durable and not exclusive: replies published while the producer's
        // connection is down (broker restart) wait for it.
        ch.queue_declare(
            names.replies.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .expect("declaring the reply queue");
        // The jobs queue as `kiln serve` declares it (same arguments, or the
        // broker refuses), so that jobs published before the server is up
        // wait in it instead of being dropped as unroutable.
        names.declare_jobs_queue(&ch, 9).await;
        let collector = tokio::spawn(collect(names.clone(), replies.clone(), stop.clone()));
        Self {
            names: names.clone(),
            publish: Mutex::new(Some((conn, ch))),
            replies,
            stop,
            collector: Some(collector),
        }
    }

    async fn channel(&self) -> Channel {
        let current = self.publish.lock().unwrap().as_ref().map(|(c, ch)| {
            (
                c.status().connected() && ch.status().connected(),
                ch.clone(),
            )
        });
        match current {
            Some((true, ch)) => ch,
            _ => {
                let conn = connect(Duration::from_secs(60)).await;
                let ch = conn.create_channel().await.expect("channel");
                ch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .expect("confirm_select");
                *self.publish.lock().unwrap() = Some((conn, ch.clone()));
                ch
            }
        }
    }

    /// Publishes raw bytes to the jobs queue with `props` (reply_to and
    /// persistence added), and waits for the broker's confirm.
    pub async fn publish_raw(&self, body: &[u8], props: BasicProperties) {
        let props = props
            .with_reply_to(self.names.replies.as_str().into())
            .with_delivery_mode(2);
        for attempt in 0..20 {
            let ch = self.channel().await;
            let r = async {
                ch.basic_publish(
                    "".into(),
                    self.names.queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    props.clone(),
                )
                .await?
                .await
            }
            .await;
            match r {
                Ok(c) if c.is_ack() => {
                    assert!(c.take_message().is_none(), "the job was unroutable");
                    return;
                }
                other => {
                    assert!(attempt < 19, "publishing failed: {other:?}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Publishes a job with id `id` (in the body) and correlation id
    /// `corr-<id>`.
    pub async fn publish_job(&self, id: &str, mut job: Value) {
        job["id"] = Value::String(id.to_owned());
        self.publish_raw(
            job.to_string().as_bytes(),
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_correlation_id(format!("corr-{id}").into()),
        )
        .await;
    }

    /// Publishes `n` Bash jobs with ids `<prefix>-<i>` that run `<before>echo
    /// <i>`, and returns the ids in order.
    pub async fn publish_echo_jobs(&self, prefix: &str, n: usize, before: &str) -> Vec<String> {
        let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let code = format!("{before}echo {i}");
            self.publish_job(id, json!({"runtime": "bash", "code": code}))
                .await;
        }
        ids
    }

    /// Waits until every id in `ids` has at least one reply, or `within`.
    pub async fn wait_for(&self, ids: &[String], within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            {
                let r = self.replies.lock().unwrap();
                if ids.iter().all(|id| r.by_id.contains_key(id)) {
                    return true;
                }
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn answered(&self) -> usize {
        self.replies.lock().unwrap().by_id.len()
    }

    /// Stops collecting (after a grace for late duplicates to show up).
    pub async fn finish(mut self, linger: Duration) -> Replies {
        tokio::time::sleep(linger).await;
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(c) = self.collector.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), c).await;
        }
        if let Some((c, _)) = self.publish.lock().unwrap().take() {
            drop(c);
        }
        std::mem::take(&mut *self.replies.lock().unwrap())
    }
}

fn short(s: &Option<ShortString>) -> Option<String> {
    s.as_ref().map(|s| s.as_str().to_owned())
}

/// Consumes the reply queue until stopped, reconnecting (bounded per
/// attempt) when the connection drops.
async fn collect(
    names: Names,
    replies: Arc<Mutex<Replies>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let stopped = || stop.load(std::sync::atomic::Ordering::SeqCst);
    // Bounded: at most 10 minutes of reconnecting.
    let deadline = Instant::now() + Duration::from_secs(600);
    while !stopped() && Instant::now() < deadline {
        let Ok(conn) = Connection::connect(&url(), ConnectionProperties::default()).await else {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        };
        let Ok(ch) = conn.create_channel().await else {
            continue;
        };
        let Ok(mut consumer) = ch
            .basic_consume(
                names.replies.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        else {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        };
        loop {
            let next = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await;
            if stopped() {
                let _ = conn.close(200, "done".into()).await;
                return;
            }
            let d = match next {
                Err(_) => {
                    if !conn.status().connected() {
                        break;
                    }
                    continue;
                }
                Ok(Some(Ok(d))) => d,
                Ok(_) => break,
            };
            let p = &d.properties;
            let reply = Reply {
                result: serde_json::from_slice(&d.data).unwrap_or(Value::Null),
                correlation_id: short(p.correlation_id()),
                message_id: short(p.message_id()),
                content_type: short(p.content_type()),
                delivery_mode: *p.delivery_mode(),
                redelivered: d.redelivered,
            };
            {
                let mut r = replies.lock().unwrap();
                let id = reply.id();
                r.order.push(id.clone());
                r.by_id.entry(id).or_default().push(reply);
            }
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }
    }
}

/// A dead-lettered message: its body and headers (as strings).
#[derive(Debug)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Takes every message from the dead-letter queue.
pub async fn drain_dead_letters(names: &Names) -> Vec<DeadLetter> {
    let conn = connect(Duration::from_secs(30)).await;
    let ch = conn.create_channel().await.expect("channel");
    let mut out = Vec::new();
    for _ in 0..10_000 {
        let Some(m) = ch
            .basic_get(names.dlq.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get on the dead-letter queue")
        else {
            break;
        };
        let mut headers = HashMap::new();
        if let Some(h) = m.delivery.properties.headers() {
            for (k, v) in h.inner() {
                headers.insert(k.as_str().to_owned(), value_text(v));
            }
        }
        out.push(DeadLetter {
            body: m.delivery.data.clone(),
            headers,
        });
    }
    let _ = conn.close(200, "done".into()).await;
    out
}

fn value_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        other => format!("{other:?}"),
    }
}

/// `rabbitmqctl -q <args>` rows, tab-separated, without the header line.
fn rabbitmqctl(args: &[&str]) -> Vec<Vec<String>> {
    let out = Command::new("timeout")
        .arg("30")
        .arg("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("running rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split('\t').map(|s| s.trim().to_owned()).collect())
        .collect()
}

/// The broker's count of (ready, unacknowledged) messages in `queue`.
pub fn queue_counts(queue: &str) -> (u64, u64) {
    for row in rabbitmqctl(&[
        "list_queues",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    ]) {
        if row.first().map(String::as_str) == Some(queue) {
            let n = |i: usize| row.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
            return (n(1), n(2));
        }
    }
    (0, 0)
}

/// The channels consuming `queue` as the broker sees them: (channel-wide
/// prefetch count, unacknowledged messages) each.
pub fn consuming_channels(queue: &str) -> Vec<(u64, u64)> {
    let pids: Vec<String> = rabbitmqctl(&["list_consumers", "queue_name", "channel_pid"])
        .into_iter()
        .filter(|r| r.first().map(String::as_str) == Some(queue))
        .filter_map(|r| r.get(1).cloned())
        .collect();
    rabbitmqctl(&[
        "list_channels",
        "pid",
        "global_prefetch_count",
        "messages_unacknowledged",
    ])
    .into_iter()
    .filter(|row| row.first().is_some_and(|p| pids.contains(p)))
    .filter_map(|row| Some((row.get(1)?.parse().ok()?, row.get(2)?.parse().ok()?)))
    .collect()
}

/// Consumers of `queue` as the broker sees them.
pub fn consumer_count(queue: &str) -> usize {
    rabbitmqctl(&["list_consumers", "queue_name"])
        .into_iter()
        .filter(|r| r.first().map(String::as_str) == Some(queue))
        .count()
}

/// Scrapes one counter/gauge value from `/metrics` text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `kiln serve` consuming `names`' queues, with `extra` flags.
pub fn serve(test: &str, names: &Names, extra: &[impl AsRef<str>]) -> Server {
    let mut args: Vec<String> = names.serve_args();
    args.extend(extra.iter().map(|s| s.as_ref().to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(test, &args)
}

/// `kiln serve` flags for a node pooling `runtime` with `min_idle` spares,
/// `max_running` job slots and `queue_depth` queued jobs (its capacity is
/// the last two together).
pub fn capacity(runtime: &str, min_idle: u32, max_running: u32, queue_depth: u32) -> Vec<String> {
    [
        "--pool-runtimes",
        runtime,
        "--min-idle",
        &min_idle.to_string(),
        "--max-running",
        &max_running.to_string(),
        "--queue-depth",
        &queue_depth.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Publishes a Python and a Bash job for a microVM guest (`PREFIX-py`,
/// `PREFIX-sh`) and checks that each got exactly one reply, from the
/// guest's own 6.1 kernel, with the right outcome and output.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub async fn guest_jobs_answered_once(producer: Producer, prefix: &str, within: Duration) {
    let jobs = [
        (
            format!("{prefix}-py"),
            serde_json::json!({"runtime": "python", "code": "import platform; print(platform.release().startswith('6.1.'))"}),
            "ok",
            "True\n",
        ),
        (
            format!("{prefix}-sh"),
            serde_json::json!({"runtime": "bash", "code": "echo guest; exit 3"}),
            "error",
            "guest\n",
        ),
    ];
    for (id, job, _, _) in &jobs {
        producer.publish_job(id, job.clone()).await;
    }
    let ids: Vec<String> = jobs.iter().map(|j| j.0.clone()).collect();
    assert!(
        producer.wait_for(&ids, within).await,
        "not all jobs answered"
    );
    let replies = producer.finish(Duration::from_millis(500)).await;
    for (id, _, outcome, stdout) in &jobs {
        let r = &replies.by_id[id];
        assert_eq!(r.len(), 1, "{id}: exactly one reply");
        assert_eq!(r[0].outcome(), *outcome, "{id}: {:?}", r[0].result);
        assert_eq!(
            r[0].result["stdout"], *stdout,
            "{id}: the guest runs its own 6.x kernel"
        );
    }
}

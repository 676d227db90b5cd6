//! Benchmark of the AMQP intake: end-to-end latency and throughput of
//! trivial jobs (bash `echo`) through `kiln serve` over AMQP, over HTTP on
//! the same server, and through a bare AMQP echo (consume, publish the reply
//! with a publisher confirm, ack; no sandbox) written with the same client
//! library, so that the table shows what the sandbox adds and what the
//! queue adds. Prints a Markdown table.
//!
//! ```sh
//! cargo build --release --bins && bash scripts/rabbitmq.sh
//! cargo run --release -p kiln-tests --example amqp_bench -- [latency_n] [throughput_n] [concurrency]
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::json;
use tokio::sync::oneshot;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const JOBS: &str = "kiln.bench.jobs";
const ECHO: &str = "kiln.bench.echo";

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<(Instant, Vec<u8>)>>>>;

/// A producer: publishes to a queue and matches replies by correlation id.
struct Client {
    ch: Channel,
    reply_to: String,
    waiters: Waiters,
}

impl Client {
    async fn new(conn: &Connection) -> Self {
        let ch = conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let reply_to = q.name().as_str().to_owned();
        let waiters: Waiters = Arc::default();
        let mut consumer = ch
            .basic_consume(
                reply_to.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let w = waiters.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let now = Instant::now();
                if let Some(c) = d.properties.correlation_id() {
                    if let Some(tx) = w.lock().unwrap().remove(c.as_str()) {
                        let _ = tx.send((now, d.data));
                    }
                }
            }
        });
        Self {
            ch,
            reply_to,
            waiters,
        }
    }

    /// Publishes `body` to `queue` and waits for the reply; the round trip.
    async fn call(&self, queue: &str, id: &str, body: &[u8]) -> (Duration, Vec<u8>) {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap().insert(id.to_owned(), tx);
        let t = Instant::now();
        self.ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_correlation_id(id.into())
                    .with_reply_to(self.reply_to.as_str().into()),
            )
            .await
            .unwrap();
        let (done, reply) = tokio::time::timeout(Duration::from_secs(120), rx)
            .await
            .expect("a reply within 120 s")
            .unwrap();
        (done - t, reply)
    }
}

/// The bare echo: consume, publish the body back with a confirm, then ack
/// (the same settle order as Kiln, without a sandbox).
async fn echo_server(conn: Connection) {
    let ch = conn.create_channel().await.unwrap();
    let out = conn.create_channel().await.unwrap();
    out.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        ECHO.into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_qos(64, Default::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            ECHO.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    while let Some(Ok(d)) = consumer.next().await {
        let out = out.clone();
        tokio::spawn(async move {
            let p = &d.properties;
            let reply = BasicProperties::default()
                .with_delivery_mode(2)
                .with_correlation_id(p.correlation_id().clone().unwrap_or_default());
            let to = p.reply_to().clone().unwrap_or_default();
            out.basic_publish(
                "".into(),
                to,
                BasicPublishOptions::default(),
                &d.data,
                reply,
            )
            .await
            .unwrap()
            .await
            .unwrap();
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
        });
    }
}

struct Stats {
    name: String,
    n: usize,
    concurrency: usize,
    wall: Duration,
    lat: Vec<Duration>,
}

impl Stats {
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.lat.clone();
        v.sort();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i].as_secs_f64() * 1000.0
    }
    fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.0} |",
            self.name,
            self.concurrency,
            self.n,
            self.pct(0.5),
            self.pct(0.9),
            self.pct(0.99),
            self.n as f64 / self.wall.as_secs_f64()
        )
    }
}

/// `tag` makes the job ids of each run distinct (a repeated id would be
/// answered from the result store without running).
async fn run_amqp(
    client: Arc<Client>,
    name: &str,
    tag: &str,
    queue: &str,
    n: usize,
    conc: usize,
    job: bool,
) -> Stats {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let lat = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (client, next, lat, queue, tag) = (
            client.clone(),
            next.clone(),
            lat.clone(),
            queue.to_owned(),
            tag.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= n {
                    break;
                }
                let id = format!("{tag}-{}-{i}", std::process::id());
                let body = if job {
                    json!({"id": id, "runtime": "bash", "code": "echo hi"}).to_string()
                } else {
                    json!({"id": id, "echo": "hi"}).to_string()
                };
                let (d, reply) = client.call(&queue, &id, body.as_bytes()).await;
                if job {
                    let r: serde_json::Value = serde_json::from_slice(&reply).unwrap();
                    assert_eq!(r["outcome"], "ok", "{r}");
                    assert_eq!(r["stdout"], "hi\n", "{r}");
                }
                lat.lock().unwrap().push(d);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let wall = t.elapsed();
    let lat = std::mem::take(&mut *lat.lock().unwrap());
    Stats {
        name: name.into(),
        n,
        concurrency: conc,
        wall,
        lat,
    }
}

fn run_http(addr: SocketAddr, n: usize, conc: usize) -> Stats {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let lat = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..conc {
            let (next, lat) = (next.clone(), lat.clone());
            s.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= n {
                    break;
                }
                let body = json!({"runtime": "bash", "code": "echo hi"});
                let t = Instant::now();
                let (status, b) = kiln_tests::server::post_json(addr, "/v1/jobs", &body);
                assert_eq!(status, 200, "{b}");
                lat.lock().unwrap().push(t.elapsed());
            });
        }
    });
    let wall = t.elapsed();
    let lat = std::mem::take(&mut *lat.lock().unwrap());
    Stats {
        name: "HTTP (kiln serve)".into(),
        n,
        concurrency: conc,
        wall,
        lat,
    }
}

fn kiln_bin() -> PathBuf {
    std::env::var_os("KILN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            // target/<profile>/examples/amqp_bench → target/<profile>/kiln
            exe.parent().unwrap().parent().unwrap().join("kiln")
        })
}

/// `kiln serve` with AMQP on; killed (by pid) on drop.
struct Serve(Child, SocketAddr);

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; our child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(slots: usize) -> Serve {
    let state = std::env::temp_dir().join(format!("kiln-amqp-bench-{}", std::process::id()));
    let mut child = Command::new(kiln_bin())
        .args(["serve", "--bind", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .args([
            "--cgroup-parent",
            "kiln-amqp-bench",
            "--pool-runtimes",
            "bash",
        ])
        .args([
            "--min-idle",
            &slots.to_string(),
            "--max-running",
            &slots.to_string(),
            "--queue-depth",
            "64",
        ])
        .args(["--amqp-url", URL, "--amqp-queue", JOBS])
        .args([
            "--amqp-dead-letter-exchange",
            "kiln.bench.dlx",
            "--amqp-dead-letter-queue",
            "kiln.bench.dead",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning kiln serve (build it with cargo build --release --bins)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .expect("listening line")
        .parse()
        .unwrap();
    Serve(child, addr)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let lat_n = args.first().copied().unwrap_or(300);
    let thr_n = args.get(1).copied().unwrap_or(1000);
    let conc = args.get(2).copied().unwrap_or(8);
    let server = serve(conc);
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    tokio::spawn(echo_server(
        Connection::connect(URL, ConnectionProperties::default())
            .await
            .unwrap(),
    ));
    let client = Arc::new(Client::new(&conn).await);
    // Warm-up: the pool fills, the consumer connects.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = run_amqp(client.clone(), "warm", "warm-job", JOBS, 50, conc, true).await;
    let _ = run_amqp(client.clone(), "warm", "warm-echo", ECHO, 50, conc, false).await;
    let addr = server.1;
    let _ = tokio::task::spawn_blocking(move || run_http(addr, 50, 4)).await;
    let mut rows = Vec::new();
    for (n, c) in [(lat_n, 1), (thr_n, conc)] {
        let tag = format!("c{c}");
        rows.push(
            run_amqp(
                client.clone(),
                "bare AMQP echo (no sandbox)",
                &tag,
                ECHO,
                n,
                c,
                false,
            )
            .await,
        );
        rows.push(run_amqp(client.clone(), "AMQP (kiln serve)", &tag, JOBS, n, c, true).await);
        rows.push(
            tokio::task::spawn_blocking(move || run_http(addr, n, c))
                .await
                .unwrap(),
        );
    }
    println!("| path | concurrency | jobs | p50 ms | p90 ms | p99 ms | jobs/s |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!("{}", r.row());
    }
    let metrics = tokio::task::spawn_blocking(move || {
        let mut r = kiln_tests::server::raw_request(addr, "GET", "/metrics", &[], None);
        let mut b = String::new();
        r.body.read_to_string(&mut b).unwrap();
        b
    })
    .await
    .unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let (sum, count) = (
        value("kiln_amqp_publish_confirm_seconds_sum"),
        value("kiln_amqp_publish_confirm_seconds_count"),
    );
    println!();
    println!(
        "kiln serve's publisher confirms: {count} results, mean publish-to-confirm {:.3} ms",
        sum / count.max(1.0) * 1000.0
    );
    drop(server);
    let ch = conn.create_channel().await.unwrap();
    for q in [JOBS, ECHO, "kiln.bench.dead"] {
        let _ = ch
            .queue_delete(q.into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
}

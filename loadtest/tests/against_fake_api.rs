//! The load generator against a tiny in-test HTTP server that answers like
//! `POST /v1/jobs`: counts, percentile ordering, 429 handling, warm/cold
//! counts and the report's JSON shape. These test the load generator, not
//! Kiln; no timing is asserted.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser as _;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kiln_loadtest::{run, Cli};
use tokio::net::TcpListener;

/// How the fake API behaves.
#[derive(Clone, Copy, Default)]
struct Behaviour {
    /// Every n-th request (1-based) gets a 429 (0: never).
    throttle_every: u64,
    /// Every n-th request gets a 500 (0: never).
    fail_every: u64,
    /// Every n-th result reports acquire "cold" (0: never), the rest "warm".
    cold_every: u64,
    /// Time each job "runs".
    delay: Duration,
}

struct Fake {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    bodies_ok: Arc<AtomicU64>,
}

async fn fake_api(b: Behaviour) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let bodies_ok = Arc::new(AtomicU64::new(0));
    let (req_count, ok_count) = (requests.clone(), bodies_ok.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (req_count, ok_count) = (req_count.clone(), ok_count.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (req_count, ok_count) = (req_count.clone(), ok_count.clone());
                    async move {
                        let n = req_count.fetch_add(1, Ordering::SeqCst) + 1;
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let spec: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        if path == "/v1/jobs" && spec["runtime"] == "python" {
                            ok_count.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok::<_, Infallible>(answer(b, n).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Fake {
        addr,
        requests,
        bodies_ok,
    }
}

async fn answer(b: Behaviour, n: u64) -> Response<Full<Bytes>> {
    let every = |k: u64| k != 0 && n.is_multiple_of(k);
    if every(b.throttle_every) {
        return Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header("retry-after", "0")
            .body(Full::new(Bytes::from_static(b"{\"error\":\"busy\"}")))
            .unwrap();
    }
    if every(b.fail_every) {
        return Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    tokio::time::sleep(b.delay).await;
    let acquire = if every(b.cold_every) { "cold" } else { "warm" };
    let result = serde_json::json!({
        "id": format!("job{n}"),
        "outcome": "ok",
        "exit_code": 0,
        "signal": null,
        "stdout": "1\n",
        "stderr": "",
        "stdout_truncated": false,
        "stderr_truncated": false,
        "timings": {"queued_ms": 0.1, "acquire_ms": 0.2, "acquire": acquire,
                    "run_ms": 1.5, "total_ms": 2.0},
        "usage": {"cpu_user_ms": 0, "cpu_system_ms": 0, "max_rss_kb": 0}
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(result.to_string())))
        .unwrap()
}

fn cli(addr: SocketAddr, extra: &[&str]) -> Cli {
    let url = format!("http://{addr}");
    let mut args = vec!["kiln-loadtest", "--url", &url, "-q"];
    args.extend_from_slice(extra);
    Cli::parse_from(args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_counts_every_job_and_orders_percentiles() {
    let fake = fake_api(Behaviour {
        cold_every: 4,
        delay: Duration::from_millis(1),
        ..Behaviour::default()
    })
    .await;
    let r = run(&cli(
        fake.addr,
        &["-n", "200", "-c", "4", "--expect-stdout", "1\\n"],
    ))
    .await
    .unwrap();
    assert_eq!(fake.requests.load(Ordering::SeqCst), 200);
    assert_eq!(fake.bodies_ok.load(Ordering::SeqCst), 200);
    let c = &r.counts;
    assert_eq!((c.jobs, c.ran, c.ok), (200, 200, 200));
    assert_eq!(c.stdout_mismatch, 0);
    assert_eq!((c.acquire_cold, c.acquire_warm), (50, 150));
    assert_eq!(r.outcomes["ok"], 200);
    let p = r.latency_ms.as_ref().unwrap();
    assert_eq!(p.count, 200);
    assert!(p.min <= p.p50 && p.p50 <= p.p90 && p.p90 <= p.p99);
    assert!(p.p99 <= p.p999 && p.p999 <= p.max);
    assert_eq!(r.latency_cold_ms.as_ref().unwrap().count, 50);
    let run_ms = r.server_ms.run.as_ref().unwrap();
    assert!((run_ms.p50 - 1.5).abs() < 0.01, "{run_ms:?}");
    assert!(r.throughput_per_s > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_counted_or_retried() {
    let fake = fake_api(Behaviour {
        throttle_every: 3,
        ..Behaviour::default()
    })
    .await;
    let r = run(&cli(fake.addr, &["-n", "90", "-c", "1"]))
        .await
        .unwrap();
    assert_eq!(r.counts.jobs, 90);
    assert_eq!(r.counts.throttled_jobs, 30);
    assert_eq!(r.counts.http_429, 30);
    assert_eq!(r.counts.ran, 60);
    assert_eq!(r.latency_ms.as_ref().unwrap().count, 60);

    let fake = fake_api(Behaviour {
        throttle_every: 3,
        ..Behaviour::default()
    })
    .await;
    let r = run(&cli(
        fake.addr,
        &["-n", "60", "-c", "2", "--on-429", "retry"],
    ))
    .await
    .unwrap();
    assert_eq!(r.counts.ran, 60);
    assert_eq!(r.counts.throttled_jobs, 0);
    assert!(r.counts.http_429 >= 29, "{:?}", r.counts);
    assert_eq!(fake.requests.load(Ordering::SeqCst), 60 + r.counts.http_429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_statuses_and_refused_connections_are_failures() {
    let fake = fake_api(Behaviour {
        fail_every: 5,
        ..Behaviour::default()
    })
    .await;
    let r = run(&cli(fake.addr, &["-n", "50", "-c", "2"]))
        .await
        .unwrap();
    assert_eq!(r.counts.http_other, 10);
    assert_eq!(r.other_statuses["500"], 10);
    assert_eq!(r.counts.ran, 40);

    // A port nothing listens on (bound, then released).
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let r = run(&cli(addr, &["-n", "5"])).await.unwrap();
    assert_eq!(r.counts.failed, 5);
    assert!(r.latency_ms.is_none());
    assert!(
        r.errors.keys().any(|e| e.contains("connecting")),
        "{:?}",
        r.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_sends_the_requested_jobs() {
    let fake = fake_api(Behaviour {
        delay: Duration::from_millis(2),
        ..Behaviour::default()
    })
    .await;
    let r = run(&cli(
        fake.addr,
        &["--rate", "400", "-n", "100", "--arrivals", "constant"],
    ))
    .await
    .unwrap();
    assert_eq!(r.counts.ran, 100);
    assert_eq!(fake.requests.load(Ordering::SeqCst), 100);
    assert_eq!(r.run.loop_kind, "open");
    assert!(r.run.concurrency.is_none());

    // The duration bounds the run before the count does.
    let r = run(&cli(
        fake.addr,
        &["--rate", "50", "-n", "100000", "-d", "200ms"],
    ))
    .await
    .unwrap();
    assert!(r.counts.jobs < 100, "{:?}", r.counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_report_has_its_documented_shape() {
    let fake = fake_api(Behaviour::default()).await;
    let out = std::env::temp_dir().join(format!("kiln-loadtest-{}.json", std::process::id()));
    let r = run(&cli(
        fake.addr,
        &["-n", "10", "--server-pid", &std::process::id().to_string()],
    ))
    .await
    .unwrap();
    std::fs::write(&out, serde_json::to_string(&r).unwrap()).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let _ = std::fs::remove_file(&out);
    for key in [
        "run",
        "elapsed_s",
        "throughput_per_s",
        "counts",
        "outcomes",
        "latency_ms",
        "server_ms",
        "server",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    for p in ["p50", "p90", "p99", "p999", "max", "count"] {
        assert!(v["latency_ms"][p].is_number(), "latency_ms.{p}: {v}");
    }
    for t in ["queued", "acquire", "run", "total"] {
        assert!(v["server_ms"][t]["p99"].is_number(), "server_ms.{t}: {v}");
    }
    assert_eq!(v["counts"]["http_429"], 0);
    assert_eq!(v["run"]["target"], "http");
    assert!(v["server"]["rss_kib"].as_u64().unwrap() > 0);
    assert_eq!(v["server"]["pid"], std::process::id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_mode_runs_a_command_per_job() {
    let args = [
        "kiln-loadtest",
        "-q",
        "-n",
        "20",
        "-c",
        "2",
        "--expect-stdout",
        "1\\n",
        "--",
        "/bin/sh",
        "-c",
        "echo 1",
    ];
    let r = run(&Cli::parse_from(args)).await.unwrap();
    assert_eq!(r.run.target, "spawn");
    assert_eq!((r.counts.ran, r.counts.ok), (20, 20));
}

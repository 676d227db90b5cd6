//! The load generator against a tiny in-test HTTP server that answers like
//! `POST /v1/jobs`, for what a real `kiln serve` cannot be made to show on
//! demand: 429s and 500s at exact counts, and a server that stalls (so
//! that the open loop's latency from the intended send time, against
//! coordinated omission, is seen). Everything a real server can show is
//! tested against one in `against_kiln_serve.rs`. These test the load
//! generator, not Kiln; no timing is asserted beyond lower bounds that a
//! slower machine only makes larger.

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
    /// How long the first request stalls before it is answered.
    first_stall: Duration,
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
    if n == 1 {
        tokio::time::sleep(b.first_stall).await;
    }
    let result = serde_json::json!({
        "id": format!("job{n}"),
        "outcome": "ok",
        "exit_code": 0,
        "signal": null,
        "stdout": "1\n",
        "stderr": "",
        "stdout_truncated": false,
        "stderr_truncated": false,
        "timings": {"queued_ms": 0.1, "acquire_ms": 0.2, "acquire": "warm",
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
    // Every request carried the job.
    assert_eq!(
        fake.bodies_ok.load(Ordering::SeqCst),
        fake.requests.load(Ordering::SeqCst)
    );

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
async fn a_stalling_server_cannot_hide_its_queue() {
    // Open loop at 100 jobs/s with one job in flight at most; the first job
    // stalls 300 ms, so the jobs meant to be sent meanwhile wait for the
    // slot. Their latency counts from their intended send time: the k-th
    // (sent at 10k ms) takes at least 300 − 10k ms. A closed loop (or an
    // open loop timing from the actual send) would report one slow job.
    let stall = Duration::from_millis(300);
    let fake = fake_api(Behaviour {
        first_stall: stall,
        ..Behaviour::default()
    })
    .await;
    let r = run(&cli(
        fake.addr,
        &[
            "--rate",
            "100",
            "--arrivals",
            "constant",
            "-n",
            "50",
            "--max-in-flight",
            "1",
        ],
    ))
    .await
    .unwrap();
    assert_eq!(r.counts.ran, 50);
    assert!(r.run.in_flight_cap_hit);
    // Jobs 0..=15 were meant to go at 0..150 ms, so each waited at least
    // until 300 ms: 16 of 50 jobs (32 %) took 150 ms or more.
    let below_150 = r
        .latency_cdf_ms
        .all
        .iter()
        .take_while(|p| p[0] < 150.0)
        .last()
        .map_or(0.0, |p| p[1]);
    assert!(below_150 <= 0.68 + 1e-9, "{:?}", r.latency_cdf_ms.all);
    let slow_sent: u64 = r
        .timeline
        .buckets
        .iter()
        .filter(|b| b.p50_ms.is_some_and(|p| p >= 150.0))
        .map(|b| b.ran)
        .sum();
    assert!(slow_sent > 0, "{:?}", r.timeline);
}

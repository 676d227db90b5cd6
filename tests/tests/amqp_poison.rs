//! Messages that can never succeed (not JSON, wrong schema, unknown runtime,
//! absurd limits, a bad message id, expired) land in the dead-letter queue
//! with `x-kiln-error` saying why; a producer waiting on `reply_to` gets a
//! `rejected` result; and the consumer keeps going.

mod amqp_support;

use std::time::{Duration, Instant};

use amqp_support::{drain_dead_letters, queue_counts, serve, Names, Producer};
use kiln_tests::server::Server;
use lapin::BasicProperties;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_the_reason_and_good_jobs_still_run() {
    let names = Names::new("poison");
    let producer = Producer::new(&names).await;
    let server = serve(
        "amqp-poison",
        &names,
        &[
            "--pool-runtimes",
            "bash",
            "--min-idle",
            "1",
            "--amqp-max-message-bytes",
            "4096",
        ],
    );
    let json_props = || BasicProperties::default().with_content_type("application/json".into());
    // (message id / correlation id, body, the field x-kiln-error must name)
    let cases: Vec<(&str, String, &str)> = vec![
        ("p-notjson", "this is not json".into(), "body"),
        (
            "p-schema",
            json!({"runtime": "bash", "code": "echo", "colour": "red"}).to_string(),
            "job",
        ),
        ("p-nocode", json!({"runtime": "bash"}).to_string(), "code"),
        (
            "p-runtime",
            json!({"runtime": "cobol", "code": "DISPLAY 1"}).to_string(),
            "runtime",
        ),
        (
            "p-limits",
            json!({"runtime": "bash", "code": "echo", "limits": {"memory_mb": 1_000_000_000}})
                .to_string(),
            "limits.memory_mb",
        ),
        (
            "p-timeout",
            json!({"runtime": "bash", "code": "echo", "limits": {"timeout_ms": -5}}).to_string(),
            "limits.timeout_ms",
        ),
        (
            "p-big",
            json!({"runtime": "bash", "code": format!("echo {}", "x".repeat(8000))}).to_string(),
            "body",
        ),
    ];
    for (mid, body, _) in &cases {
        producer
            .publish_raw(
                body.as_bytes(),
                json_props()
                    .with_message_id((*mid).into())
                    .with_correlation_id(format!("corr-{mid}").into()),
            )
            .await;
    }
    // A message id that is not a job id, on a body without one.
    producer
        .publish_raw(
            json!({"runtime": "bash", "code": "echo"})
                .to_string()
                .as_bytes(),
            json_props()
                .with_message_id("not a valid id!".into())
                .with_correlation_id("corr-badmid".into()),
        )
        .await;
    // Then good jobs: the consumer must still be going.
    let good: Vec<String> = (0..5).map(|i| format!("good-{i}")).collect();
    for (i, id) in good.iter().enumerate() {
        producer
            .publish_job(id, json!({"runtime": "bash", "code": format!("echo {i}")}))
            .await;
    }
    let mut expect: Vec<String> = cases.iter().map(|c| c.0.to_owned()).collect();
    expect.extend(good.iter().cloned());
    assert!(
        producer.wait_for(&expect, Duration::from_secs(60)).await,
        "every message answered"
    );
    // The rejected reply for the bad message id carries a fresh id; find it
    // by correlation id.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = producer
            .replies
            .lock()
            .unwrap()
            .by_id
            .values()
            .flatten()
            .any(|r| r.correlation_id.as_deref() == Some("corr-badmid"));
        if found || Instant::now() > deadline {
            assert!(found, "a rejected reply for the bad message id");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = server.request("GET", "/metrics", None).text();
    let replies = producer.finish(Duration::from_millis(300)).await;
    for (mid, _, field) in &cases {
        let r = &replies.by_id[*mid];
        assert_eq!(r.len(), 1, "{mid}: one reply");
        assert_eq!(r[0].outcome(), "rejected", "{mid}: {:?}", r[0].result);
        assert_eq!(
            r[0].correlation_id.as_deref(),
            Some(format!("corr-{mid}").as_str())
        );
        let msg = r[0].result["message"].as_str().unwrap_or_default();
        assert!(
            msg.starts_with(field),
            "{mid}: the message names {field}: {msg}"
        );
    }
    for (i, id) in good.iter().enumerate() {
        let r = &replies.by_id[id][0];
        assert_eq!(r.outcome(), "ok", "{id}");
        assert_eq!(r.result["stdout"], format!("{i}\n"));
    }
    let dead = drain_dead_letters(&names).await;
    assert_eq!(
        dead.len(),
        cases.len() + 1,
        "every poison message dead-lettered once: {dead:#?}"
    );
    for (mid, body, field) in &cases {
        let d = dead
            .iter()
            .find(|d| d.body == body.as_bytes())
            .unwrap_or_else(|| panic!("{mid} is in the dead-letter queue"));
        assert_eq!(
            d.headers.get("x-kiln-error-field").map(String::as_str),
            Some(*field),
            "{mid}: {:?}",
            d.headers
        );
        let why = &d.headers["x-kiln-error"];
        assert!(why.starts_with(field), "{mid}: x-kiln-error {why:?}");
    }
    assert!(dead
        .iter()
        .any(|d| d.headers.get("x-kiln-error-field").map(String::as_str) == Some("message_id")));
    assert_eq!(
        queue_counts(&names.queue),
        (0, 0),
        "nothing left unacked or ready"
    );
    assert_eq!(
        amqp_support::metric(&metrics, "kiln_amqp_messages_rejected_total"),
        (cases.len() + 1) as f64,
        "{metrics}"
    );
    drop(server);
    names.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_expires_in_the_queue_is_dead_lettered_by_the_broker() {
    let names = Names::new("expire");
    let producer = Producer::new(&names).await;
    // No consumer yet: the message expires in the queue.
    producer
        .publish_raw(
            json!({"id": "exp-1", "runtime": "bash", "code": "echo"})
                .to_string()
                .as_bytes(),
            BasicProperties::default().with_expiration("50".into()),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut args = names.serve_args();
    args.extend(["--pool-runtimes", "bash", "--min-idle", "0"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start("amqp-expire", &args);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut dead = Vec::new();
    while dead.is_empty() && Instant::now() < deadline {
        dead = drain_dead_letters(&names).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), 1, "the expired message is dead-lettered");
    assert!(
        dead[0]
            .headers
            .get("x-first-death-reason")
            .map(String::as_str)
            == Some("expired"),
        "{:?}",
        dead[0].headers
    );
    let replies = producer.finish(Duration::from_millis(300)).await;
    assert!(replies.by_id.is_empty(), "an expired job is not run");
    drop(server);
    names.delete().await;
}

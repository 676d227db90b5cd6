//! AMQP intake against the real RabbitMQ: the RPC round trip (reply_to,
//! correlation_id, persistent JSON results with message_id = job id), a
//! thousand jobs from one producer each answered exactly once, and a job id
//! sent again answered from the result store without running again.

mod amqp_support;

use std::time::{Duration, Instant};

use amqp_support::{capacity, queue_counts, serve, Names, Producer};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_answered_on_reply_to_with_its_correlation_id_then_acked() {
    let names = Names::new("rt");
    let producer = Producer::new(&names).await;
    let server = serve(
        "amqp-rt",
        &names,
        &["--pool-runtimes", "python", "--min-idle", "1"],
    );
    let id = "rt-1".to_owned();
    producer
        .publish_job(&id, json!({"runtime": "python", "code": "print(6*7)"}))
        .await;
    assert!(
        producer
            .wait_for(std::slice::from_ref(&id), Duration::from_secs(60))
            .await,
        "no reply within 60 s"
    );
    let replies = producer.finish(Duration::from_millis(500)).await;
    let r = &replies.by_id[&id];
    assert_eq!(r.len(), 1, "exactly one reply: {r:?}");
    let r = &r[0];
    assert_eq!(r.outcome(), "ok", "{:?}", r.result);
    assert_eq!(r.result["stdout"], "42\n");
    assert_eq!(r.correlation_id.as_deref(), Some("corr-rt-1"));
    assert_eq!(r.message_id.as_deref(), Some("rt-1"), "message_id = job id");
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    assert_eq!(r.delivery_mode, Some(2), "persistent");
    // Acked only after the result was confirmed: nothing left on the broker.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut counts = queue_counts(&names.queue);
    while counts != (0, 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        counts = queue_counts(&names.queue);
    }
    assert_eq!(counts, (0, 0), "(ready, unacked) after the reply");
    drop(server);
    names.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_jobs_from_one_producer_are_each_answered_exactly_once() {
    let names = Names::new("k");
    let producer = Producer::new(&names).await;
    let server = serve("amqp-1000", &names, &capacity("bash", 4, 4, 8));
    let t = Instant::now();
    let ids = producer.publish_echo_jobs("k", 1000, "").await;
    let published = t.elapsed();
    let all = producer.wait_for(&ids, Duration::from_secs(600)).await;
    let elapsed = t.elapsed();
    let replies = producer.finish(Duration::from_secs(2)).await;
    let (answered, dup_ids, extra) = replies.tally(&ids);
    eprintln!(
        "1000 jobs: published in {published:?}, all answered in {elapsed:?} ({:.0} jobs/s); answered {answered}, duplicated ids {dup_ids} ({extra} extra results)",
        1000.0 / elapsed.as_secs_f64()
    );
    assert!(all, "only {answered} of 1000 answered");
    assert_eq!(answered, 1000);
    assert_eq!(dup_ids, 0, "no job id answered twice");
    for (i, id) in ids.iter().enumerate() {
        let r = &replies.by_id[id][0];
        assert_eq!(r.outcome(), "ok", "{id}: {:?}", r.result);
        assert_eq!(r.result["stdout"], format!("{i}\n"), "{id}");
        assert_eq!(
            r.correlation_id.as_deref(),
            Some(format!("corr-{id}").as_str())
        );
    }
    drop(server);
    names.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_id_sent_again_gets_the_stored_result_without_running_again() {
    let names = Names::new("again");
    let producer = Producer::new(&names).await;
    let server = serve(
        "amqp-again",
        &names,
        &["--pool-runtimes", "bash", "--min-idle", "1"],
    );
    let id = "again-1".to_owned();
    let job = json!({"runtime": "bash", "code": "echo $RANDOM$RANDOM$RANDOM"});
    producer.publish_job(&id, job.clone()).await;
    assert!(
        producer
            .wait_for(std::slice::from_ref(&id), Duration::from_secs(60))
            .await
    );
    producer.publish_job(&id, job).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while producer.replies.lock().unwrap().by_id[&id].len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = server.request("GET", "/metrics", None).text();
    let replies = producer.finish(Duration::from_millis(300)).await;
    let r = &replies.by_id[&id];
    assert_eq!(r.len(), 2, "the second message is answered too: {r:?}");
    assert_eq!(
        r[0].result, r[1].result,
        "the same result (same random output, same timings): not run again"
    );
    assert_eq!(
        amqp_support::metric(&metrics, "kiln_amqp_results_republished_total"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        amqp_support::metric(&metrics, "kiln_jobs_total{source=\"amqp\""),
        1.0,
        "one run"
    );
    drop(server);
    names.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_jobs_queue_works_the_same() {
    let names = Names::quorum("quorum");
    let producer = Producer::new(&names).await;
    let server = serve(
        "amqp-quorum",
        &names,
        &["--pool-runtimes", "bash", "--min-idle", "2"],
    );
    let ids = producer.publish_echo_jobs("q", 20, "").await;
    assert!(producer.wait_for(&ids, Duration::from_secs(60)).await);
    let replies = producer.finish(Duration::from_millis(500)).await;
    let (answered, dup, _) = replies.tally(&ids);
    assert_eq!((answered, dup), (ids.len(), 0));
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(replies.by_id[id][0].result["stdout"], format!("{i}\n"));
    }
    drop(server);
    names.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_also_go_to_the_results_exchange_keyed_by_outcome() {
    use lapin::options::{
        BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    let names = Names::new("rx");
    let producer = Producer::new(&names).await;
    let exchange = format!("{}.results", names.queue);
    let conn = amqp_support::connect(Duration::from_secs(30)).await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let tap = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        tap.name().clone(),
        exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let server = serve(
        "amqp-rx",
        &names,
        &[
            "--pool-runtimes",
            "bash",
            "--min-idle",
            "1",
            "--amqp-results-exchange",
            &exchange,
        ],
    );
    let ids = vec!["rx-ok".to_owned(), "rx-err".to_owned()];
    producer
        .publish_job(&ids[0], json!({"runtime": "bash", "code": "echo fine"}))
        .await;
    producer
        .publish_job(&ids[1], json!({"runtime": "bash", "code": "exit 3"}))
        .await;
    assert!(producer.wait_for(&ids, Duration::from_secs(60)).await);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 && Instant::now() < deadline {
        match ch
            .basic_get(tap.name().clone(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(m) => {
                let r: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
                seen.push((
                    m.delivery.routing_key.as_str().to_owned(),
                    r["id"].as_str().unwrap().to_owned(),
                ));
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("error".to_owned(), "rx-err".to_owned()),
            ("ok".to_owned(), "rx-ok".to_owned())
        ]
    );
    let _ = producer.finish(Duration::from_millis(100)).await;
    drop(server);
    let _ = ch
        .exchange_delete(
            exchange.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = conn.close(200, "done".into()).await;
    names.delete().await;
}

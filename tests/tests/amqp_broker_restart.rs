//! The broker is stopped and started again mid-run (`scripts/rabbitmq.sh
//! stop`/`start`): `kiln serve` reconnects by itself (backoff with jitter),
//! redeclares, resumes, and every job completes; jobs that finished while
//! the broker was away are answered from the result store on redelivery.
//! Its own file: it takes the broker away from every other test.

mod amqp_support;

use std::time::{Duration, Instant};

use amqp_support::{capacity, metric, queue_counts, rabbitmq, serve, Names, Producer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_the_executor_reconnects_and_every_job_completes() {
    let names = Names::new("restart");
    let producer = Producer::new(&names).await;
    let server = serve("amqp-restart", &names, &capacity("bash", 2, 3, 3));
    let n = 200;
    let t = Instant::now();
    let ids = producer.publish_echo_jobs("r", n, "sleep 0.3; ").await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while producer.answered() < n / 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = producer.answered();
    tokio::task::block_in_place(|| {
        rabbitmq("stop");
        std::thread::sleep(Duration::from_secs(2));
        rabbitmq("start");
    });
    let restarted = t.elapsed();
    assert!(
        producer.wait_for(&ids, Duration::from_secs(300)).await,
        "every job answered after the restart"
    );
    let elapsed = t.elapsed();
    let metrics = server.request("GET", "/metrics", None).text();
    let replies = producer.finish(Duration::from_secs(3)).await;
    let (answered, dup_ids, extra) = replies.tally(&ids);
    let reconnects = metric(&metrics, "kiln_amqp_consumer_reconnects_total");
    let republished = metric(&metrics, "kiln_amqp_results_republished_total");
    let suppressed = metric(&metrics, "kiln_amqp_duplicates_suppressed_total");
    eprintln!(
        "broker restart: {n} jobs; restart done at {restarted:?} after {before} answers; all answered at {elapsed:?}; \
         reconnects {reconnects}, republished {republished}, duplicates suppressed {suppressed}; \
         ids with more than one result {dup_ids} ({extra} extra)"
    );
    assert_eq!(answered, n);
    assert!(reconnects >= 1.0, "{metrics}");
    // Jobs running when the connection went down finished meanwhile; their
    // messages came back and were answered from the store, not run again.
    assert!(republished >= 1.0, "{metrics}");
    assert_eq!(
        metric(&metrics, "kiln_jobs_total{source=\"amqp\""),
        n as f64,
        "each job ran once on this node"
    );
    assert_eq!(
        metric(&metrics, "kiln_amqp_connected"),
        1.0,
        "connected again"
    );
    for id in &ids {
        assert_eq!(replies.by_id[id][0].outcome(), "ok", "{id}");
    }
    assert_eq!(queue_counts(&names.queue), (0, 0));
    drop(server);
    names.delete().await;
}

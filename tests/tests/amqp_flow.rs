//! Flow control of the AMQP intake, checked with the broker's own view
//! (`rabbitmqctl`): the prefetch follows the scheduler's free capacity (HTTP
//! jobs take from it too) so unacked messages never exceed what the node
//! can start; priorities are honoured; SIGTERM stops consuming, answers what
//! is in flight and leaves the rest in the queue.

mod amqp_support;

use std::time::{Duration, Instant};

use amqp_support::{capacity, consuming_channels, queue_counts, serve, Names, Producer};
use kiln_tests::server::post_json;
use lapin::BasicProperties;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_never_exceed_free_capacity_in_the_brokers_view() {
    let names = Names::new("flow");
    let producer = Producer::new(&names).await;
    // Capacity 4 = 2 running + 2 queued.
    let server = serve("amqp-flow", &names, &capacity("bash", 2, 2, 2));
    let ids = producer.publish_echo_jobs("f", 40, "sleep 1; ").await;
    // Two slow HTTP jobs take half the capacity for a while, some seconds in.
    let addr = server.addr;
    let http = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        let hs: Vec<_> = (0..2)
            .map(|_| {
                std::thread::spawn(move || {
                    let body = json!({"runtime": "bash", "code": "sleep 10; echo http"});
                    // AMQP may hold every slot: HTTP gets 429 until one frees
                    // up (bounded retries).
                    for _ in 0..300 {
                        let (status, s) = post_json(addr, "/v1/jobs", &body);
                        if status != 429 {
                            return (status, s);
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    (429, "still busy after 300 tries".into())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while producer.answered() < ids.len() && Instant::now() < deadline {
        let channels = consuming_channels(&names.queue);
        let (ready, unacked) = queue_counts(&names.queue);
        samples.push((channels, ready, unacked));
    }
    assert!(producer.wait_for(&ids, Duration::from_secs(60)).await);
    let http = http.join().unwrap();
    let replies = producer.finish(Duration::from_millis(300)).await;
    eprintln!(
        "{} samples (global prefetch, channel unacked), ready, queue unacked:",
        samples.len()
    );
    for s in &samples {
        eprintln!("  {s:?}");
    }
    assert!(samples.len() >= 5, "the broker was sampled while jobs ran");
    for (channels, _, unacked) in &samples {
        assert!(
            *unacked <= 4,
            "the queue had {unacked} unacked > capacity 4"
        );
        assert!(channels.len() <= 1, "one consuming channel: {channels:?}");
        for (prefetch, ch_unacked) in channels {
            assert!(*prefetch <= 4, "prefetch {prefetch} > capacity 4");
            // A lowered prefetch does not take back what the channel holds
            // (a finished job's message stays unacked until its result is
            // confirmed): only the total is bounded by the capacity.
            assert!(
                *ch_unacked <= 4,
                "{ch_unacked} unacked on the channel > capacity 4"
            );
        }
    }
    assert!(
        samples
            .iter()
            .any(|(c, _, _)| c.iter().any(|(p, _)| *p < 4)),
        "while HTTP held capacity, the prefetch came down"
    );
    for (status, body) in http {
        assert_eq!(status, 200, "{body}");
    }
    let (answered, dup, _) = replies.tally(&ids);
    assert_eq!((answered, dup), (ids.len(), 0));
    drop(server);
    names.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_jobs_are_taken_first() {
    let names = Names::new("prio");
    let producer = Producer::new(&names).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = format!("low-{i}");
        producer
            .publish_raw(
                json!({"id": id, "runtime": "bash", "code": "echo low"})
                    .to_string()
                    .as_bytes(),
                BasicProperties::default().with_priority(0),
            )
            .await;
        ids.push(id);
    }
    producer
        .publish_raw(
            json!({"id": "high", "runtime": "bash", "code": "echo high"})
                .to_string()
                .as_bytes(),
            BasicProperties::default().with_priority(9),
        )
        .await;
    ids.push("high".into());
    // Capacity 1: one message at a time, in the broker's priority order.
    let server = serve("amqp-prio", &names, &capacity("bash", 1, 1, 0));
    assert!(producer.wait_for(&ids, Duration::from_secs(60)).await);
    let replies = producer.finish(Duration::from_millis(300)).await;
    assert_eq!(
        replies.order.first().map(String::as_str),
        Some("high"),
        "{:?}",
        replies.order
    );
    drop(server);
    names.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_in_flight_jobs_and_leaves_the_rest_in_the_queue() {
    let names = Names::new("term");
    let producer = Producer::new(&names).await;
    let ids = producer.publish_echo_jobs("t", 10, "sleep 1.5; ").await;
    let mut server = serve("amqp-term", &names, &capacity("bash", 2, 2, 0));
    // Wait until two jobs are in flight (the broker shows them unacked).
    let deadline = Instant::now() + Duration::from_secs(30);
    while queue_counts(&names.queue).1 < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answered_before = producer.answered();
    let status = tokio::task::block_in_place(|| server.term(Duration::from_secs(60)));
    assert!(status.success(), "kiln serve exits cleanly: {status:?}");
    let replies = producer.finish(Duration::from_secs(1)).await;
    let answered = replies.by_id.len();
    assert!(
        answered >= answered_before + 2,
        "the in-flight jobs were answered ({answered_before} before, {answered} after)"
    );
    for (id, rs) in &replies.by_id {
        assert_eq!(rs.len(), 1, "{id}");
        assert_eq!(
            rs[0].outcome(),
            "ok",
            "{id}: in-flight jobs finish, not killed: {:?}",
            rs[0].result
        );
    }
    let (ready, unacked) = queue_counts(&names.queue);
    assert_eq!(unacked, 0, "nothing held after exit");
    assert_eq!(
        ready as usize,
        ids.len() - answered,
        "the rest stays in the queue"
    );
    drop(server);
    names.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_http_holds_every_slot_the_consumer_pauses_then_resumes() {
    let names = Names::new("pause");
    let producer = Producer::new(&names).await;
    // Capacity 1.
    let server = serve("amqp-pause", &names, &capacity("bash", 1, 1, 0));
    let deadline = Instant::now() + Duration::from_secs(30);
    while amqp_support::consumer_count(&names.queue) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        amqp_support::consumer_count(&names.queue),
        1,
        "consuming at start"
    );
    // An HTTP job takes the only slot.
    let addr = server.addr;
    let http = std::thread::spawn(move || {
        let body = json!({"runtime": "bash", "code": "sleep 6; echo http"});
        post_json(addr, "/v1/jobs", &body)
    });
    // The broker sees no consumer while it runs: prefetch 0 would mean
    // "unlimited", so Kiln cancels its consumer instead.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut paused = false;
    while !paused && Instant::now() < deadline {
        paused = amqp_support::consumer_count(&names.queue) == 0;
    }
    assert!(
        paused,
        "the consumer is cancelled while HTTP holds every slot"
    );
    let ids: Vec<String> = (0..3).map(|i| format!("pz-{i}")).collect();
    for id in &ids {
        producer
            .publish_job(id, json!({"runtime": "bash", "code": "echo amqp"}))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        queue_counts(&names.queue),
        (3, 0),
        "jobs wait in the queue, none held by the busy node"
    );
    let (status, body) = tokio::task::block_in_place(|| http.join().unwrap());
    assert_eq!(status, 200, "{body}");
    assert!(
        producer.wait_for(&ids, Duration::from_secs(60)).await,
        "consuming resumes once the slot is free"
    );
    let replies = producer.finish(Duration::from_millis(300)).await;
    assert_eq!(replies.tally(&ids).0, ids.len());
    drop(server);
    names.delete().await;
}

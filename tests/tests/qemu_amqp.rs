//! `kiln serve --backend qemu` behind AMQP: jobs published to RabbitMQ run in
//! real Linux guests (QEMU; TCG here) and come back on their `reply_to`,
//! each exactly once, with their output and exit codes. Needs root, QEMU,
//! vhost-device-vsock, the guest artefacts (else SKIPPED, unless
//! `KILN_REQUIRE_GUEST=1`) and the broker (`scripts/rabbitmq.sh`).

mod amqp_support;

use std::time::Duration;

use amqp_support::{serve, Names, Producer};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_jobs_run_in_guests_and_are_answered_once() {
    if !kiln_tests::has_guest() {
        return;
    }
    let names = Names::new("qemu-amqp");
    let producer = Producer::new(&names).await;
    let mut server = serve(
        "qemu-amqp",
        &names,
        &[
            "--backend",
            "qemu",
            "--pool-runtimes",
            "python,bash",
            "--min-idle",
            "1",
        ],
    );
    let jobs = [
        (
            "qa-py",
            json!({"runtime": "python", "code": "import platform; print(platform.release().startswith('6.1.'))"}),
            "ok",
            "True\n",
        ),
        (
            "qa-sh",
            json!({"runtime": "bash", "code": "echo guest; exit 3"}),
            "error",
            "guest\n",
        ),
    ];
    for (id, job, _, _) in &jobs {
        producer.publish_job(id, job.clone()).await;
    }
    let ids: Vec<String> = jobs.iter().map(|j| j.0.to_owned()).collect();
    assert!(
        producer.wait_for(&ids, Duration::from_secs(180)).await,
        "not all jobs answered"
    );
    let replies = producer.finish(Duration::from_millis(500)).await;
    for (id, _, outcome, stdout) in &jobs {
        let r = &replies.by_id[*id];
        assert_eq!(r.len(), 1, "{id}: exactly one reply");
        assert_eq!(r[0].outcome(), *outcome, "{id}: {:?}", r[0].result);
        assert_eq!(
            r[0].result["stdout"], *stdout,
            "{id}: the guest runs its own 6.x kernel"
        );
    }
    assert!(server.term(Duration::from_secs(60)).success());
    names.delete().await;
}

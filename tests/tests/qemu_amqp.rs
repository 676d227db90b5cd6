//! `kiln serve --backend qemu` behind AMQP: jobs published to RabbitMQ run in
//! real Linux guests (QEMU; TCG here) and come back on their `reply_to`,
//! each exactly once, with their output and exit codes. Needs root, QEMU,
//! vhost-device-vsock, the guest artefacts (else SKIPPED, unless
//! `KILN_REQUIRE_GUEST=1`) and the broker (`scripts/rabbitmq.sh`).

mod amqp_support;

use std::time::Duration;

use amqp_support::{serve, Names, Producer};

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
    amqp_support::guest_jobs_answered_once(producer, "qa", Duration::from_secs(180)).await;
    assert!(server.term(Duration::from_secs(60)).success());
    names.delete().await;
}

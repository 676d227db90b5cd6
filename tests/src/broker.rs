//! The RabbitMQ broker of the tests that need one: a real broker on
//! loopback, started by `scripts/rabbitmq.sh` when it is not running (it
//! installs Debian's `rabbitmq-server` when missing). Crates outside
//! `tests/` (the load generator's tests) use it from here.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The broker the tests use: `KILN_TEST_AMQP_URL`, else the local
/// RabbitMQ's default guest account (allowed on loopback only).
pub fn url() -> String {
    std::env::var("KILN_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Makes sure the broker runs (once per test binary); panics with the
/// script's output when it cannot be started.
pub fn ensure() {
    static UP: OnceLock<()> = OnceLock::new();
    UP.get_or_init(|| {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .join("scripts/rabbitmq.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("start")
            .output()
            .expect("running scripts/rabbitmq.sh");
        assert!(
            out.status.success(),
            "scripts/rabbitmq.sh start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

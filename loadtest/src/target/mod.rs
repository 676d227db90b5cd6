//! What a job is sent to: `kiln serve`'s HTTP API ([`HttpTarget`]), its
//! AMQP intake through a RabbitMQ broker ([`AmqpTarget`]), or a program
//! spawned once per job ([`SpawnTarget`]). Each turns one job into one
//! [`Attempt`]; the loops in [`crate::drive`] do not know which.

mod amqp;
mod http;
mod spawn;

use kiln_protocol::{Outcome, Timings};
use serde::Deserialize;

pub use amqp::{AmqpSetupError, AmqpTarget};
pub use http::{HttpTarget, DEFAULT_RETRY_AFTER};
pub use spawn::SpawnTarget;

use crate::stats::Ending;

/// Largest result read; a `JobResult` carries at most twice the output cap
/// (64 MiB per stream), so this bounds memory, not results.
const MAX_BODY_BYTES: usize = 160 << 20;

/// What one attempt got.
#[derive(Debug)]
pub enum Attempt {
    Done(Ending),
    /// 429, with the wait the server asked for.
    Throttled(std::time::Duration),
}

/// The part of a `JobResult` the load generator reads; other fields are
/// ignored so that additions to the API do not break it.
#[derive(Deserialize)]
struct ResultView {
    outcome: Outcome,
    #[serde(default)]
    stdout: String,
    #[serde(default)]
    timings: Option<Timings>,
}

/// The ending a `JobResult` body stands for (HTTP 200 body, AMQP reply).
fn ending_of(body: &[u8], expect_stdout: Option<&str>) -> Ending {
    match serde_json::from_slice::<ResultView>(body) {
        Ok(v) => Ending::Ran {
            outcome: v.outcome,
            stdout_ok: expect_stdout.is_none_or(|e| e == v.stdout),
            timings: v.timings,
        },
        Err(e) => Ending::BadBody(e.to_string()),
    }
}

/// Any target.
pub enum Target {
    Http(HttpTarget),
    /// Boxed: a connection and its channels are large beside the others.
    Amqp(Box<AmqpTarget>),
    Spawn(SpawnTarget),
}

impl Target {
    pub async fn attempt(&self) -> Attempt {
        match self {
            Target::Http(t) => t.attempt().await,
            Target::Amqp(t) => t.attempt().await,
            Target::Spawn(t) => t.attempt().await,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Target::Http(_) => "http",
            Target::Amqp(_) => "amqp",
            Target::Spawn(_) => "spawn",
        }
    }

    pub fn endpoint(&self) -> String {
        match self {
            Target::Http(t) => t.endpoint(),
            Target::Amqp(t) => t.endpoint(),
            Target::Spawn(t) => t.endpoint(),
        }
    }

    /// Lets go of what the target holds (the AMQP connection) in an orderly
    /// way.
    pub async fn close(&self) {
        if let Target::Amqp(t) = self {
            t.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_body_becomes_an_ending() {
        let body = br#"{"id":"j","outcome":"ok","stdout":"1\n","timings":{"queued_ms":0,"acquire_ms":1,"acquire":"cold","run_ms":2,"total_ms":3,"sandbox":{"how":"boot","start_ms":1,"connect_ms":0,"setup_ms":0.5}}}"#;
        match ending_of(body, Some("1\n")) {
            Ending::Ran {
                outcome: Outcome::Ok,
                stdout_ok: true,
                timings: Some(t),
            } => assert_eq!(t.sandbox.unwrap().setup_ms, 0.5),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ending_of(body, Some("2\n")),
            Ending::Ran {
                stdout_ok: false,
                ..
            }
        ));
        assert!(matches!(ending_of(b"[]", None), Ending::BadBody(_)));
    }
}

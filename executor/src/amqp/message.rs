//! The message format: a job message becomes a typed [`JobSpec`] with an id
//! (from the body, else `message_id`, else a fresh one), or a [`Poison`]
//! that says which field is wrong; a result becomes a persistent JSON
//! message whose `message_id` is the job id, so that consumers of results
//! can deduplicate.

use std::time::{SystemTime, UNIX_EPOCH};

use kiln_protocol::{JobId, JobResult, JobSpec};
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

/// The content type of job and result bodies.
pub const JSON: &str = "application/json";

/// AMQP 0-9-1 `delivery-mode` 2: the broker writes the message to disk
/// (AMQP 0-9-1 spec, section 1.8.2, basic properties).
const PERSISTENT: u8 = 2;

/// Header naming why a message was dead-lettered: `field: what is wrong`.
pub const ERROR_HEADER: &str = "x-kiln-error";
/// Header with just the field at fault (`body`, `runtime`, `limits.memory_mb`...).
pub const ERROR_FIELD_HEADER: &str = "x-kiln-error-field";
/// Header carrying the job id on results and dead letters.
pub const JOB_ID_HEADER: &str = "x-kiln-job-id";
/// Header carrying the outcome on results.
pub const OUTCOME_HEADER: &str = "x-kiln-outcome";

/// Why a message can never succeed, and the id to answer it under.
#[derive(Debug, Clone)]
pub struct Poison {
    /// The field at fault (dotted path), as in [`kiln_protocol::SpecError`].
    pub field: String,
    /// The whole reason, starting with the field.
    pub reason: String,
    /// The job id for the `rejected` reply: the body's if readable, else the
    /// message id, else a fresh one.
    pub id: JobId,
}

impl Poison {
    pub fn new(field: &str, reason: String, id: JobId) -> Self {
        Self {
            field: field.to_owned(),
            reason,
            id,
        }
    }
}

/// The job a delivery carries, its id filled in; bodies over `max_bytes`
/// are refused unread.
pub fn parse_job(d: &Delivery, max_bytes: u64) -> Result<JobSpec, Poison> {
    let p = &d.properties;
    let message_id = p.message_id().as_ref().map(|m| JobId::parse(m.as_str()));
    if d.data.len() as u64 > max_bytes {
        return Err(Poison::new(
            "body",
            format!(
                "body: {} bytes; at most {max_bytes} (amqp.max_message_bytes)",
                d.data.len()
            ),
            message_id
                .and_then(Result::ok)
                .unwrap_or_else(JobId::random),
        ));
    }
    if expired(p) {
        return Err(Poison::new(
            "expiration",
            "expiration: the message expired before a node could start it".into(),
            loose_id(&d.data, message_id.as_ref()),
        ));
    }
    let mut spec = JobSpec::from_json(&d.data).map_err(|e| {
        Poison::new(
            &e.field,
            e.to_string(),
            loose_id(&d.data, message_id.as_ref()),
        )
    })?;
    if spec.id.is_none() {
        spec.id = Some(match message_id {
            Some(Ok(id)) => id,
            Some(Err(e)) => {
                return Err(Poison::new(
                    "message_id",
                    format!("message_id: {}", e.message),
                    JobId::random(),
                ))
            }
            None => JobId::random(),
        });
    }
    Ok(spec)
}

/// A job id for a message whose body is not a valid job: the body's `id`
/// if it is one, else the message id, else a fresh one.
fn loose_id(body: &[u8], message_id: Option<&Result<JobId, kiln_protocol::SpecError>>) -> JobId {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("id")?.as_str().and_then(|s| JobId::parse(s).ok()))
        .or_else(|| message_id.and_then(|m| m.as_ref().ok().cloned()))
        .unwrap_or_else(JobId::random)
}

/// Whether a message carrying `timestamp` (seconds) and `expiration` (ms)
/// is past its expiry. The broker drops expired messages at the head of the
/// queue; this catches those that expired while prefetched.
fn expired(p: &BasicProperties) -> bool {
    let (Some(ts), Some(exp)) = (p.timestamp(), p.expiration()) else {
        return false;
    };
    let Ok(exp_ms) = exp.as_str().parse::<u64>() else {
        return false;
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    ts.saturating_mul(1000).saturating_add(exp_ms) < now_ms
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The properties of a result message: persistent JSON, `message_id` = job
/// id, the request's `correlation_id`.
pub fn result_properties(r: &JobResult, correlation_id: Option<&ShortString>) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(JOB_ID_HEADER.into(), long(r.id.as_str()));
    headers.insert(OUTCOME_HEADER.into(), long(r.outcome.as_str()));
    let mut p = BasicProperties::default()
        .with_content_type(JSON.into())
        .with_delivery_mode(PERSISTENT)
        .with_message_id(r.id.as_str().into())
        .with_timestamp(now_s())
        .with_app_id("kiln".into())
        .with_headers(headers);
    if let Some(c) = correlation_id {
        p = p.with_correlation_id(c.clone());
    }
    p
}

/// The dead letter of `d`: the original body and properties, persistent,
/// with the reason in the headers.
pub fn dead_letter_properties(d: &Delivery, poison: &Poison, queue: &str) -> BasicProperties {
    let mut headers = d.properties.headers().clone().unwrap_or_default();
    headers.insert(ERROR_HEADER.into(), long(&poison.reason));
    headers.insert(ERROR_FIELD_HEADER.into(), long(&poison.field));
    headers.insert(JOB_ID_HEADER.into(), long(poison.id.as_str()));
    headers.insert("x-kiln-queue".into(), long(queue));
    d.properties
        .clone()
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(body: &str, props: BasicProperties) -> Delivery {
        Delivery::mock(1, "".into(), "q".into(), false, body.as_bytes().to_vec())
            .with_properties(props)
    }

    trait WithProps {
        fn with_properties(self, p: BasicProperties) -> Self;
    }
    impl WithProps for Delivery {
        fn with_properties(mut self, p: BasicProperties) -> Self {
            self.properties = p;
            self
        }
    }

    #[test]
    fn the_id_comes_from_the_body_then_the_message_id() {
        let d = delivery(
            r#"{"id":"body-id","runtime":"python","code":"1"}"#,
            BasicProperties::default().with_message_id("msg-id".into()),
        );
        assert_eq!(
            parse_job(&d, 1 << 20).unwrap().id.unwrap().as_str(),
            "body-id"
        );
        let d = delivery(
            r#"{"runtime":"python","code":"1"}"#,
            BasicProperties::default().with_message_id("msg-id".into()),
        );
        assert_eq!(
            parse_job(&d, 1 << 20).unwrap().id.unwrap().as_str(),
            "msg-id"
        );
    }

    #[test]
    fn poison_names_the_field_and_keeps_a_readable_id() {
        let d = delivery("not json", BasicProperties::default());
        assert_eq!(parse_job(&d, 1 << 20).unwrap_err().field, "body");
        let d = delivery(
            r#"{"id":"j1","runtime":"python","code":"1","limits":{"memory_mb":999999999}}"#,
            BasicProperties::default(),
        );
        let p = parse_job(&d, 1 << 20).unwrap_err();
        assert_eq!(p.field, "limits.memory_mb");
        assert_eq!(p.id.as_str(), "j1");
        let d = delivery(
            r#"{"runtime":"python","code":"1"}"#,
            BasicProperties::default().with_message_id("bad id!".into()),
        );
        assert_eq!(parse_job(&d, 1 << 20).unwrap_err().field, "message_id");
    }

    #[test]
    fn an_oversized_body_is_poison_unread() {
        let d = delivery(&"x".repeat(2048), BasicProperties::default());
        let p = parse_job(&d, 1024).unwrap_err();
        assert_eq!(p.field, "body");
        assert!(p.reason.contains("2048 bytes"), "{}", p.reason);
    }

    #[test]
    fn an_expired_message_is_poison() {
        let d = delivery(
            r#"{"runtime":"python","code":"1"}"#,
            BasicProperties::default()
                .with_timestamp(now_s() - 60)
                .with_expiration("1000".into()),
        );
        assert_eq!(parse_job(&d, 1 << 20).unwrap_err().field, "expiration");
    }
}

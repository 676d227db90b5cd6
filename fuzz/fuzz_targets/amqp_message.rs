//! A job message from RabbitMQ: `parse_job` on a delivery whose body,
//! `message_id`, `timestamp` and `expiration` come from the input, under
//! an `amqp.max_message_bytes` that does too.
//!
//! Input: a flags byte (which properties are set), the limit, the
//! timestamp, the expiration and message id (length-prefixed), then the
//! body.
//!
//! Properties: an accepted message gives a job with an id: the body's when
//! it has one, else the message id; it fits the limit and passes the
//! checks of every parsed job. A refused message (poison) names the field
//! at fault and its reason starts with it, and it is answered under the
//! body's id when the body has a valid one.
#![no_main]

use kiln_executor::edges::parse_job;
use kiln_fuzz::{check_job, is_job_field, Input};
use kiln_protocol::JobId;
use lapin::message::Delivery;
use lapin::types::ShortString;
use lapin::BasicProperties;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.u8();
    let max_bytes = u64::from(input.u16()) * 4;
    let timestamp = input.u64();
    let expiration_len = usize::from(input.u8() % 24);
    let expiration = String::from_utf8_lossy(input.take(expiration_len)).into_owned();
    let message_id_len = usize::from(input.u8());
    let message_id = String::from_utf8_lossy(input.take(message_id_len)).into_owned();
    let body = input.rest();

    // Short strings on the wire are at most 255 bytes; a longer one (the
    // lossy conversion can grow the input) cannot arrive, so it is not set.
    let short = |s: &str| ShortString::try_new(s).ok();
    let mut props = BasicProperties::default();
    let message_id = short(&message_id).filter(|_| flags & 1 != 0);
    if let Some(m) = &message_id {
        props = props.with_message_id(m.clone());
    }
    if flags & 2 != 0 {
        props = props.with_timestamp(timestamp);
    }
    if let Some(e) = short(&expiration).filter(|_| flags & 4 != 0) {
        props = props.with_expiration(e);
    }
    let mut d = Delivery::mock(1, "".into(), "jobs".into(), flags & 8 != 0, body.to_vec());
    d.properties = props;

    let body_id = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("id")?.as_str().and_then(|s| JobId::parse(s).ok()));
    match parse_job(&d, max_bytes) {
        Ok(spec) => {
            assert!(body.len() as u64 <= max_bytes);
            let id = spec.id.as_ref().expect("an accepted message has a job id");
            if let Some(b) = &body_id {
                assert_eq!(id, b, "the body's id was not kept");
            } else if let Some(m) = &message_id {
                assert_eq!(id.as_str(), m.as_str(), "the message id was not used");
            }
            check_job(&spec);
        }
        Err(p) => {
            assert!(
                p.reason.starts_with(&format!("{}: ", p.field)),
                "the reason does not start with the field: {p:?}"
            );
            assert!(
                is_job_field(&p.field) || ["expiration", "message_id"].contains(&p.field.as_str()),
                "poison naming no field: {p:?}"
            );
            JobId::parse(p.id.as_str()).expect("poison is answered under a valid id");
            if let (Some(b), true) = (&body_id, body.len() as u64 <= max_bytes) {
                assert_eq!(&p.id, b, "poison not answered under the body's id");
            }
        }
    }
});

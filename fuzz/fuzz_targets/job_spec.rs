//! A job body as `POST /v1/jobs` and `kiln submit` send it (the AMQP
//! intake has its own target): `JobSpec::from_json`, then the HTTP
//! API's mapping of its refusals.
//!
//! Properties: a job that parses re-serialises to JSON that parses to the
//! same job (one canonical form, files with distinct valid paths, the
//! entrypoint among them); a refused body gets an error naming a field of
//! the job, with a message starting with that field, and the API answers
//! 400 naming the same field.
#![no_main]

use kiln_executor::edges::parse_spec;
use kiln_fuzz::{check_job, is_job_field};
use kiln_protocol::JobSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match JobSpec::from_json(data) {
        Ok(spec) => {
            check_job(&spec);
            let api = parse_spec(data).expect("the API accepts what the parser accepts");
            assert_eq!(api, spec);
        }
        Err(e) => {
            assert!(
                is_job_field(&e.field),
                "refused naming no field of a job: {e}"
            );
            assert!(!e.message.is_empty(), "refused without a reason: {e:?}");
            let api = parse_spec(data).expect_err("the API refuses what the parser refuses");
            assert_eq!(api.status.as_u16(), 400);
            assert_eq!(api.field.as_deref(), Some(e.field.as_str()));
            assert!(api.message.contains(&e.message), "{api:?} lost {e}");
        }
    }
});

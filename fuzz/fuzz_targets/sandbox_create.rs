//! `POST /v1/sandboxes`, the create body, under workspace settings (default
//! and longest TTL) that a config file may set, extremes included.
//!
//! Input: two 8-byte TTLs in seconds (default, longest), then the body.
//!
//! Properties: an accepted body gives a request within every documented
//! bound (TTL above 0 and at most the longest, CPU, memory, disk and pids
//! in `kiln_protocol::limits`, environment names usable); a refused body
//! names a field, and the message starts with it.
#![no_main]

use std::time::Duration;

use kiln_executor::edges::{parse_create, WorkspaceSettings};
use kiln_fuzz::Input;
use kiln_protocol::limits;
use libfuzzer_sys::fuzz_target;

const FIELDS: [&str; 11] = [
    "body",
    "sandbox",
    "template",
    "ttl_s",
    "remove_on_exit",
    "allow_internet",
    "cpus",
    "memory_mb",
    "disk_mb",
    "pids",
    "env",
];

fn within(v: u64, (min, _, max): (u64, u64, u64)) -> bool {
    (min..=max).contains(&v)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    // `sandboxes.default_ttl_s` and `max_ttl_s`: any u64 the config takes.
    let max_ttl = Duration::from_secs(input.u64());
    let default_ttl = Duration::from_secs(input.u64()).min(max_ttl);
    let settings = WorkspaceSettings {
        max: 1,
        default_ttl,
        max_ttl,
    };
    match parse_create(&settings, input.rest()) {
        Ok(req) => {
            assert!(req.ttl <= max_ttl, "ttl {:?} above {max_ttl:?}", req.ttl);
            assert!(!req.ttl.is_zero() || default_ttl.is_zero());
            assert!(within(req.cpu_millis, limits::CPU_MILLIS));
            assert!(within(req.memory_mb, limits::MEMORY_MB));
            assert!(within(req.disk_mb, limits::DISK_MB));
            assert!(within(req.pids, limits::PIDS));
            assert!(req.env.len() <= limits::MAX_ENV);
            for k in req.env.keys() {
                assert!(!k.is_empty() && !k.contains(['=', '\0']), "env name {k:?}");
            }
        }
        Err(e) => {
            assert_eq!(e.status.as_u16(), 400, "{e:?}");
            let field = e.field.as_deref().expect("a refusal names a field");
            assert!(
                FIELDS.contains(&field) || field.starts_with("env."),
                "refused naming no field of the request: {e:?}"
            );
            assert!(
                e.message.contains(field),
                "the message does not name {field}: {e:?}"
            );
        }
    }
});

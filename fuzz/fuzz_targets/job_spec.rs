//! Arbitrary bytes as a job: parsing must never panic, and an accepted job
//! must survive a JSON round trip unchanged.
#![no_main]

use kiln_protocol::JobSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = JobSpec::from_json(data) {
        let json = serde_json::to_vec(&spec).expect("a parsed job serializes");
        assert_eq!(JobSpec::from_json(&json).expect("round trip"), spec);
    }
});

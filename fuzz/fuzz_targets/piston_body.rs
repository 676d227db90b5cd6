//! `POST /api/v2/execute`, the Piston-compatible body, against the built-in
//! runtime table: `parse_execute` resolves the language and version and
//! turns the body into a Kiln job.
//!
//! Properties: an accepted body gives a job for the runtime it resolved,
//! whose entrypoint is its first file, one per Piston file, that passes
//! the checks of every parsed job (`check_job`), and whose hex files hold
//! exactly the bytes their digits say; a refused body names the
//! request field at fault, and the message Piston clients get starts with
//! that field or, for the body, language and version, says what was wrong
//! with them.
#![no_main]

use kiln_executor::edges::parse_execute;
use kiln_fuzz::{check_job, is_job_field};
use kiln_protocol::RuntimeTable;
use libfuzzer_sys::fuzz_target;

#[derive(serde::Deserialize)]
struct Files {
    files: Vec<PistonFile>,
}

#[derive(serde::Deserialize)]
struct PistonFile {
    content: String,
    encoding: Option<String>,
}

fn is_piston_field(field: &str) -> bool {
    ["run_timeout", "run_memory_limit"].contains(&field) || is_job_field(field)
}

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static RUNTIMES: RuntimeTable = RuntimeTable::default();
    }
    RUNTIMES.with(|runtimes| match parse_execute(data, runtimes) {
        Ok((rt, spec)) => {
            assert_eq!(spec.runtime, rt.name);
            assert!(runtimes.resolve(&spec.runtime).is_ok());
            let entry = spec
                .entrypoint
                .as_deref()
                .expect("a Piston job names its entrypoint");
            assert_eq!(spec.files.first().map(|f| f.path.as_str()), Some(entry));
            assert!(spec.code.is_none());
            check_job(&spec);
            // A hex file's bytes are exactly what its hex digits say.
            // (Read leniently, like the parser, which skips unknown fields
            // without checking that their strings are UTF-8.)
            let req: Files = serde_json::from_slice(data).expect("accepted files");
            assert_eq!(req.files.len(), spec.files.len());
            for (f, got) in req.files.iter().zip(&spec.files) {
                if f.encoding.as_deref() == Some("hex") {
                    let asked = f.content.trim();
                    let hex: String = got.content.iter().map(|b| format!("{b:02x}")).collect();
                    assert_eq!(
                        hex,
                        asked.to_ascii_lowercase(),
                        "hex {asked:?} decoded wrongly"
                    );
                }
            }
        }
        Err(r) => {
            assert!(!r.message.is_empty(), "refused without a message: {r:?}");
            match r.field.as_str() {
                "body" => assert!(r.message.starts_with("invalid request: "), "{r:?}"),
                "language" | "version" => {
                    assert!(r.message.ends_with(" runtime is unknown"), "{r:?}")
                }
                f => {
                    assert!(is_piston_field(f), "refused naming no request field: {r:?}");
                    assert!(r.message.starts_with(f), "{r:?}");
                }
            }
        }
    });
});

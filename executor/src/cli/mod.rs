//! Subcommands of the `kiln` binary.

pub mod run;
pub mod serve;
pub mod submit;

use std::process::ExitCode;

use crate::backend::{self, BackendArgs};

/// `kiln reap`: reaps orphans (building the backend does it) and reports.
pub async fn reap(args: BackendArgs) -> anyhow::Result<ExitCode> {
    let table = backend::runtime_table(&args)?;
    let b = backend::jail(&args, table)?;
    let again = kiln_sandbox::Backend::reap_orphans(&b);
    for f in &again.failed {
        eprintln!("kiln: could not reap {f}");
    }
    Ok(if again.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

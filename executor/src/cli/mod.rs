//! Subcommands of the `kiln` binary.

mod job;
pub mod run;
pub mod serve;
pub mod submit;

use std::process::ExitCode;

use crate::backend::{self, BackendArgs};

/// `kiln reap`: reaps the orphans of every backend (jails, and microVMs,
/// which need no guest image to be reaped) and reports what failed.
pub async fn reap(args: BackendArgs) -> anyhow::Result<ExitCode> {
    let table = backend::runtime_table(&args)?;
    let b = backend::jail(&args, table)?;
    let mut failed = kiln_sandbox::Backend::reap_orphans(&b).failed;
    failed.extend(kiln_sandbox::qemu::reap_orphans_in(&args.state_dir).failed);
    for f in &failed {
        eprintln!("kiln: could not reap {f}");
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

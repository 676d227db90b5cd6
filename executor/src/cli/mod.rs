//! Subcommands of the `kiln` binary.

pub mod image;
mod job;
pub mod mcp;
pub mod run;
pub mod serve;
pub mod submit;
pub mod template;

use std::process::ExitCode;

use kiln_sandbox::BackendFlags;

/// `kiln reap`: reaps what crashed kiln processes left, for every backend
/// (jails, and microVMs, which need no guest image to be reaped), and
/// reports what failed.
pub async fn reap(flags: BackendFlags) -> anyhow::Result<ExitCode> {
    let failed = flags.settings().reap_all().failed;
    for f in &failed {
        eprintln!("kiln: could not reap {f}");
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

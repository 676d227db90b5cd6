//! `kiln`: the command line and daemon of Kiln, a serverless function
//! executor. `kiln run` executes one job locally in a fresh sandbox, with no
//! daemon; `kiln serve` is the daemon (warm pool, scheduler, HTTP API) and
//! `kiln submit` its command-line client. The module tree lives in the
//! library (`src/lib.rs`); this file only calls it.

use std::process::ExitCode;

fn main() -> ExitCode {
    kiln_executor::main()
}

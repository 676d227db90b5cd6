//! `kiln-loadtest`: the load generator for Kiln. It sends jobs to `kiln
//! serve`'s `POST /v1/jobs` (or spawns a program per job, for baselines:
//! the bare interpreter, `kiln run`, bwrap), in a closed loop (N concurrent
//! jobs) or an open loop (a target rate, latency counted from each job's
//! intended send time), and reports HDR percentiles of the end-to-end
//! latency and of the server's own timings, outcome and 429 counts,
//! throughput, warm/cold acquisition counts and, with `--server-pid`, the
//! daemon's CPU time per job and memory.
//!
//! The data path: [`cli::Cli`] → [`target::Target`] (what a job is sent to)
//! → [`drive`] (closed or open loop) → [`stats::Recorder`] →
//! [`stats::Report`].

pub mod cli;
pub mod drive;
pub mod procfs;
pub mod stats;
pub mod target;

pub use cli::{run, Cli};

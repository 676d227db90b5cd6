//! `kiln-loadtest`: the load generator for Kiln. It sends jobs to `kiln
//! serve`'s `POST /v1/jobs`, or through a RabbitMQ broker to its AMQP
//! intake (reply_to + correlation_id, publisher confirms), or spawns a
//! program per job for baselines (the bare interpreter, `kiln run`, bwrap);
//! in a closed loop (N concurrent jobs) or an open loop (a target rate,
//! latency counted from each job's intended send time). It reports HDR
//! percentiles of the end-to-end latency and of the server's own timings,
//! the cold-start split of jobs whose sandbox was made for them (start by
//! boot or restore, connect, setup, run, and the rest), outcome and 429
//! counts, throughput, warm/cold acquisition counts and, with
//! `--server-pid`, the daemon's CPU time per job and memory. It draws its
//! own SVG plots and compares two runs' JSON reports.
//!
//! The data path: [`cli::Cli`] → [`target::Target`] (what a job is sent to)
//! → [`drive`] (closed or open loop; [`progress`] watches) →
//! [`stats::Recorder`] → [`stats::Report`] → text, JSON, [`plots`] (drawn
//! by [`svg`]) and, later, [`compare`].

pub mod cli;
pub mod compare;
pub mod drive;
pub mod plots;
pub mod procfs;
pub mod progress;
pub mod stats;
pub mod svg;
pub mod target;

pub use cli::{compare_reports, run, Cli};

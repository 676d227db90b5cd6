//! The `kiln` command and daemon as a library: the module tree of the
//! executor (intake, scheduling, sandboxes, results) behind one entry point,
//! [`main`], which `src/main.rs` calls. It is a library so that the parsers
//! at its edges (HTTP bodies, AMQP messages, the config file) can be
//! fuzzed and tested from outside the binary; everything else stays
//! private.

mod amqp;
mod cli;
mod config;
mod contexts;
mod http;
mod images;
mod jobs;
mod live;
mod mcp;
mod metrics;
mod sandboxes;
pub mod scheduler;
mod units;
mod workspaces;

/// The parsers at the executor's edges, public for the fuzz targets
/// (`fuzz/`) and tests: each turns untrusted bytes (an HTTP body, an AMQP
/// message, the config file) into a typed value, or refuses them with an
/// error naming the input at fault.
pub mod edges {
    pub use crate::amqp::message::{parse_job, Poison};
    pub use crate::config::Config;
    pub use crate::http::jobs::parse_spec;
    pub use crate::http::piston::{parse_execute, Refusal};
    pub use crate::http::sandboxes::parse_create;
    pub use crate::http::ApiError;
    pub use crate::workspaces::{WorkspaceRequest, WorkspaceSettings};
}

use std::process::ExitCode;

/// An error and its sources, on one line, `: `-joined (what `{:#}` does
/// for an `anyhow::Error`, for the typed errors of the library's crates).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Kiln runs untrusted code in isolated sandboxes.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// The command line is parsed once, at start-up: how large the biggest
// variant's flags are does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run one job in a fresh sandbox and print its output.
    Run(cli::run::RunArgs),
    /// Run the daemon: warm pool, scheduler and HTTP API.
    Serve(config::ServeArgs),
    /// Submit a job to a running `kiln serve` and print its result.
    Submit(cli::submit::SubmitArgs),
    /// Destroy sandboxes left behind by crashed kiln processes.
    Reap(kiln_sandbox::BackendFlags),
    /// Kiln's MCP server over stdio (for desktop agents), bridged to a
    /// running `kiln serve`.
    Mcp(cli::mcp::McpArgs),
    /// Templates of the microVM backends: build, list, remove.
    #[command(subcommand)]
    Template(cli::template::TemplateCommand),
    /// Snapshots of microVM memory.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// OCI images sandboxes can be rooted in: import, list, remove, gc.
    #[command(subcommand)]
    Image(cli::image::ImageCommand),
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Serve a snapshot's memory to VMMs over userfaultfd (Firecracker's
    /// `Uffd` memory backend), lazily, recording or prefetching the working
    /// set; runs until SIGINT/SIGTERM.
    ServePages(kiln_snapshotter::ServePagesArgs),
}

/// The whole `kiln` command: parses the command line, dispatches to the
/// subcommand and returns the process's exit status.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // The page server is plain threads that wait for signals with sigwait:
    // it must start before any runtime thread exists, or a signal could land
    // on a thread that does not block it.
    let cli = match cli.command {
        Command::Snapshot(SnapshotCommand::ServePages(args)) => {
            return match kiln_snapshotter::run_serve_pages(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kiln: {e:#}");
                    ExitCode::from(70)
                }
            };
        }
        command => Cli { command },
    };
    // The daemon's config decides its runtime, so it is read first.
    let serve_config = match &cli.command {
        Command::Serve(args) => match config::Config::load(args) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("kiln: {e:#}");
                return ExitCode::from(70);
            }
        },
        _ => None,
    };
    // One thread unless asked for more: a job is a handful of events on the
    // daemon's side, and on a VM every wake-up of another thread costs more
    // than the work it hands over (measured in docs/BENCHMARKS.md). Blocking
    // work (creating and destroying sandboxes) runs on tokio's blocking pool.
    // The one-shot commands (run, submit, reap) wait on one job or request
    // at a time, so they run on one thread too.
    let threads = serve_config.as_ref().map_or(1, |c| c.server.worker_threads);
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: cannot start the async runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => cli::run::run(args).await,
            Command::Serve(args) => {
                let config = serve_config.expect("loaded above for serve");
                cli::serve::serve(args, config).await
            }
            Command::Submit(args) => cli::submit::submit(args).await,
            Command::Reap(args) => cli::reap(args).await,
            Command::Mcp(args) => cli::mcp::mcp(args).await,
            Command::Template(cmd) => cli::template::run(cmd).await,
            Command::Image(cmd) => cli::image::run(cmd).await,
            Command::Snapshot(_) => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: {e:#}");
            ExitCode::from(70)
        }
    }
}

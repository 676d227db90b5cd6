//! `kiln`: the command line and daemon of Kiln, a serverless function
//! executor. `kiln run` executes one job locally in a fresh sandbox, with no
//! daemon; the other subcommands grow with the daemon, queue and snapshot
//! issues. This file only parses the command line and dispatches.

mod backend;
mod cli;
mod units;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Kiln runs untrusted code in isolated sandboxes.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one job in a fresh sandbox and print its output.
    Run(cli::run::RunArgs),
    /// Destroy sandboxes left behind by crashed kiln processes.
    Reap(backend::BackendArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: cannot start the async runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => cli::run::run(args).await,
            Command::Reap(args) => cli::reap(args).await,
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

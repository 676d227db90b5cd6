//! `kiln snapshot serve-pages`: the page server on its own, for a
//! Firecracker started by hand.
//!
//! The executor mounts [`ServePagesArgs`] as a subcommand and calls
//! [`run_serve_pages`]; it blocks until SIGINT or SIGTERM, then shuts the
//! server down (writing any recorded working set) and prints the final
//! metrics as JSON on stdout.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::server::{PageServer, PageServerConfig, ServeMode, SnapshotSource};
use crate::store::{SnapshotId, SnapshotStore};
use crate::sys;

/// Serve guest memory to Firecracker's `Uffd` snapshot load.
///
/// Point Firecracker's `PUT /snapshot/load` at the socket with
/// `"mem_backend": {"backend_type": "Uffd", "backend_path": "<socket>"}`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServePagesArgs {
    /// Unix socket to listen on (the `backend_path` given to Firecracker).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Snapshot memory file to serve (Firecracker's `mem_file_path` output).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "snapshot",
        conflicts_with = "snapshot"
    )]
    pub memory: Option<PathBuf>,
    /// Serve a published snapshot by id from `--store` instead of `--memory`.
    #[arg(long, value_name = "ID", requires = "store")]
    pub snapshot: Option<String>,
    /// Snapshot store directory (with `--snapshot`).
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// lazy: serve on fault; record: also write the working set when the VM
    /// exits; prefetch: install the recorded working set first.
    #[arg(long, value_enum, default_value = "lazy")]
    pub mode: ServeMode,
    /// Working-set file (default: `<memory>.ws`, or the snapshot's own).
    #[arg(long, value_name = "PATH")]
    pub working_set: Option<PathBuf>,
    /// Permission bits of the socket, in octal (whoever can connect can read
    /// the snapshot's memory).
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Seconds a VMM has to deliver its handshake after connecting.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub handshake_timeout: u64,
    /// Threads installing one restore's working set in parallel (default:
    /// the number of cores, at most 4).
    #[arg(long, value_name = "N")]
    pub prefetch_threads: Option<usize>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "{s:?} is not an octal permission mode like 600 or 660"
        )),
    }
}

/// Runs the page server until SIGINT/SIGTERM.
pub fn run_serve_pages(args: ServePagesArgs) -> anyhow::Result<()> {
    // Block the signals before any server thread exists, so that every
    // thread inherits the mask and only our sigwait collects them.
    sys::block_termination_signals().context("cannot block SIGINT/SIGTERM")?;
    serve_pages_until(args, || {
        if let Ok(sig) = sys::wait_for_termination_signal() {
            tracing::info!(signal = sig, "stopping the page server");
        }
    })
}

/// Runs the page server until `stop` returns, then prints the metrics.
pub fn serve_pages_until(args: ServePagesArgs, stop: impl FnOnce()) -> anyhow::Result<()> {
    let source = match (&args.memory, &args.snapshot, &args.store) {
        (Some(memory), _, _) => {
            let mut source = SnapshotSource::new(memory, args.mode);
            if let Some(ws) = &args.working_set {
                source.working_set = ws.clone();
            }
            source
        }
        (None, Some(id), Some(store)) => {
            let store = SnapshotStore::open(store)
                .with_context(|| format!("cannot open the snapshot store {}", store.display()))?;
            let snapshot = store.get(&SnapshotId::new(id.clone())?)?;
            let mut source = snapshot.source(args.mode);
            if let Some(ws) = &args.working_set {
                source.working_set = ws.clone();
            }
            source
        }
        _ => anyhow::bail!("give --memory <file>, or --snapshot <id> with --store <dir>"),
    };
    let server = PageServer::with_config(PageServerConfig {
        handshake_timeout: Duration::from_secs(args.handshake_timeout.max(1)),
        socket_mode: args.socket_mode,
        prefetch_threads: args
            .prefetch_threads
            .unwrap_or(PageServerConfig::default().prefetch_threads),
        ..PageServerConfig::default()
    })?;
    server
        .listen(&args.socket, source.clone())
        .with_context(|| {
            format!(
                "cannot serve {} on {}",
                source.memory.display(),
                args.socket.display()
            )
        })?;
    eprintln!(
        "serving {} ({:?}, working set {}) on {}",
        source.memory.display(),
        args.mode,
        source.working_set.display(),
        args.socket.display()
    );
    stop();
    let metrics = server.metrics().clone();
    server.shutdown();
    println!("{}", serde_json::to_string_pretty(&metrics.snapshot())?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::os::unix::fs::PermissionsExt;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServePagesArgs,
    }

    #[test]
    fn parses_memory_or_store_snapshot_and_refuses_neither() {
        let cli = Cli::try_parse_from([
            "kiln", "--socket", "/tmp/s", "--memory", "/tmp/m", "--mode", "record",
        ])
        .unwrap();
        assert_eq!(cli.args.mode, ServeMode::Record);
        assert_eq!(
            cli.args.memory.as_deref(),
            Some(std::path::Path::new("/tmp/m"))
        );
        let cli = Cli::try_parse_from([
            "kiln",
            "--socket",
            "/tmp/s",
            "--snapshot",
            "py-1",
            "--store",
            "/var/lib/kiln",
        ])
        .unwrap();
        assert_eq!(cli.args.snapshot.as_deref(), Some("py-1"));
        assert_eq!(cli.args.socket_mode, 0o600);
        assert!(Cli::try_parse_from(["kiln", "--socket", "/tmp/s"]).is_err());
        assert!(Cli::try_parse_from([
            "kiln",
            "--socket",
            "/tmp/s",
            "--memory",
            "m",
            "--socket-mode",
            "999"
        ])
        .is_err());
        assert!(
            Cli::try_parse_from(["kiln", "--socket", "/tmp/s", "--snapshot", "x"]).is_err(),
            "--snapshot needs --store"
        );
        assert!(Cli::try_parse_from([
            "kiln", "--socket", "/tmp/s", "--memory", "m", "--mode", "eager"
        ])
        .is_err());
    }

    #[test]
    fn serves_until_stopped_and_refuses_a_missing_memory_file() {
        let dir = std::env::temp_dir().join(format!("kiln-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let args = |memory: &str| ServePagesArgs {
            socket: dir.join("s.sock"),
            memory: Some(dir.join(memory)),
            snapshot: None,
            store: None,
            mode: ServeMode::Lazy,
            working_set: None,
            socket_mode: 0o600,
            handshake_timeout: 1,
            prefetch_threads: None,
        };
        let err = serve_pages_until(args("missing"), || {}).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot open memory file"),
            "{err:#}"
        );
        std::fs::write(dir.join("memory"), vec![1u8; 8192]).unwrap();
        let mut socket_mode = None;
        serve_pages_until(args("memory"), || {
            socket_mode = std::fs::metadata(dir.join("s.sock"))
                .ok()
                .map(|m| m.permissions().mode() & 0o777)
        })
        .unwrap();
        assert_eq!(
            socket_mode,
            Some(0o600),
            "the socket is bound, owner-only, while serving"
        );
        assert!(
            !dir.join("s.sock").exists(),
            "the socket is removed on shutdown"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

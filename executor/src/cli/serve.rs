//! `kiln serve`: the daemon. Builds the backend (reaping what a killed
//! predecessor left), the scheduler with its warm pool, and the HTTP API;
//! on SIGTERM or SIGINT it drains: stops admitting, lets in-flight jobs
//! finish up to the grace, destroys every sandbox, then closes the API.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::amqp::{AmqpIntake, AmqpMetrics};
use crate::config::{Config, ServeArgs};
use crate::http::{self, App};
use crate::metrics::Metrics;
use crate::scheduler::{Retention, Scheduler, SchedulerSettings};
use crate::workspaces::WorkspaceSettings;

/// The scheduler's settings from the config.
fn scheduler_settings(c: &Config, pooled: Vec<String>) -> SchedulerSettings {
    SchedulerSettings {
        max_running: c.scheduler.max_running,
        queue_depth: c.scheduler.queue_depth,
        pooled,
        min_idle: c.pool.min_idle,
        max_idle_age: Duration::from_secs(c.pool.max_idle_age_s),
        lease_timeout: Duration::from_millis(c.pool.lease_timeout_ms),
        max_uses: c.pool.max_uses,
        retention: Retention {
            max_results: c.scheduler.results_max,
            ttl: Duration::from_secs(c.scheduler.results_ttl_s),
        },
        workspaces: WorkspaceSettings {
            max: c.sandboxes.max,
            default_ttl: Duration::from_secs(c.sandboxes.default_ttl_s),
            max_ttl: Duration::from_secs(c.sandboxes.max_ttl_s),
        },
        images: c.backends.images.clone(),
    }
}

pub async fn serve(args: ServeArgs, config: Config) -> anyhow::Result<ExitCode> {
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(ExitCode::SUCCESS);
    }
    let addr = config.bind_addr()?;
    let table = config.backends.runtime_table()?;
    let pooled = if config.pool.runtimes.is_empty() {
        table.names().into_iter().map(str::to_owned).collect()
    } else {
        config.pool.runtimes.clone()
    };
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let sandboxes = config.backends.open(table.clone())?;
    let metrics = Metrics::default();
    let scheduler = Scheduler::new(
        scheduler_settings(&config, pooled),
        sandboxes,
        table,
        metrics.clone(),
    )?;
    scheduler.prepare_templates();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    scheduler.register_pool_metrics(&mut registry);
    let intake = config.amqp.enabled().then(|| {
        let m = AmqpMetrics::default();
        m.register(&mut registry);
        tracing::info!(broker = %config.amqp.redacted_url(), queue = %config.amqp.queue, "AMQP intake on");
        AmqpIntake::start(config.amqp.clone(), scheduler.clone(), m)
    });
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr} (server.bind)"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    let app = Arc::new(App {
        scheduler: scheduler.clone(),
        registry,
        metrics,
        token: config.server.token.clone(),
        max_body_bytes: config.server.max_body_bytes,
        mcp: Default::default(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(http::serve(listener, app, stop_rx));
    tracing::info!(%local, "kiln serve listening");
    // The one line on stdout: scripts and tests read the bound address here
    // (useful with port 0).
    println!("listening on http://{local}");
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: draining"),
        _ = sigint.recv() => tracing::info!("SIGINT: draining"),
    }
    // The queue first stops handing us jobs (what is not started stays in
    // it for other nodes), while the scheduler finishes what is in flight.
    let drain = async {
        let amqp = async {
            if let Some(i) = intake {
                i.shutdown(config.drain_grace()).await;
            }
        };
        tokio::join!(amqp, scheduler.drain(config.drain_grace()));
    };
    tokio::pin!(drain);
    tokio::select! {
        _ = &mut drain => {}
        _ = async { tokio::select! { _ = sigterm.recv() => {}, _ = sigint.recv() => {} } } => {
            tracing::warn!("second signal: stopping in-flight jobs now");
            scheduler.drain(Duration::ZERO).await;
        }
    }
    let _ = stop_tx.send(true);
    let _ = server.await;
    tracing::info!("kiln serve stopped");
    Ok(ExitCode::SUCCESS)
}

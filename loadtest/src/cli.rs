//! The command line, and a run from flags to [`Report`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Parser;
use serde_json::json;

use crate::compare::{self, Comparison};
use crate::drive::{self, Arrivals, Bounds, On429};
use crate::plots;
use crate::procfs;
use crate::progress::{self, Progress};
use crate::stats::{Recorder, Report, RunInfo, ServerUsage};
use crate::target::{AmqpTarget, HttpTarget, SpawnTarget, Target};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "kiln-loadtest",
    about = "Load generator for Kiln's HTTP API and AMQP intake, with spawn-per-job baselines",
    after_help = "\
Examples:
  # warm pool latency, 1000 jobs, one at a time
  kiln-loadtest --url http://127.0.0.1:8080 -n 1000 -c 1
  # throughput at concurrency 32 for 30 s, retrying 429s, with daemon CPU/RSS
  kiln-loadtest -c 32 -n 100000 -d 30s --on-429 retry --server-pid $(pidof kiln)
  # open loop: 50 jobs/s, Poisson arrivals, JSON report and SVG plots
  kiln-loadtest --rate 50 -d 60s -n 3000 --json-out run.json --plots plots/
  # cold starts: a sandbox made for every job, latency split into its parts
  kiln-loadtest --cold -n 200 -c 2 --json-out cold.json
  # the same jobs through the AMQP intake (RPC: reply_to + correlation_id)
  kiln-loadtest --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f --amqp-queue kiln.jobs -c 8 -n 2000
  # two runs side by side, with ratios, and their CDFs on one plot
  kiln-loadtest --compare before.json after.json --plots plots/
  # baselines: the bare interpreter and `kiln run`, per job
  kiln-loadtest --baseline-bare -c 8 -n 2000
  kiln-loadtest --cli -c 1 -n 200
  # any command per job
  kiln-loadtest -n 200 -- /usr/bin/bwrap --ro-bind /usr /usr ... /usr/bin/python3 -c 'print(1)'

Latency is end-to-end (send to full response or AMQP reply, or spawn to
exit) and, in an open loop, counts from each job's intended send time. Only
jobs that ran (a JobResult came back, or a program exited) are in the
latency histograms; 429s, other statuses and failures are counted
separately. A cold job whose result says how its sandbox was made
(timings.sandbox) is split into queue, start (boot or restore), connect,
setup, acquire other, run, after run and transport. While it runs, a
progress line is drawn on stderr when stderr is a terminal.
Exit status: 0 when every job ran with outcome ok, 1 otherwise, 2 on usage
errors."
)]
pub struct Cli {
    /// The job endpoint (loopback only); a URL without a path means /v1/jobs.
    #[arg(long, default_value = "http://127.0.0.1:8080/v1/jobs")]
    pub url: String,
    /// Runtime of the job.
    #[arg(long, default_value = "python")]
    pub runtime: String,
    /// Code of the job.
    #[arg(long, default_value = "print(1)")]
    pub code: String,
    /// A whole JobSpec JSON file sent as the body (instead of --runtime/--code).
    #[arg(long, value_name = "FILE")]
    pub job: Option<PathBuf>,
    /// Ask for a cold sandbox per job. `kiln serve` serves a job cold when
    /// its `limits.disk_mb` differs from the pool template's (64 by
    /// default), so this sets `limits.disk_mb` to --cold-disk-mb. The server
    /// decides: the report counts `timings.acquire` of the results. (A
    /// server started with `--min-idle 0 --pool-max-uses 1` makes every
    /// job's sandbox cold without it.)
    #[arg(long)]
    pub cold: bool,
    /// The `limits.disk_mb` that --cold sends.
    #[arg(long, default_value_t = 63, value_name = "MIB")]
    pub cold_disk_mb: u64,
    /// Count a job's stdout as wrong unless it is exactly this (e.g. "1\n";
    /// backslash escapes \n and \t are understood).
    #[arg(long, value_name = "TEXT")]
    pub expect_stdout: Option<String>,

    /// Send the jobs to `kiln serve`'s AMQP intake through this broker
    /// (loopback only) instead of HTTP: each is published, with publisher
    /// confirms, to --amqp-queue with reply_to (this run's exclusive reply
    /// queue) and a fresh correlation_id; its latency ends at the reply.
    #[arg(long, value_name = "URL", conflicts_with_all = ["baseline_bare", "cli", "command"])]
    pub amqp_url: Option<String>,
    /// The jobs queue `kiln serve` consumes (its --amqp-queue).
    #[arg(long, default_value = "kiln.jobs", value_name = "QUEUE")]
    pub amqp_queue: String,

    /// Baseline: spawn the bare interpreter per job (`--python -c CODE`).
    #[arg(long, conflicts_with_all = ["cli", "command"])]
    pub baseline_bare: bool,
    /// The interpreter for --baseline-bare (a real binary, not a shim).
    #[arg(long, default_value = "/usr/bin/python3", value_name = "PATH")]
    pub python: PathBuf,
    /// Spawn `kiln run --runtime RUNTIME -c CODE` per job (a cold sandbox each).
    #[arg(long, conflicts_with = "command")]
    pub cli: bool,
    /// The kiln binary for --cli [default: next to kiln-loadtest].
    #[arg(long, value_name = "PATH")]
    pub kiln: Option<PathBuf>,
    /// Spawn this command per job instead of calling the API.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,

    /// Closed loop: jobs in flight at once.
    #[arg(short, long, default_value_t = 1)]
    pub concurrency: usize,
    /// Open loop: jobs sent per second (overrides the closed loop).
    #[arg(long, value_name = "PER_S")]
    pub rate: Option<f64>,
    /// Open loop: how arrivals are spaced.
    #[arg(long, value_enum, default_value_t = Arrivals::Poisson)]
    pub arrivals: Arrivals,
    /// Open loop: seed of the Poisson schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Open loop: most jobs outstanding; beyond it sends wait (their
    /// latency still counts from the intended time).
    #[arg(long, default_value_t = 512)]
    pub max_in_flight: usize,
    /// Most jobs to send (measured phase).
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub requests: u64,
    /// Longest measured phase, e.g. 30s, 2m.
    #[arg(short, long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Jobs sent before measuring (closed loop at --concurrency), not recorded.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Longest one request (or spawned program) may take.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// How long jobs in flight at the end of the phase may still finish.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain: Duration,
    /// What a 429 does to a job.
    #[arg(long = "on-429", value_enum, default_value_t = On429::Count)]
    pub on_429: On429,
    /// Also measure this process (the `kiln serve` daemon): its own CPU time
    /// per job and its memory, alone and with its descendants (sandboxes).
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<i32>,
    /// Write the report as JSON to this file (with --compare: the
    /// comparison).
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
    /// Write SVG plots into this directory: latency-cdf.svg and
    /// latency-over-time.svg (with --compare: compare-cdf.svg).
    #[arg(long, value_name = "DIR")]
    pub plots: Option<PathBuf>,
    /// Run nothing: read two --json-out reports and print them side by side
    /// with the ratio B/A of each figure.
    #[arg(long, num_args = 2, value_names = ["A.json", "B.json"])]
    pub compare: Vec<PathBuf>,
    /// Write every end-to-end latency (ms, one per line, jobs that ran) to
    /// this file, to merge runs exactly.
    #[arg(long, value_name = "FILE")]
    pub samples_out: Option<PathBuf>,
    /// Print nothing but errors (no report, no progress line).
    #[arg(short, long)]
    pub quiet: bool,
}

/// Parses `500ms`, `1.5s`, `2m`, `1h`, or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = [("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)]
        .iter()
        .find_map(|(suf, mult)| t.strip_suffix(suf).map(|n| (n, *mult)))
        .unwrap_or((t, 1.0));
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(Duration::from_secs_f64(v * unit)),
        _ => Err(format!("{s:?} is not a duration; use e.g. 500ms, 30s, 2m")),
    }
}

fn unescape(s: &str) -> String {
    s.replace("\\n", "\n").replace("\\t", "\t")
}

impl Cli {
    async fn target(&self) -> anyhow::Result<Target> {
        let expect = self.expect_stdout.as_deref().map(unescape);
        if self.baseline_bare {
            let argv = vec![
                self.python.display().to_string(),
                "-c".into(),
                self.code.clone(),
            ];
            return Ok(Target::Spawn(SpawnTarget::new(argv, expect)?));
        }
        if self.cli {
            let kiln = match &self.kiln {
                Some(k) => k.clone(),
                None => std::env::current_exe()
                    .context("locating kiln-loadtest")?
                    .with_file_name("kiln"),
            };
            if !kiln.is_file() {
                bail!(
                    "--cli: {} does not exist; build it (`cargo build --bins`) or pass --kiln",
                    kiln.display()
                );
            }
            let argv = vec![
                kiln.display().to_string(),
                "run".into(),
                "--runtime".into(),
                self.runtime.clone(),
                "-c".into(),
                self.code.clone(),
            ];
            return Ok(Target::Spawn(SpawnTarget::new(argv, expect)?));
        }
        if !self.command.is_empty() {
            return Ok(Target::Spawn(SpawnTarget::new(
                self.command.clone(),
                expect,
            )?));
        }
        let mut body = match &self.job {
            Some(p) => {
                let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                let v: serde_json::Value = serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is not JSON", p.display()))?;
                if !v.is_object() {
                    bail!("{}: a JobSpec is a JSON object", p.display());
                }
                v
            }
            None => json!({"runtime": self.runtime, "code": self.code}),
        };
        if self.cold {
            let limits = body
                .as_object_mut()
                .expect("checked above")
                .entry("limits")
                .or_insert_with(|| json!({}));
            let Some(limits) = limits.as_object_mut() else {
                bail!("the job's `limits` is not an object");
            };
            limits.insert("disk_mb".into(), json!(self.cold_disk_mb));
        }
        if let Some(url) = &self.amqp_url {
            let t =
                AmqpTarget::connect(url, &self.amqp_queue, body.to_string().into_bytes(), expect)
                    .await?;
            if t.consumers_at_start == 0 && !self.quiet {
                eprintln!(
                    "kiln-loadtest: warning: nothing consumes the queue {:?} yet; jobs wait there until a kiln serve does (or --timeout)",
                    self.amqp_queue
                );
            }
            return Ok(Target::Amqp(Box::new(t)));
        }
        Ok(Target::Http(HttpTarget::new(
            &self.url,
            Bytes::from(body.to_string()),
            expect,
        )?))
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0) {
                bail!("--rate must be a positive number of jobs per second");
            }
        }
        if !self.compare.is_empty() {
            bail!("--compare runs no load: it reads two reports (compare_reports)");
        }
        Ok(())
    }
}

fn load_average_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `--compare A B`: reads both reports, writes the comparison to
/// `--json-out` and its plot to `--plots` when asked, and returns the
/// side-by-side table.
pub fn compare_reports(cli: &Cli) -> anyhow::Result<String> {
    let [a, b] = &cli.compare[..] else {
        bail!("--compare takes two reports, A and B");
    };
    let (ra, rb) = (compare::load(a)?, compare::load(b)?);
    let c = Comparison {
        a: a.display().to_string(),
        b: b.display().to_string(),
        rows: compare::compare(&ra, &rb),
    };
    if let Some(p) = &cli.json_out {
        let text = serde_json::to_string_pretty(&c).context("encoding the comparison")?;
        std::fs::write(p, text + "\n").with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(dir) = &cli.plots {
        let name = |p: &std::path::Path| {
            p.file_name().map_or_else(
                || p.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        };
        plots::write_compare((&name(a), &ra), (&name(b), &rb), dir)?;
    }
    Ok(compare::render(&c, &ra, &rb))
}

/// Runs the load described by `cli` and returns its report.
pub async fn run(cli: &Cli) -> anyhow::Result<Report> {
    cli.check()?;
    let target = Arc::new(cli.target().await?);
    let report = measure(cli, &target).await;
    target.close().await;
    report
}

/// The warm-up and the measured phase against `target`.
async fn measure(cli: &Cli, target: &Arc<Target>) -> anyhow::Result<Report> {
    let show_progress = progress::wanted(cli.quiet);
    let bounds = Bounds {
        requests: cli.requests,
        duration: cli.duration,
        timeout: cli.timeout,
        drain: cli.drain,
        on_429: cli.on_429,
    };
    if cli.warmup > 0 {
        let discard = Arc::new(Mutex::new(Recorder::default()));
        let b = Bounds {
            requests: cli.warmup,
            ..bounds
        };
        let line = show_progress.then(|| Progress::start(discard.clone(), "warm-up: "));
        drive::closed(target.clone(), cli.concurrency, b, discard).await;
        if let Some(l) = line {
            l.finish().await;
        }
    }
    let rec = Arc::new(Mutex::new(Recorder::default()));
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let load = load_average_1m();
    let cpu_before = cli.server_pid.and_then(procfs::cpu_ticks);
    if let (Some(pid), None) = (cli.server_pid, cpu_before) {
        bail!("--server-pid {pid}: cannot read /proc/{pid}/stat");
    }
    let line = show_progress.then(|| Progress::start(rec.clone(), ""));
    let ran = match cli.rate {
        None => drive::closed(target.clone(), cli.concurrency, bounds, rec.clone()).await,
        Some(rate) => {
            drive::open(
                target.clone(),
                rate,
                cli.arrivals,
                cli.seed,
                cli.max_in_flight,
                bounds,
                rec.clone(),
            )
            .await
        }
    };
    if let Some(l) = line {
        l.finish().await;
    }
    let rec = rec.lock().expect("recorder lock");
    if let Some(p) = &cli.samples_out {
        let text: String = rec
            .samples()
            .map(|us| format!("{:.3}\n", us as f64 / 1000.0))
            .collect();
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    let server = match (cli.server_pid, cpu_before) {
        (Some(pid), Some(before)) => {
            let after = procfs::cpu_ticks(pid).unwrap_or(before);
            let cpu_ms = (after - before) as f64 * 1000.0 / procfs::ticks_per_s() as f64;
            let ran_jobs = rec.counts().ran;
            let tree = procfs::tree(pid);
            Some(ServerUsage {
                pid,
                cpu_ms,
                cpu_us_per_job: (ran_jobs > 0).then(|| cpu_ms * 1000.0 / ran_jobs as f64),
                rss_kib: procfs::rss_kib(pid).unwrap_or(0),
                tree_rss_kib: tree.iter().filter_map(|&p| procfs::rss_kib(p)).sum(),
                tree_pss_kib: tree.iter().filter_map(|&p| procfs::pss_kib(p)).sum(),
                tree_processes: tree.len(),
            })
        }
        _ => None,
    };
    let info = RunInfo {
        target: target.kind().into(),
        endpoint: target.endpoint(),
        loop_kind: if cli.rate.is_some() { "open" } else { "closed" }.into(),
        concurrency: cli.rate.is_none().then_some(cli.concurrency),
        rate_per_s: cli.rate,
        arrivals: cli
            .rate
            .map(|_| format!("{:?}", cli.arrivals).to_lowercase()),
        requests: cli.requests,
        duration_limit_s: cli.duration.as_secs_f64(),
        warmup: cli.warmup,
        cold: cli.cold,
        on_429: format!("{:?}", cli.on_429).to_lowercase(),
        started_unix_s,
        load_average_1m: load,
        in_flight_cap_hit: ran.cap_hit,
    };
    Ok(rec.report(info, ran.elapsed, server))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[tokio::test]
    async fn modes_pick_their_target() {
        let cli = Cli::parse_from(["kiln-loadtest", "--baseline-bare", "--code", "print(2)"]);
        assert_eq!(
            cli.target().await.unwrap().endpoint(),
            "/usr/bin/python3 -c 'print(2)'"
        );
        let cli = Cli::parse_from(["kiln-loadtest", "--", "/bin/true", "x"]);
        assert_eq!(cli.target().await.unwrap().endpoint(), "/bin/true x");
        let cli = Cli::parse_from(["kiln-loadtest", "--cold", "--url", "http://127.0.0.1:1"]);
        let Target::Http(t) = cli.target().await.unwrap() else {
            panic!("not http")
        };
        let body: serde_json::Value = serde_json::from_slice(t.body()).unwrap();
        assert_eq!(body["limits"]["disk_mb"], 63);
        assert_eq!(body["runtime"], "python");
        assert!(Cli::try_parse_from(["kiln-loadtest", "--baseline-bare", "--cli"]).is_err());
        assert!(Cli::try_parse_from(["kiln-loadtest", "--amqp-url", "amqp://x", "--cli"]).is_err());
        let cli = Cli::parse_from(["kiln-loadtest", "--compare", "a.json", "b.json"]);
        assert_eq!(cli.compare.len(), 2);
        assert!(Cli::try_parse_from(["kiln-loadtest", "--compare", "a.json"]).is_err());
    }
}

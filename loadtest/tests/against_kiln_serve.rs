//! The load generator against a real `kiln serve` (jail backend, the
//! built `kiln` binary) over HTTP and, through a real RabbitMQ on loopback
//! (started by `scripts/rabbitmq.sh`), over the AMQP intake: every job is
//! counted once, cold jobs carry the cold-start split and its parts add up,
//! the SVG plots are well-formed XML with the expected series, `--compare`
//! computes its ratios from the two reports, and the progress line appears
//! on a terminal and nowhere else. No timing is asserted.
//!
//! Needs root (the jail backend) and the workspace binaries built
//! (`cargo build --workspace --bins`, as `scripts/test.sh` does).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser as _;
use kiln_loadtest::stats::{Part, Report};
use kiln_loadtest::{run, Cli};
use kiln_tests::server::Server;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;

/// `kiln serve` pooling Python with `extra` flags, once `/readyz` says its
/// pool is filled.
fn serve(test: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--pool-runtimes", "python"];
    args.extend_from_slice(extra);
    let s = Server::start(test, &args);
    let deadline = Instant::now() + Duration::from_secs(120);
    while s.request("GET", "/readyz", None).status != 200 {
        assert!(Instant::now() < deadline, "/readyz never turned 200");
        std::thread::sleep(Duration::from_millis(50));
    }
    s
}

fn cli(args: &[&str]) -> Cli {
    let mut v = vec!["kiln-loadtest", "-q"];
    v.extend_from_slice(args);
    Cli::parse_from(v)
}

/// Jobs of a report that ran, ok, and nothing lost.
fn assert_all_ok(r: &Report, n: u64) {
    let c = &r.counts;
    assert_eq!((c.jobs, c.ran, c.ok), (n, n, n), "{c:?} {:?}", r.errors);
    assert_eq!(
        c.failed + c.abandoned + c.bad_body + c.http_other,
        0,
        "{c:?}"
    );
    assert_eq!(r.latency_ms.as_ref().unwrap().count, n);
    assert_eq!(r.server_ms.total.as_ref().unwrap().count, n);
    assert_eq!(c.acquire_warm + c.acquire_cold, n, "{c:?}");
}

/// The cold-start split of `r` is there for all `n` cold jobs, each part
/// counted for each job, and the parts' means add up to the end-to-end
/// mean.
fn assert_cold_split(r: &Report, n: u64) {
    assert_eq!(r.counts.acquire_cold, n, "{:?}", r.counts);
    let split = r
        .cold_start
        .get("boot")
        .unwrap_or_else(|| panic!("no boot split: {:?}", r.cold_start.keys()));
    assert_eq!(split.jobs, n);
    for part in Part::ALL {
        assert_eq!(split.part(part).count, n, "{part:?}");
    }
    let sum: f64 = Part::ALL.iter().map(|&p| split.part(p).mean).sum();
    let e2e = split.end_to_end_ms.mean;
    assert!(
        (sum - e2e).abs() <= 1e-6 * e2e,
        "parts {sum} ms, end-to-end {e2e} ms"
    );
    // Making a jail starts a process and shakes hands with its agent.
    assert!(
        split.start_ms.max > 0.0 && split.setup_ms.max > 0.0,
        "{split:?}"
    );
    // The client sees at least what the server measured.
    assert!(split.transport_ms.mean >= 0.0, "{split:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_jobs_are_counted_and_cold_ones_split() {
    let s = serve("lt-http", &["--min-idle", "2"]);
    let url = s.url("");
    let r = run(&cli(&[
        "--url",
        &url,
        "-n",
        "12",
        "-c",
        "2",
        "--expect-stdout",
        "1\\n",
    ]))
    .await
    .unwrap();
    assert_all_ok(&r, 12);
    assert_eq!(r.run.target, "http");
    // Whatever the pool served cold (it may run dry at c=2) is split.
    let split_jobs: u64 = r.cold_start.values().map(|s| s.jobs).sum();
    assert_eq!(split_jobs, r.counts.acquire_cold);

    let r = run(&cli(&["--url", &url, "--cold", "-n", "6", "-c", "2"]))
        .await
        .unwrap();
    assert_all_ok(&r, 6);
    assert!(r.run.cold);
    assert_cold_split(&r, 6);
    assert_eq!(r.latency_cold_ms.as_ref().unwrap().count, 6);

    // Open loop, bounded by the count.
    let r = run(&cli(&[
        "--url",
        &url,
        "--rate",
        "40",
        "--arrivals",
        "constant",
        "-n",
        "10",
    ]))
    .await
    .unwrap();
    assert_all_ok(&r, 10);
    assert_eq!(r.run.loop_kind, "open");
}

/// The documented server-side recipe for "every job a fresh sandbox": no
/// spares and one use per sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_spares_makes_every_sandbox_for_its_job() {
    let s = serve("lt-nospare", &["--min-idle", "0", "--pool-max-uses", "1"]);
    let r = run(&cli(&["--url", &s.url(""), "-n", "5", "-c", "1"]))
        .await
        .unwrap();
    assert_all_ok(&r, 5);
    assert!(!r.run.cold);
    assert_cold_split(&r, 5);
}

/// One test's broker objects, deleted when dropped.
struct Queues {
    jobs: String,
    dlx: String,
    dlq: String,
}

impl Queues {
    fn new(test: &str) -> Self {
        let base = format!("kiln.test.{test}.{}", std::process::id());
        Self {
            jobs: format!("{base}.jobs"),
            dlx: format!("{base}.dlx"),
            dlq: format!("{base}.dead"),
        }
    }

    fn serve_args(&self, url: &str) -> Vec<String> {
        [
            "--amqp-url",
            url,
            "--amqp-queue",
            &self.jobs,
            "--amqp-dead-letter-exchange",
            &self.dlx,
            "--amqp-dead-letter-queue",
            &self.dlq,
        ]
        .map(String::from)
        .to_vec()
    }

    /// Waits (bounded) until `kiln serve` consumes the jobs queue.
    async fn wait_for_consumer(&self, conn: &Connection) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // A passive declare of a queue not declared yet closes its
            // channel: a fresh channel each time.
            let ch = conn.create_channel().await.expect("channel");
            let q = ch
                .queue_declare(
                    self.jobs.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if q.is_ok_and(|q| q.consumer_count() > 0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kiln serve never consumed {}",
                self.jobs
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn delete(&self, conn: &Connection) {
        if let Ok(ch) = conn.create_channel().await {
            for q in [&self.jobs, &self.dlq] {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = ch
                .exchange_delete(self.dlx.as_str().into(), Default::default())
                .await;
        }
    }
}

/// Connects to the broker, retrying for up to 30 s: a broker that
/// `scripts/rabbitmq.sh` just started answers `rabbitmqctl status` a little
/// before it accepts AMQP connections (they are reset meanwhile).
async fn connect(url: &str) -> Connection {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Connection::connect(url, ConnectionProperties::default()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("cannot connect to {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_jobs_round_trip_in_closed_and_open_loops() {
    kiln_tests::broker::ensure();
    let url = kiln_tests::broker::url();
    let q = Queues::new("lt-amqp");
    let mut args = vec!["--min-idle".to_owned(), "2".to_owned()];
    args.extend(q.serve_args(&url));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = serve("lt-amqp", &args);
    let conn = connect(&url).await;
    q.wait_for_consumer(&conn).await;

    let amqp = ["--amqp-url", &url, "--amqp-queue", &q.jobs];
    let with = |extra: &[&'static str]| {
        let mut v: Vec<&str> = amqp.to_vec();
        v.extend_from_slice(extra);
        cli(&v)
    };
    let r = run(&with(&["-n", "20", "-c", "4", "--expect-stdout", "1\\n"]))
        .await
        .unwrap();
    assert_all_ok(&r, 20);
    assert_eq!(r.run.target, "amqp");
    assert!(r.run.endpoint.contains(&q.jobs), "{}", r.run.endpoint);
    assert!(
        !r.run.endpoint.contains(":guest@"),
        "password shown: {}",
        r.run.endpoint
    );

    let r = run(&with(&["--rate", "30", "-n", "8", "--cold"]))
        .await
        .unwrap();
    assert_all_ok(&r, 8);
    assert_eq!(r.run.loop_kind, "open");
    assert_cold_split(&r, 8);

    // The server saw each job once: it acked 28 job messages. (It acks
    // after the broker confirmed the result, so the last ack may come just
    // after the last reply: wait for it, bounded.)
    let acked = || {
        let metrics = s.request("GET", "/metrics", None).text();
        metrics
            .lines()
            .filter(|l| l.starts_with("kiln_amqp_messages_acked_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while acked() < 28.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(acked(), 28.0);

    // A queue nobody declared is named in the error.
    let e = run(&cli(&[
        "--amqp-url",
        &url,
        "--amqp-queue",
        "kiln.test.nosuchqueue",
    ]))
    .await
    .expect_err("a missing queue is an error");
    assert!(format!("{e:#}").contains("kiln.test.nosuchqueue"), "{e:#}");

    q.delete(&conn).await;
    let _ = conn.close(200, "done".into()).await;
}

fn loadtest() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln-loadtest"));
    c.stdin(Stdio::null());
    c
}

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-loadtest-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The series labels of an SVG written by the load generator, after
/// checking that it is well-formed XML whose root is `<svg>` and that every
/// series has a polyline of at least two points.
fn svg_series(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&text)
        .unwrap_or_else(|e| panic!("{} is not well-formed XML: {e}", path.display()));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );
    let mut labels = Vec::new();
    for g in root
        .descendants()
        .filter(|n| n.has_tag_name("g") && n.attribute("class") == Some("series"))
    {
        let label = g.attribute("data-label").unwrap().to_owned();
        let points: usize = g
            .children()
            .filter(|n| n.has_tag_name("polyline"))
            .map(|p| p.attribute("points").unwrap().split_whitespace().count())
            .sum();
        assert!(
            points >= 2,
            "{}: series {label:?} has {points} points",
            path.display()
        );
        labels.push(label);
    }
    // The legend names every series.
    let legend: Vec<&str> = root
        .descendants()
        .filter(|n| n.has_tag_name("g") && n.attribute("class") == Some("legend"))
        .flat_map(|g| g.descendants().filter(|n| n.has_tag_name("text")))
        .filter_map(|t| t.text())
        .collect();
    assert_eq!(legend, labels, "{}", path.display());
    labels
}

#[test]
fn plots_and_a_comparison_of_two_real_runs() {
    let s = serve("lt-plots", &["--min-idle", "2"]);
    let dir = scratch("plots");
    let url = s.url("");
    let runs = [("warm", vec![]), ("cold", vec!["--cold"])];
    for (name, extra) in &runs {
        let out = loadtest()
            .args(["--url", &url, "-n", "10", "-c", "2", "--json-out"])
            .arg(dir.join(format!("{name}.json")))
            .arg("--plots")
            .arg(dir.join(name))
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("end-to-end"), "{text}");
        // Not a terminal: no progress line, nothing on stderr.
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let read = |name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(dir.join(name)).unwrap()).unwrap()
    };
    let (a, b) = (read("warm.json"), read("cold.json"));
    for r in [&a, &b] {
        assert_eq!(r["report_version"], 1);
        assert_eq!(r["counts"]["ran"], 10);
        for key in [
            "latency_ms",
            "server_ms",
            "latency_cdf_ms",
            "timeline",
            "cold_start",
        ] {
            assert!(r.get(key).is_some(), "missing {key}");
        }
        let in_timeline: u64 = r["timeline"]["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["ran"].as_u64().unwrap())
            .sum();
        assert_eq!(in_timeline, 10);
    }
    assert_eq!(b["cold_start"]["boot"]["jobs"], 10);

    let cdf = svg_series(&dir.join("cold/latency-cdf.svg"));
    assert_eq!(cdf[0], "all jobs");
    let warm_cdf = svg_series(&dir.join("warm/latency-cdf.svg"));
    assert!(warm_cdf.contains(&"all jobs".to_owned()), "{warm_cdf:?}");
    assert_eq!(
        svg_series(&dir.join("cold/latency-over-time.svg")),
        ["p50", "p99", "max"]
    );

    let out = loadtest()
        .arg("--compare")
        .arg(dir.join("warm.json"))
        .arg(dir.join("cold.json"))
        .arg("--json-out")
        .arg(dir.join("compare.json"))
        .arg("--plots")
        .arg(dir.join("compare"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("B/A") && table.contains("cold start (boot) ms"),
        "{table}"
    );
    let cmp = read("compare.json");
    let rows = cmp["rows"].as_array().unwrap();
    let find = |section: &str, metric: &str| {
        rows.iter()
            .find(|r| r["section"] == section && r["metric"] == metric)
            .unwrap_or_else(|| panic!("no row {section} / {metric}"))
    };
    // serde_json (without its `float_roundtrip` feature) parses a decimal
    // to within one unit in the last place, not always to the nearest
    // double, so figures that went through two JSON files agree to that.
    let same = |x: &Value, y: f64, what: &str| {
        let x = x.as_f64().unwrap_or_else(|| panic!("{what}: {x}"));
        assert!((x - y).abs() <= 1e-12 * y.abs(), "{what}: {x} vs {y}");
    };
    let num = |v: &Value| v.as_f64().unwrap();
    for (metric, key) in [
        ("p50", "p50"),
        ("p99", "p99"),
        ("p99.9", "p999"),
        ("max", "max"),
    ] {
        let row = find("end-to-end ms", metric);
        let (ra, rb) = (num(&a["latency_ms"][key]), num(&b["latency_ms"][key]));
        same(&row["a"], ra, metric);
        same(&row["b"], rb, metric);
        same(&row["ratio"], rb / ra, metric);
    }
    let tput = find("throughput", "jobs/s");
    same(
        &tput["ratio"],
        num(&b["throughput_per_s"]) / num(&a["throughput_per_s"]),
        "jobs/s",
    );
    let run_p50 = find("server ms", "run p50");
    same(&run_p50["a"], num(&a["server_ms"]["run"]["p50"]), "run p50");
    // The cold split of B: A had none unless its pool ran dry.
    let start = find("cold start (boot) ms", "start (boot) p50");
    same(
        &start["b"],
        num(&b["cold_start"]["boot"]["start_ms"]["p50"]),
        "start p50",
    );
    assert_eq!(
        svg_series(&dir.join("compare/compare-cdf.svg")),
        ["A: warm.json", "B: cold.json"]
    );

    // A file that is no report is refused, naming it.
    std::fs::write(dir.join("other.json"), "{}").unwrap();
    let out = loadtest()
        .arg("--compare")
        .arg(dir.join("warm.json"))
        .arg(dir.join("other.json"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("other.json") && err.contains("report_version"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `cmd` with a pseudo-terminal as its stdin, stdout and stderr, by
/// util-linux's `script` (in Debian's essential `bsdutils`), and returns
/// what the terminal showed.
fn on_a_terminal(cmd: &[&str]) -> String {
    let quoted: Vec<String> = cmd
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    let out = Command::new("script")
        .args([
            "--quiet",
            "--return",
            "--command",
            &quoted.join(" "),
            "/dev/null",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("running script(1)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_progress_line_is_drawn_on_a_terminal_only() {
    let s = serve("lt-progress", &["--min-idle", "1"]);
    let url = s.url("");
    let bin = env!("CARGO_BIN_EXE_kiln-loadtest");
    let shown = on_a_terminal(&[bin, "--url", &url, "-n", "30", "-c", "1"]);
    // Drawn at once, rewritten in place, cleared before the report.
    assert!(shown.contains(" done, 0 failed |"), "{shown:?}");
    assert!(shown.contains("\r\x1b[K"), "{shown:?}");
    let report_at = shown.find("target   http").expect("the report");
    let last_clear = shown.rfind("\r\x1b[K").unwrap();
    assert!(last_clear < report_at, "{shown:?}");
    // --quiet: nothing at all, even on a terminal.
    let quiet = on_a_terminal(&[bin, "--url", &url, "-n", "5", "-q"]);
    assert!(quiet.trim().is_empty(), "{quiet:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_mode_runs_a_command_per_job() {
    let args = [
        "-n",
        "20",
        "-c",
        "2",
        "--expect-stdout",
        "1\\n",
        "--",
        "/bin/sh",
        "-c",
        "echo 1",
    ];
    let r = run(&cli(&args)).await.unwrap();
    assert_eq!(r.run.target, "spawn");
    assert_eq!((r.counts.ran, r.counts.ok), (20, 20));
    assert!(r.cold_start.is_empty());
}

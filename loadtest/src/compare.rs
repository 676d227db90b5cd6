//! `--compare A.json B.json`: two reports side by side, each figure with
//! the ratio B/A (below 1: B is lower, i.e. faster for a latency, slower
//! for a throughput). End-to-end percentiles, throughput, the server's
//! timings and the cold-start split of both runs; rows one side lacks
//! show `-`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::stats::{Part, Percentiles, Report, REPORT_VERSION};

/// Why a report could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not JSON")]
    NotJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// No `report_version`, or another one.
    #[error("{path} is not a kiln-loadtest report of version {REPORT_VERSION} (report_version is {found}); write it again with --json-out of this kiln-loadtest")]
    Version { path: PathBuf, found: String },
    #[error("{path} is a report of version {REPORT_VERSION} but does not have its shape")]
    Shape {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads a `--json-out` report, checking its version first.
pub fn load(path: &Path) -> Result<Report, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.into(),
        source,
    })?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|source| LoadError::NotJson {
            path: path.into(),
            source,
        })?;
    match v.get("report_version") {
        Some(n) if n.as_u64() == Some(u64::from(REPORT_VERSION)) => {}
        other => {
            return Err(LoadError::Version {
                path: path.into(),
                found: other.map_or("missing".into(), |n| n.to_string()),
            })
        }
    }
    serde_json::from_value(v).map_err(|source| LoadError::Shape {
        path: path.into(),
        source,
    })
}

/// One compared figure.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    /// What the figures are of (`end-to-end ms`, `cold start (boot) ms`...).
    pub section: String,
    /// Which figure (`p50`, `jobs/s`, `start (boot) p99`...).
    pub metric: String,
    pub a: Option<f64>,
    pub b: Option<f64>,
    /// `b / a`, when both exist and `a` is not 0.
    pub ratio: Option<f64>,
}

/// Two reports compared (`--compare` with `--json-out` writes this).
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    pub rows: Vec<Row>,
}

fn row(section: &str, metric: &str, a: Option<f64>, b: Option<f64>) -> Row {
    let ratio = match (a, b) {
        (Some(a), Some(b)) if a != 0.0 => Some(b / a),
        _ => None,
    };
    Row {
        section: section.into(),
        metric: metric.into(),
        a,
        b,
        ratio,
    }
}

type Pick = fn(&Percentiles) -> f64;
const ALL_PERCENTILES: [(&str, Pick); 6] = [
    ("p50", |p| p.p50),
    ("p90", |p| p.p90),
    ("p99", |p| p.p99),
    ("p99.9", |p| p.p999),
    ("max", |p| p.max),
    ("mean", |p| p.mean),
];
const SHORT_PERCENTILES: [(&str, Pick); 3] =
    [("p50", |p| p.p50), ("p99", |p| p.p99), ("mean", |p| p.mean)];

fn percentile_rows(
    rows: &mut Vec<Row>,
    section: &str,
    prefix: &str,
    a: Option<&Percentiles>,
    b: Option<&Percentiles>,
    which: &[(&str, Pick)],
) {
    if a.is_none() && b.is_none() {
        return;
    }
    for (name, pick) in which {
        rows.push(row(
            section,
            &format!("{prefix}{name}"),
            a.map(pick),
            b.map(pick),
        ));
    }
}

/// The rows comparing `a` with `b`.
pub fn compare(a: &Report, b: &Report) -> Vec<Row> {
    let mut rows = Vec::new();
    let e2e = "end-to-end ms";
    percentile_rows(
        &mut rows,
        e2e,
        "",
        a.latency_ms.as_ref(),
        b.latency_ms.as_ref(),
        &ALL_PERCENTILES,
    );
    percentile_rows(
        &mut rows,
        e2e,
        "warm ",
        a.latency_warm_ms.as_ref(),
        b.latency_warm_ms.as_ref(),
        &SHORT_PERCENTILES,
    );
    percentile_rows(
        &mut rows,
        e2e,
        "cold ",
        a.latency_cold_ms.as_ref(),
        b.latency_cold_ms.as_ref(),
        &SHORT_PERCENTILES,
    );
    let t = "throughput";
    rows.push(row(
        t,
        "jobs/s",
        Some(a.throughput_per_s),
        Some(b.throughput_per_s),
    ));
    rows.push(row(t, "ok/s", Some(a.ok_per_s), Some(b.ok_per_s)));
    let c = "jobs";
    let count = |r: &Report, f: fn(&crate::stats::Counts) -> u64| Some(f(&r.counts) as f64);
    rows.push(row(c, "ran", count(a, |c| c.ran), count(b, |c| c.ran)));
    rows.push(row(c, "ok", count(a, |c| c.ok), count(b, |c| c.ok)));
    rows.push(row(
        c,
        "cold",
        count(a, |c| c.acquire_cold),
        count(b, |c| c.acquire_cold),
    ));
    let not_ok = |r: &Report| Some((r.counts.jobs - r.counts.ok) as f64);
    rows.push(row(c, "not ok", not_ok(a), not_ok(b)));
    let s = "server ms";
    for (name, pa, pb) in [
        ("queued ", &a.server_ms.queued, &b.server_ms.queued),
        ("acquire ", &a.server_ms.acquire, &b.server_ms.acquire),
        ("run ", &a.server_ms.run, &b.server_ms.run),
        ("total ", &a.server_ms.total, &b.server_ms.total),
    ] {
        percentile_rows(
            &mut rows,
            s,
            name,
            pa.as_ref(),
            pb.as_ref(),
            &SHORT_PERCENTILES,
        );
    }
    let hows: BTreeSet<&String> = a.cold_start.keys().chain(b.cold_start.keys()).collect();
    for how in hows {
        let (sa, sb) = (a.cold_start.get(how), b.cold_start.get(how));
        let section = format!("cold start ({how}) ms");
        rows.push(row(
            &section,
            "jobs",
            sa.map(|x| x.jobs as f64),
            sb.map(|x| x.jobs as f64),
        ));
        percentile_rows(
            &mut rows,
            &section,
            "end-to-end ",
            sa.map(|x| &x.end_to_end_ms),
            sb.map(|x| &x.end_to_end_ms),
            &SHORT_PERCENTILES,
        );
        for part in Part::ALL {
            percentile_rows(
                &mut rows,
                &section,
                &format!("{} ", part.label(how)),
                sa.map(|x| x.part(part)),
                sb.map(|x| x.part(part)),
                &SHORT_PERCENTILES,
            );
        }
    }
    let u = "server usage";
    let cpu = |r: &Report| r.server.as_ref().and_then(|s| s.cpu_us_per_job);
    let pss = |r: &Report| r.server.as_ref().map(|s| s.tree_pss_kib as f64);
    if a.server.is_some() || b.server.is_some() {
        rows.push(row(u, "cpu us/job", cpu(a), cpu(b)));
        rows.push(row(u, "tree pss KiB", pss(a), pss(b)));
    }
    rows
}

/// A figure with about four significant digits; whole numbers (counts)
/// without decimals.
fn cell(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.fract() == 0.0 || v.abs() >= 1000.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 100.0 => format!("{v:.1}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.3}"),
    }
}

/// The side-by-side table.
pub fn render(c: &Comparison, a: &Report, b: &Report) -> String {
    let mut s = String::new();
    for (tag, name, r) in [("A", &c.a, a), ("B", &c.b, b)] {
        let _ = writeln!(
            s,
            "{tag}: {name}: {} {}, {}{}, {} jobs{}",
            r.run.target,
            r.run.endpoint,
            r.run.shape(),
            if r.run.cold { ", cold requested" } else { "" },
            r.counts.jobs,
            r.run
                .load_average_1m
                .map_or(String::new(), |l| format!(", host load {l:.2}")),
        );
    }
    let _ = writeln!(s, "B/A below 1: B is lower (faster, for a latency)");
    let mut section = "";
    for r in &c.rows {
        if r.section != section {
            section = &r.section;
            let _ = writeln!(s, "\n{:<34} {:>12} {:>12} {:>8}", section, "A", "B", "B/A");
        }
        let ratio = match r.ratio {
            None => "-".into(),
            // Two decimals, or enough to tell a tiny ratio from 0.
            Some(x) if x != 0.0 && x.abs() < 0.01 => format!("{x:.1e}x"),
            Some(x) => format!("{x:.2}x"),
        };
        let _ = writeln!(
            s,
            "  {:<32} {:>12} {:>12} {:>8}",
            r.metric,
            cell(r.a),
            cell(r.b),
            ratio
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Ending, Recorder, Sample};
    use kiln_protocol::Outcome;
    use std::time::Duration;

    fn report(ms: &[u64], elapsed_s: u64) -> Report {
        let mut r = Recorder::default();
        for &m in ms {
            r.add(&Sample {
                sent: Duration::ZERO,
                latency: Duration::from_millis(m),
                ending: Ending::Ran {
                    outcome: Outcome::Ok,
                    timings: None,
                    stdout_ok: true,
                },
                throttled: 0,
            });
        }
        let info = crate::stats::tests::info();
        r.report(info, Duration::from_secs(elapsed_s), None)
    }

    #[test]
    fn ratios_are_b_over_a() {
        let a = report(&[10, 10, 10, 10], 2);
        let b = report(&[5, 5, 5, 5], 1);
        let rows = compare(&a, &b);
        let get = |m: &str| rows.iter().find(|r| r.metric == m).unwrap();
        let p50 = get("p50");
        assert_eq!(p50.a, a.latency_ms.as_ref().map(|p| p.p50));
        assert_eq!(p50.b, b.latency_ms.as_ref().map(|p| p.p50));
        assert_eq!(p50.ratio, Some(p50.b.unwrap() / p50.a.unwrap()));
        assert!((p50.ratio.unwrap() - 0.5).abs() < 0.001, "{p50:?}");
        assert_eq!(get("jobs/s").ratio, Some(2.0));
        // No server timings on either side: no rows for them.
        assert!(!rows.iter().any(|r| r.section == "server ms"));
        let c = Comparison {
            a: "a.json".into(),
            b: "b.json".into(),
            rows,
        };
        let text = render(&c, &a, &b);
        assert!(text.contains("0.50x"), "{text}");
    }

    #[test]
    fn reports_of_another_version_are_refused() {
        let dir = std::env::temp_dir().join(format!("kiln-loadtest-cmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = dir.join("old.json");
        std::fs::write(&old, r#"{"run":{},"counts":{}}"#).unwrap();
        let e = load(&old).unwrap_err();
        assert!(matches!(e, LoadError::Version { .. }), "{e}");
        assert!(e.to_string().contains("missing"), "{e}");
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "not json").unwrap();
        assert!(matches!(load(&bad).unwrap_err(), LoadError::NotJson { .. }));
        let good = dir.join("good.json");
        std::fs::write(&good, serde_json::to_string(&report(&[1], 1)).unwrap()).unwrap();
        assert_eq!(load(&good).unwrap().counts.ran, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

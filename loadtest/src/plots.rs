//! The plots of `--plots DIR`, drawn from a [`Report`] alone (so that
//! `--compare` draws runs that ended long ago): the latency CDF on a log
//! axis (all jobs, and warm and cold ones when both kinds ran), latency
//! over the run by send time (per-interval p50, p99 and max), and for a
//! comparison both runs' CDFs on one chart.

use std::path::{Path, PathBuf};

use crate::stats::Report;
use crate::svg::{Axis, Chart, Scale, Series};

/// File names in the plot directory.
pub const CDF_FILE: &str = "latency-cdf.svg";
pub const TIMELINE_FILE: &str = "latency-over-time.svg";
pub const COMPARE_FILE: &str = "compare-cdf.svg";

/// Why the plots could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("creating the plot directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A CDF drawn as steps: the fraction holds until the next latency, then
/// rises there, as the empirical CDF does.
fn steps(cdf: &[[f64; 2]]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(cdf.len() * 2);
    let mut below = 0.0;
    for p in cdf {
        out.push((p[0], below));
        out.push((p[0], p[1]));
        below = p[1];
    }
    out
}

fn cdf_axes() -> (Axis, Axis) {
    (
        Axis::new("end-to-end latency (ms, log scale)", Scale::Log),
        Axis::new("fraction of jobs at or below", Scale::Linear).range(0.0, 1.0),
    )
}

/// A one-line description of a run for subtitles.
fn describe(r: &Report) -> String {
    format!(
        "{} {}, {}{}: {} jobs ran in {:.1} s",
        r.run.target,
        r.run.endpoint,
        r.run.shape(),
        if r.run.cold { ", cold" } else { "" },
        r.counts.ran,
        r.elapsed_s
    )
}

/// A shorter one, for two runs on one line.
fn describe_short(r: &Report) -> String {
    format!(
        "{}, {}{}, {} jobs",
        r.run.target,
        r.run.shape(),
        if r.run.cold { ", cold" } else { "" },
        r.counts.ran
    )
}

/// The latency CDF of one run.
pub fn cdf_chart(r: &Report) -> Chart {
    let (x, y) = cdf_axes();
    let mut c = Chart::new("Latency CDF", x, y).subtitle(describe(r));
    let cdfs = &r.latency_cdf_ms;
    c = c.series(Series::new("all jobs", steps(&cdfs.all)));
    // Warm and cold apart only when the run had both.
    if !cdfs.warm.is_empty() && !cdfs.cold.is_empty() {
        c = c
            .series(Series::new("acquire=warm", steps(&cdfs.warm)))
            .series(Series::new("acquire=cold", steps(&cdfs.cold)));
    }
    c
}

/// Latency by intended send time.
pub fn timeline_chart(r: &Report) -> Chart {
    let tl = &r.timeline;
    let series = |pick: fn(&crate::stats::Bucket) -> Option<f64>| -> Vec<(f64, f64)> {
        tl.buckets
            .iter()
            // A bucket is drawn at its middle; an empty one breaks the line.
            .map(|b| (b.t_s + tl.bucket_s / 2.0, pick(b).unwrap_or(f64::NAN)))
            .collect()
    };
    let not_ran: u64 = tl.buckets.iter().map(|b| b.not_ran).sum();
    let lat = || tl.buckets.iter().filter_map(|b| b.max_ms.zip(b.p50_ms));
    let lo = lat().map(|(_, p50)| p50).fold(f64::INFINITY, f64::min);
    let hi = lat().map(|(max, _)| max).fold(0.0, f64::max);
    // A log axis once the latencies span more than a factor of 30, where a
    // linear one would flatten the median against the floor.
    let scale = if lo > 0.0 && hi / lo > 30.0 {
        Scale::Log
    } else {
        Scale::Linear
    };
    let mut sub = describe(r);
    if not_ran > 0 {
        sub.push_str(&format!("; {not_ran} jobs did not run (not drawn)"));
    }
    Chart::new(
        "Latency over the run",
        Axis::new(
            format!(
                "intended send time since the start (s), in {} s buckets",
                tl.bucket_s
            ),
            Scale::Linear,
        ),
        Axis::new(
            if scale == Scale::Log {
                "end-to-end latency (ms, log scale)"
            } else {
                "end-to-end latency (ms)"
            },
            scale,
        ),
    )
    .subtitle(sub)
    .series(Series::new("p50", series(|b| b.p50_ms)))
    .series(Series::new("p99", series(|b| b.p99_ms)))
    .series(Series::new("max", series(|b| b.max_ms)).dashed())
}

/// Two runs' CDFs on one chart, labelled `a` and `b`.
pub fn compare_chart(a: (&str, &Report), b: (&str, &Report)) -> Chart {
    let (x, y) = cdf_axes();
    Chart::new("Latency CDF, compared", x, y)
        .subtitle(format!(
            "A: {}; B: {}",
            describe_short(a.1),
            describe_short(b.1)
        ))
        .series(Series::new(
            format!("A: {}", a.0),
            steps(&a.1.latency_cdf_ms.all),
        ))
        .series(Series::new(
            format!("B: {}", b.0),
            steps(&b.1.latency_cdf_ms.all),
        ))
}

fn write(dir: &Path, name: &str, chart: &Chart) -> Result<PathBuf, PlotError> {
    std::fs::create_dir_all(dir).map_err(|source| PlotError::Dir {
        path: dir.into(),
        source,
    })?;
    let path = dir.join(name);
    std::fs::write(&path, chart.render()).map_err(|source| PlotError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Writes the plots of one run into `dir`; returns their paths.
pub fn write_run(r: &Report, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    Ok(vec![
        write(dir, CDF_FILE, &cdf_chart(r))?,
        write(dir, TIMELINE_FILE, &timeline_chart(r))?,
    ])
}

/// Writes the comparison plot into `dir`.
pub fn write_compare(
    a: (&str, &Report),
    b: (&str, &Report),
    dir: &Path,
) -> Result<PathBuf, PlotError> {
    write(dir, COMPARE_FILE, &compare_chart(a, b))
}

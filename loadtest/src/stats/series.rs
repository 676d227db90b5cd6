//! The data the plots are drawn from, kept in the report so that
//! `--compare` can draw two runs without their raw samples: the latency
//! CDF (from the HDR histogram, thinned to points 1 % apart in latency)
//! and the timeline (per-interval percentiles of the jobs by their
//! intended send time, and the jobs that did not run).

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latency CDFs: `[latency ms, fraction of jobs at or below it]` points,
/// each a true point of the CDF (thinning drops points, it moves none).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Cdfs {
    pub all: Vec<[f64; 2]>,
    pub warm: Vec<[f64; 2]>,
    pub cold: Vec<[f64; 2]>,
}

/// Successive CDF points are at least this factor apart in latency, which
/// bounds a CDF to a few hundred points whatever the run.
const CDF_STEP: f64 = 1.01;

/// The CDF of `h`, empty for an empty histogram. The last point is the
/// maximum at fraction 1; latencies are HDR's highest equivalent values
/// (within 0.1 % of what was recorded).
pub fn cdf(h: &Histogram<u64>) -> Vec<[f64; 2]> {
    let total = h.len();
    if total == 0 {
        return Vec::new();
    }
    let mut out: Vec<[f64; 2]> = Vec::new();
    let mut seen = 0u64;
    // Latency at which the last point was started.
    let mut anchor_us = 0.0f64;
    for v in h.iter_recorded() {
        seen += v.count_since_last_iteration();
        let us = h.highest_equivalent(v.value_iterated_to()).min(h.max()) as f64;
        let point = [us / 1000.0, seen as f64 / total as f64];
        match out.last_mut() {
            // Within 1 % of where the last point started: that point moves
            // here, so that every point stays a true point of the CDF.
            Some(last) if us < anchor_us * CDF_STEP => *last = point,
            _ => {
                out.push(point);
                anchor_us = us;
            }
        }
    }
    out
}

/// One interval of the timeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Bucket {
    /// Start of the interval (intended send time), seconds from the start
    /// of the measured phase.
    pub t_s: f64,
    /// Jobs sent in the interval that ran.
    pub ran: u64,
    /// Jobs sent in the interval that did not run (429, errors).
    pub not_ran: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// Latency over the run, by intended send time.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Timeline {
    /// Width of every bucket, seconds.
    pub bucket_s: f64,
    pub buckets: Vec<Bucket>,
}

/// Bucket widths tried in order; the first giving at most
/// [`MAX_BUCKETS`] buckets is used.
const WIDTHS_S: [f64; 15] = [
    0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
const MAX_BUCKETS: f64 = 100.0;

/// The timeline of jobs given as (intended send time s, latency µs if the
/// job ran) over a phase `span_s` long.
pub fn timeline(jobs: impl Iterator<Item = (f64, Option<u32>)>, span_s: f64) -> Timeline {
    let span = span_s.max(0.0);
    let width = WIDTHS_S
        .into_iter()
        .find(|w| span / w <= MAX_BUCKETS)
        .unwrap_or(WIDTHS_S[WIDTHS_S.len() - 1]);
    let n = ((span / width).floor() as usize + 1).min(MAX_BUCKETS as usize + 1);
    let mut lat: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut not_ran = vec![0u64; n];
    for (t, l) in jobs {
        let i = ((t.max(0.0) / width).floor() as usize).min(n - 1);
        match l {
            Some(us) => lat[i].push(us),
            None => not_ran[i] += 1,
        }
    }
    let buckets = lat
        .into_iter()
        .zip(not_ran)
        .enumerate()
        .map(|(i, (mut v, not_ran))| {
            v.sort_unstable();
            // Nearest rank: the smallest value with at least q of the
            // bucket at or below it.
            let q = |q: f64| -> Option<f64> {
                let k = ((q * v.len() as f64).ceil() as usize).max(1);
                v.get(k - 1).map(|&us| f64::from(us) / 1000.0)
            };
            Bucket {
                t_s: i as f64 * width,
                ran: v.len() as u64,
                not_ran,
                p50_ms: q(0.5),
                p99_ms: q(0.99),
                max_ms: v.last().map(|&us| f64::from(us) / 1000.0),
            }
        })
        .collect();
    Timeline {
        bucket_s: width,
        buckets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cdf_rises_to_one_at_the_maximum_and_stays_small() {
        let mut h = super::super::histogram();
        for us in 1..=100_000u64 {
            h.record(us * 10).unwrap();
        }
        let c = cdf(&h);
        assert!(c.len() < 1200, "{}", c.len());
        assert!(c
            .windows(2)
            .all(|w| w[0][0] < w[1][0] && w[0][1] <= w[1][1]));
        let last = c.last().unwrap();
        assert_eq!(last[1], 1.0);
        assert!((last[0] - 1000.0).abs() / 1000.0 < 0.001, "{last:?}");
        // The median sits at about 500 ms.
        let mid = c.iter().find(|p| p[1] >= 0.5).unwrap();
        assert!((mid[0] - 500.0).abs() < 6.0, "{mid:?}");
        assert!(cdf(&super::super::histogram()).is_empty());
    }

    #[test]
    fn the_timeline_buckets_by_send_time() {
        let jobs = (0..300).map(|i| {
            let t = i as f64 / 10.0; // 30 s, 10 jobs a second
            let lat = if i % 10 == 9 {
                None
            } else {
                Some(1000 + i as u32)
            };
            (t, lat)
        });
        let tl = timeline(jobs, 30.0);
        assert_eq!(tl.bucket_s, 0.5);
        assert_eq!(tl.buckets.len(), 61);
        let b = &tl.buckets[2];
        assert_eq!(b.t_s, 1.0);
        assert_eq!(b.ran + b.not_ran, 5);
        let ran: u64 = tl.buckets.iter().map(|b| b.ran).sum();
        assert_eq!(ran, 270);
        assert!(b.p50_ms.unwrap() <= b.p99_ms.unwrap());
        assert!(tl.buckets.last().unwrap().p50_ms.is_none());
        let long = timeline(std::iter::empty(), 3000.0);
        assert_eq!(long.bucket_s, 30.0);
    }
}

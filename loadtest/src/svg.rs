//! A small SVG line-chart writer, so that the load generator draws its own
//! plots without a plotting library: two axes (linear or base-10 log) with
//! "nice" ticks, grid lines and labels, a title and subtitle, any number
//! of labelled series drawn as polylines clipped to the plot area, and a
//! legend in a row between the title and the plot, where it hides no data.
//!
//! The output is plain SVG 1.1 that browsers and image viewers show as is.
//! Each series is a `<g class="series" data-label="...">` holding its
//! polylines, so that tests (and people) can find a series by its label.

use std::fmt::Write as _;

/// Size of the whole picture, in SVG user units (pixels).
const WIDTH: f64 = 820.0;
const HEIGHT: f64 = 500.0;
/// Space around the plot area: room for the title, subtitle and legend
/// above (the legend's rows come on top of `MARGIN_TOP`), tick labels and
/// axis labels below and left.
const MARGIN_LEFT: f64 = 78.0;
const MARGIN_RIGHT: f64 = 24.0;
const MARGIN_TOP: f64 = 58.0;
const MARGIN_BOTTOM: f64 = 58.0;
/// Height of one legend row.
const LEGEND_ROW: f64 = 18.0;
/// Longest subtitle drawn, in characters (longer ones end in "…"): about
/// what fits the width at the subtitle's size.
const SUBTITLE_CHARS: usize = 125;

/// Series colours, in order: the Okabe-Ito palette, which stays
/// distinguishable for the common forms of colour blindness.
const PALETTE: [&str; 7] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
];

/// How an axis maps values to positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    /// Base-10 logarithmic; values ≤ 0 cannot be drawn and are skipped.
    Log,
}

/// One axis: its label, its scale and, optionally, a fixed range (else the
/// range is taken from the data and widened to round tick values).
#[derive(Debug, Clone)]
pub struct Axis {
    pub label: String,
    pub scale: Scale,
    pub range: Option<(f64, f64)>,
}

impl Axis {
    pub fn new(label: impl Into<String>, scale: Scale) -> Self {
        Self {
            label: label.into(),
            scale,
            range: None,
        }
    }

    /// Fixes the range instead of fitting it to the data.
    #[must_use]
    pub fn range(mut self, lo: f64, hi: f64) -> Self {
        self.range = Some((lo, hi));
        self
    }
}

/// A labelled line. A point with a non-finite coordinate breaks the line
/// (a gap in the data), so one series may be several polylines.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed (for a secondary series, e.g. a maximum).
    pub dashed: bool,
}

impl Series {
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.into(),
            points,
            dashed: false,
        }
    }

    #[must_use]
    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }
}

/// A line chart.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub subtitle: Option<String>,
    pub x: Axis,
    pub y: Axis,
    pub series: Vec<Series>,
}

/// A resolved axis: range and the mapping to pixels.
struct Mapped {
    scale: Scale,
    lo: f64,
    hi: f64,
    /// Pixel positions of `lo` and `hi`.
    p_lo: f64,
    p_hi: f64,
}

impl Mapped {
    fn t(&self, v: f64) -> f64 {
        match self.scale {
            Scale::Linear => v,
            Scale::Log => v.log10(),
        }
    }

    fn pos(&self, v: f64) -> f64 {
        let (a, b) = (self.t(self.lo), self.t(self.hi));
        let f = if b > a {
            (self.t(v) - a) / (b - a)
        } else {
            0.5
        };
        self.p_lo + f * (self.p_hi - self.p_lo)
    }

    /// Tick values: multiples of 1, 2 or 5 × 10^k on a linear axis (about
    /// five of them); decades on a log axis, with 2 and 5 between them
    /// when the axis spans at most two and a half decades.
    fn ticks(&self) -> Vec<f64> {
        match self.scale {
            Scale::Linear => {
                let step = nice_step((self.hi - self.lo) / 5.0);
                let mut v = (self.lo / step).ceil() * step;
                let mut out = Vec::new();
                while v <= self.hi + step * 1e-9 && out.len() < 50 {
                    out.push(clean(v));
                    v += step;
                }
                out
            }
            Scale::Log => {
                let (a, b) = (
                    self.lo.log10().floor() as i32,
                    self.hi.log10().ceil() as i32,
                );
                let narrow = (self.hi / self.lo).log10() <= 2.5;
                let mults: &[f64] = if narrow { &[1.0, 2.0, 5.0] } else { &[1.0] };
                let mut out = Vec::new();
                for e in a..=b {
                    for m in mults {
                        let v = clean(m * 10f64.powi(e));
                        if v >= self.lo * (1.0 - 1e-9) && v <= self.hi * (1.0 + 1e-9) {
                            out.push(v);
                        }
                    }
                }
                out
            }
        }
    }
}

/// The smallest of 1, 2, 5 × 10^k that is at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let e = raw.log10().floor();
    let base = 10f64.powf(e);
    let m = raw / base;
    let nice = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * base
}

/// Rounds away binary noise (0.30000000000000004 → 0.3) so that labels
/// print short.
fn clean(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let digits = 10 - v.abs().log10().floor() as i32;
    let f = 10f64.powi(digits.clamp(-300, 300));
    (v * f).round() / f
}

/// A tick label: the shortest decimal, with k/M for large values.
fn label(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 && (v / 1e6).fract() == 0.0 {
        format!("{}M", v / 1e6)
    } else if a >= 1e4 && (v / 1e3).fract() == 0.0 {
        format!("{}k", v / 1e3)
    } else {
        format!("{}", clean(v))
    }
}

/// `&`, `<`, `>`, `"` and `'` as entities, for text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The range of the drawable values of `axis` over every series (`pick`
/// selects the coordinate), widened to round values.
fn fit(axis: &Axis, values: impl Iterator<Item = f64>) -> (f64, f64) {
    if let Some((lo, hi)) = axis.range {
        return (lo, hi);
    }
    let usable = |v: &f64| v.is_finite() && (axis.scale == Scale::Linear || *v > 0.0);
    let (mut lo, mut hi) = values
        .filter(usable)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(v), h.max(v))
        });
    if !lo.is_finite() {
        return match axis.scale {
            Scale::Linear => (0.0, 1.0),
            Scale::Log => (1.0, 10.0),
        };
    }
    match axis.scale {
        Scale::Linear => {
            // Latencies, counts and times are drawn from zero.
            if lo > 0.0 {
                lo = 0.0;
            }
            if hi <= lo {
                hi = lo + 1.0;
            }
            let step = nice_step((hi - lo) / 5.0);
            (
                clean((lo / step).floor() * step),
                clean((hi / step).ceil() * step),
            )
        }
        Scale::Log => {
            if hi <= lo {
                hi = lo * 10.0;
            }
            // Out to the nearest 1, 2 or 5 × 10^k.
            let down = |v: f64| {
                let e = 10f64.powf(v.log10().floor());
                let m = [5.0, 2.0, 1.0]
                    .into_iter()
                    .find(|m| m * e <= v)
                    .unwrap_or(1.0);
                clean(m * e)
            };
            let up = |v: f64| {
                let e = 10f64.powf(v.log10().floor());
                let m = [1.0, 2.0, 5.0, 10.0]
                    .into_iter()
                    .find(|m| m * e >= v * (1.0 - 1e-12))
                    .unwrap_or(10.0);
                clean(m * e)
            };
            (down(lo), up(hi))
        }
    }
}

/// Where each legend entry goes: (row, x offset from the left of the
/// plot), wrapping to a new row when the plot's width is used up.
fn legend_layout(labels: &[&str], width: f64) -> Vec<(usize, f64)> {
    let mut out = Vec::with_capacity(labels.len());
    let (mut row, mut x) = (0, 0.0);
    for l in labels {
        // A 22-pixel line sample, a gap, the text at about 7 pixels a
        // character, and space before the next entry.
        let w = 34.0 + l.chars().count() as f64 * 7.0 + 18.0;
        if x > 0.0 && x + w > width {
            row += 1;
            x = 0.0;
        }
        out.push((row, x));
        x += w;
    }
    out
}

impl Chart {
    pub fn new(title: impl Into<String>, x: Axis, y: Axis) -> Self {
        Self {
            title: title.into(),
            subtitle: None,
            x,
            y,
            series: Vec::new(),
        }
    }

    #[must_use]
    pub fn subtitle(mut self, s: impl Into<String>) -> Self {
        self.subtitle = Some(s.into());
        self
    }

    #[must_use]
    pub fn series(mut self, s: Series) -> Self {
        self.series.push(s);
        self
    }

    /// The chart as a standalone SVG document.
    pub fn render(&self) -> String {
        let (px0, px1) = (MARGIN_LEFT, WIDTH - MARGIN_RIGHT);
        let labels: Vec<&str> = self.series.iter().map(|x| x.label.as_str()).collect();
        let legend = legend_layout(&labels, px1 - px0);
        let legend_rows = legend.iter().map(|(r, _)| r + 1).max().unwrap_or(0);
        let legend_top = MARGIN_TOP;
        let (py0, py1) = (
            HEIGHT - MARGIN_BOTTOM,
            MARGIN_TOP + LEGEND_ROW * legend_rows as f64 + 8.0,
        );
        let all = || self.series.iter().flat_map(|s| s.points.iter());
        let (xlo, xhi) = fit(&self.x, all().map(|p| p.0));
        let (ylo, yhi) = fit(&self.y, all().map(|p| p.1));
        let xm = Mapped {
            scale: self.x.scale,
            lo: xlo,
            hi: xhi,
            p_lo: px0,
            p_hi: px1,
        };
        let ym = Mapped {
            scale: self.y.scale,
            lo: ylo,
            hi: yhi,
            p_lo: py0,
            p_hi: py1,
        };

        let mut s = String::new();
        let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, "<title>{}</title>", escape(&self.title));
        let _ = writeln!(
            s,
            r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
        );
        let _ = writeln!(
            s,
            r#"<defs><clipPath id="plot-area"><rect x="{px0}" y="{py1}" width="{}" height="{}"/></clipPath></defs>"#,
            px1 - px0,
            py0 - py1
        );
        let _ = writeln!(
            s,
            r#"<text class="title" x="{px0}" y="24" font-size="16" font-weight="bold">{}</text>"#,
            escape(&self.title)
        );
        if let Some(sub) = &self.subtitle {
            let shown: String = if sub.chars().count() > SUBTITLE_CHARS {
                sub.chars()
                    .take(SUBTITLE_CHARS - 1)
                    .chain(std::iter::once('…'))
                    .collect()
            } else {
                sub.clone()
            };
            let _ = writeln!(
                s,
                r##"<text class="subtitle" x="{px0}" y="42" font-size="11" fill="#555">{}</text>"##,
                escape(&shown)
            );
        }

        // Grid and ticks.
        let _ = writeln!(s, r##"<g class="grid" stroke="#e4e4e4" stroke-width="1">"##);
        for v in xm.ticks() {
            let x = xm.pos(v);
            let _ = writeln!(
                s,
                r#"<line x1="{x:.1}" y1="{py0}" x2="{x:.1}" y2="{py1}"/>"#
            );
        }
        for v in ym.ticks() {
            let y = ym.pos(v);
            let _ = writeln!(
                s,
                r#"<line x1="{px0}" y1="{y:.1}" x2="{px1}" y2="{y:.1}"/>"#
            );
        }
        let _ = writeln!(s, "</g>");
        let _ = writeln!(s, r##"<g class="axes" stroke="#333" stroke-width="1">"##);
        let _ = writeln!(s, r#"<line x1="{px0}" y1="{py0}" x2="{px1}" y2="{py0}"/>"#);
        let _ = writeln!(s, r#"<line x1="{px0}" y1="{py0}" x2="{px0}" y2="{py1}"/>"#);
        for v in xm.ticks() {
            let x = xm.pos(v);
            let _ = writeln!(
                s,
                r#"<line x1="{x:.1}" y1="{py0}" x2="{x:.1}" y2="{:.1}"/>"#,
                py0 + 5.0
            );
        }
        for v in ym.ticks() {
            let y = ym.pos(v);
            let _ = writeln!(
                s,
                r#"<line x1="{:.1}" y1="{y:.1}" x2="{px0}" y2="{y:.1}"/>"#,
                px0 - 5.0
            );
        }
        let _ = writeln!(s, "</g>");
        let _ = writeln!(s, r##"<g class="tick-labels" fill="#333">"##);
        for v in xm.ticks() {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                xm.pos(v),
                py0 + 19.0,
                escape(&label(v))
            );
        }
        for v in ym.ticks() {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                px0 - 8.0,
                ym.pos(v) + 4.0,
                escape(&label(v))
            );
        }
        let _ = writeln!(s, "</g>");
        let _ = writeln!(
            s,
            r#"<text class="x-label" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            (px0 + px1) / 2.0,
            HEIGHT - 16.0,
            escape(&self.x.label)
        );
        let (lx, ly) = (18.0, (py0 + py1) / 2.0);
        let _ = writeln!(
            s,
            r#"<text class="y-label" x="{lx}" y="{ly:.1}" text-anchor="middle" transform="rotate(-90 {lx} {ly:.1})">{}</text>"#,
            escape(&self.y.label)
        );

        // Series.
        let drawable = |(x, y): (f64, f64), m: (&Mapped, &Mapped)| {
            let ok = |v: f64, a: &Mapped| v.is_finite() && (a.scale == Scale::Linear || v > 0.0);
            ok(x, m.0) && ok(y, m.1)
        };
        for (i, series) in self.series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let dash = if series.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let _ = writeln!(
                s,
                r#"<g class="series" data-label="{}" fill="none" stroke="{colour}" stroke-width="1.8"{dash} clip-path="url(#plot-area)">"#,
                escape(&series.label)
            );
            let mut line: Vec<String> = Vec::new();
            let flush = |line: &mut Vec<String>, s: &mut String| {
                if !line.is_empty() {
                    let _ = writeln!(s, r#"<polyline points="{}"/>"#, line.join(" "));
                    line.clear();
                }
            };
            for &p in &series.points {
                if drawable(p, (&xm, &ym)) {
                    line.push(format!("{:.1},{:.1}", xm.pos(p.0), ym.pos(p.1)));
                } else {
                    flush(&mut line, &mut s);
                }
            }
            flush(&mut line, &mut s);
            let _ = writeln!(s, "</g>");
        }

        // Legend, in rows above the plot.
        if !self.series.is_empty() {
            let _ = writeln!(s, r#"<g class="legend">"#);
            for (i, (series, (row, dx))) in self.series.iter().zip(&legend).enumerate() {
                let colour = PALETTE[i % PALETTE.len()];
                let y = legend_top + LEGEND_ROW * *row as f64;
                let x = px0 + dx;
                let dash = if series.dashed {
                    r#" stroke-dasharray="6 4""#
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    r#"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="2.5"{dash}/>"#,
                    x + 22.0
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                    x + 28.0,
                    y + 4.0,
                    escape(&series.label)
                );
            }
            let _ = writeln!(s, "</g>");
        }
        let _ = writeln!(s, "</svg>");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.3), 2.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(nice_step(0.013), 0.02);
        assert_eq!(nice_step(0.0), 1.0);
    }

    #[test]
    fn log_axes_fit_round_values_and_tick_decades() {
        let a = Axis::new("ms", Scale::Log);
        assert_eq!(fit(&a, [0.31, 47.0].into_iter()), (0.2, 50.0));
        let m = Mapped {
            scale: Scale::Log,
            lo: 0.2,
            hi: 50.0,
            p_lo: 0.0,
            p_hi: 100.0,
        };
        // Up to two decades wide: 1, 2 and 5 of each.
        let t = m.ticks();
        assert_eq!(t, [0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0]);
        let wide = Mapped { hi: 5000.0, ..m };
        assert_eq!(wide.ticks(), [1.0, 10.0, 100.0, 1000.0]);
        assert!((m.pos(0.2) - 0.0).abs() < 1e-9 && (m.pos(50.0) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn linear_axes_start_at_zero_with_clean_labels() {
        let a = Axis::new("s", Scale::Linear);
        assert_eq!(fit(&a, [0.3, 0.9].into_iter()), (0.0, 1.0));
        let m = Mapped {
            scale: Scale::Linear,
            lo: 0.0,
            hi: 1.0,
            p_lo: 0.0,
            p_hi: 1.0,
        };
        let labels: Vec<String> = m.ticks().into_iter().map(label).collect();
        assert_eq!(labels, ["0", "0.2", "0.4", "0.6", "0.8", "1"]);
        assert_eq!(label(20000.0), "20k");
        assert_eq!(label(3_000_000.0), "3M");
    }

    #[test]
    fn legend_entries_wrap_to_new_rows() {
        let l = legend_layout(&["p50", "p99", "max"], 700.0);
        assert!(l.iter().all(|(row, _)| *row == 0), "{l:?}");
        assert!(l[0].1 < l[1].1 && l[1].1 < l[2].1);
        let long = "x".repeat(60);
        let l = legend_layout(&[&long, &long, "y"], 700.0);
        assert_eq!(l.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [0, 1, 1]);
        assert_eq!(l[1].1, 0.0);
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(escape(r#"a<b & "c"'"#), "a&lt;b &amp; &quot;c&quot;&apos;");
        assert_eq!(escape("x\u{1}y"), "x y");
    }

    #[test]
    fn gaps_split_a_series_and_unplottable_points_are_skipped() {
        let c = Chart::new(
            "t",
            Axis::new("x", Scale::Linear),
            Axis::new("y", Scale::Log),
        )
        .series(Series::new(
            "s",
            vec![
                (0.0, 1.0),
                (1.0, 2.0),
                (2.0, f64::NAN),
                (3.0, 4.0),
                (4.0, 0.0),
            ],
        ));
        let svg = c.render();
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        assert!(svg.contains(r#"data-label="s""#));
    }
}

//! Human units on the command line, parsed once into whole numbers of a
//! base unit: durations (`500ms`, `1.5s`, `2m`) into milliseconds, sizes
//! (`64M`, `1G`, `512K`, `100B`) into bytes, counts (`64`) as they are, and
//! CPU quotas (`0.5`) into thousandths of a CPU.
//!
//! The rules, stated in `docs/jobs.md`:
//! - Sizes and durations need their unit. A bare `64` is refused rather
//!   than guessed: the API counts memory in MiB and time in milliseconds, a
//!   reader may think in bytes or seconds, and a wrong guess is silent.
//! - Units are case-insensitive (`64m` = `64M`, `1S` = `1s`). Sizes are
//!   binary: `K`, `M`, `G`, `T` are KiB, MiB, GiB, TiB, with an optional
//!   `B` or `iB` tail (`64MB` = `64MiB` = `64M`); `B` alone is bytes.
//! - Numbers are decimal and read exactly, never through floating point
//!   (`0.1s` is 100 ms; `1.0000001s` is refused as finer than a millisecond
//!   instead of being rounded somewhere).
//!
//! Errors say what is wrong with the text; the caller, who knows the flag
//! and the bounds of its value, names the flag and suggests a right form.

use std::fmt;

/// What a text measures: picks its units, its base unit and its words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Base unit: the millisecond.
    Duration,
    /// Base unit: the byte.
    Size,
    /// A whole number without unit.
    Count,
    /// A number of CPUs; base unit: the thousandth of a CPU.
    Cpus,
}

/// One unit: the name it is written with, other spellings accepted, and
/// how many base units it is.
#[derive(Debug)]
pub struct Unit {
    pub name: &'static str,
    spellings: &'static [&'static str],
    pub factor: u64,
}

const fn unit(name: &'static str, spellings: &'static [&'static str], factor: u64) -> Unit {
    Unit {
        name,
        spellings,
        factor,
    }
}

const DURATION_UNITS: &[Unit] = &[
    unit("ms", &[], 1),
    unit("s", &[], 1000),
    unit("m", &[], 60 * 1000),
    unit("h", &[], 60 * 60 * 1000),
];

const SIZE_UNITS: &[Unit] = &[
    unit("B", &[], 1),
    unit("K", &["KB", "KiB"], 1 << 10),
    unit("M", &["MB", "MiB"], 1 << 20),
    unit("G", &["GB", "GiB"], 1 << 30),
    unit("T", &["TB", "TiB"], 1 << 40),
];

impl Kind {
    /// The units a text of this kind may carry, smallest first.
    pub fn units(self) -> &'static [Unit] {
        match self {
            Kind::Duration => DURATION_UNITS,
            Kind::Size => SIZE_UNITS,
            Kind::Count | Kind::Cpus => &[],
        }
    }

    /// What a number without unit counts in base units, if it may stand
    /// alone.
    fn bare_factor(self) -> Option<u64> {
        match self {
            Kind::Duration | Kind::Size => None,
            Kind::Count => Some(1),
            Kind::Cpus => Some(1000),
        }
    }

    /// The unit a text is written in, from its suffix (any case).
    fn unit(self, suffix: &str) -> Option<&'static Unit> {
        self.units().iter().find(|u| {
            std::iter::once(&u.name)
                .chain(u.spellings)
                .any(|s| s.eq_ignore_ascii_case(suffix))
        })
    }

    /// The unit a mistyped suffix most likely meant: the longest unit name
    /// the suffix starts with (`sec` → `s`, `msec` → `ms`, `min` → `m`).
    fn likely_unit(self, suffix: &str) -> Option<&'static Unit> {
        let lower = suffix.to_ascii_lowercase();
        self.units()
            .iter()
            .filter(|u| lower.starts_with(&u.name.to_ascii_lowercase()))
            .max_by_key(|u| u.name.len())
    }

    /// Writes `base` base units in the largest unit that holds it exactly
    /// (`16M`, `15m`, `0.5` CPUs); what [`parse`] reads back to `base`.
    pub fn format(self, base: u64) -> String {
        match self {
            Kind::Count => base.to_string(),
            Kind::Cpus => {
                let (whole, frac) = (base / 1000, base % 1000);
                if frac == 0 {
                    whole.to_string()
                } else {
                    format!("{whole}.{}", format!("{frac:03}").trim_end_matches('0'))
                }
            }
            Kind::Duration | Kind::Size => {
                let u = self
                    .units()
                    .iter()
                    .rev()
                    .find(|u| base.is_multiple_of(u.factor))
                    .expect("the smallest unit is the base unit");
                format!("{}{}", base / u.factor, u.name)
            }
        }
    }

    /// The units' names for a message: `ms, s, m or h`.
    pub fn unit_list(self) -> String {
        let names: Vec<&str> = self.units().iter().map(|u| u.name).collect();
        match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            Some((last, _)) => (*last).to_owned(),
            None => String::new(),
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Duration => "duration",
            Kind::Size => "size",
            Kind::Count => "count",
            Kind::Cpus => "number of CPUs",
        }
    }

    fn base_noun(self) -> &'static str {
        match self {
            Kind::Duration => "a millisecond",
            Kind::Size => "a byte",
            Kind::Count => "one",
            Kind::Cpus => "a thousandth of a CPU",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.noun())
    }
}

/// Why a text is not a value of its kind. The messages complete "--flag
/// "TEXT": ...".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// The text does not start with a number (or is empty).
    #[error("not a {kind}")]
    NotANumber { kind: Kind },
    /// A minus sign: no limit is negative.
    #[error("a {kind} cannot be negative")]
    Negative { kind: Kind },
    /// A size or duration written without its unit.
    #[error("a {kind} needs a unit ({})", kind.unit_list())]
    NoUnit { kind: Kind },
    /// A suffix that is not one of the kind's units.
    #[error("{}", unknown_unit(*kind, unit))]
    UnknownUnit { kind: Kind, unit: String },
    /// A fraction of the base unit (`1.5ms`, `0.0001` CPUs, `2.5` pids).
    #[error("{}", finer(*kind))]
    Finer {
        kind: Kind,
        /// The value rounded up to whole base units, for a suggestion.
        rounded_up: u64,
    },
    /// More than any limit could be (past 2^64 base units).
    #[error("too large")]
    TooLarge { kind: Kind },
}

fn unknown_unit(kind: Kind, unit: &str) -> String {
    match kind {
        Kind::Count | Kind::Cpus => format!("a {kind} is a plain number, without {unit:?}"),
        Kind::Duration | Kind::Size => {
            format!("{unit:?} is not a unit of {kind} ({})", kind.unit_list())
        }
    }
}

fn finer(kind: Kind) -> String {
    match kind {
        Kind::Count => "not a whole number".to_owned(),
        _ => format!("finer than {}", kind.base_noun()),
    }
}

impl UnitError {
    /// The unit a mistyped suffix most likely meant, for a suggestion.
    pub fn likely_unit(&self) -> Option<&'static Unit> {
        match self {
            UnitError::UnknownUnit { kind, unit } => kind.likely_unit(unit),
            _ => None,
        }
    }
}

/// Parses a text of `kind` into whole base units.
pub fn parse(kind: Kind, text: &str) -> Result<u64, UnitError> {
    let t = text.trim();
    let (negative, body) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = (&body[..split], body[split..].trim_start());
    let number = Decimal::parse(number).ok_or(UnitError::NotANumber { kind })?;
    if negative {
        return Err(UnitError::Negative { kind });
    }
    let factor = if suffix.is_empty() {
        kind.bare_factor().ok_or(UnitError::NoUnit { kind })?
    } else {
        kind.unit(suffix)
            .ok_or_else(|| UnitError::UnknownUnit {
                kind,
                unit: suffix.to_owned(),
            })?
            .factor
    };
    number.times(kind, factor)
}

/// An exact decimal number: `whole.fraction`, the fraction's digits as an
/// integer over 10^`scale`.
struct Decimal {
    /// `None` past u128: more than any limit.
    whole: Option<u128>,
    fraction: u128,
    scale: u32,
    /// Non-zero digits past [`MAX_FRACTION_DIGITS`] were dropped.
    truncated: bool,
}

/// Fraction digits kept: 10^30 times the largest unit factor still fits a
/// u128, and no limit is finer than 10^-30 of its unit.
const MAX_FRACTION_DIGITS: usize = 30;

impl Decimal {
    /// `12`, `1.5`, `.5`, `5.`; no sign, exponent or separators.
    fn parse(s: &str) -> Option<Self> {
        let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !digits(fraction) {
            return None;
        }
        let fraction = fraction.trim_end_matches('0');
        let kept = &fraction[..fraction.len().min(MAX_FRACTION_DIGITS)];
        Some(Self {
            whole: whole.bytes().try_fold(0u128, |acc, b| {
                acc.checked_mul(10)?.checked_add(u128::from(b - b'0'))
            }),
            fraction: kept.parse().unwrap_or(0),
            scale: kept.len() as u32,
            truncated: kept.len() < fraction.len(),
        })
    }

    /// The number times `factor`, which must come out whole and fit a u64.
    fn times(&self, kind: Kind, factor: u64) -> Result<u64, UnitError> {
        let too_large = || UnitError::TooLarge { kind };
        let den = 10u128.pow(self.scale);
        let num = self.fraction * u128::from(factor);
        let base = self
            .whole
            .and_then(|w| w.checked_mul(u128::from(factor)))
            .and_then(|w| w.checked_add(num / den))
            .and_then(|b| u64::try_from(b).ok())
            .ok_or_else(too_large)?;
        if !num.is_multiple_of(den) || self.truncated {
            return Err(UnitError::Finer {
                kind,
                rounded_up: base.checked_add(1).ok_or_else(too_large)?,
            });
        }
        Ok(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit_of_any_case() {
        assert_eq!(parse(Kind::Duration, "500ms"), Ok(500));
        assert_eq!(parse(Kind::Duration, "1.5s"), Ok(1500));
        assert_eq!(parse(Kind::Duration, "2m"), Ok(120_000));
        assert_eq!(parse(Kind::Duration, "1h"), Ok(3_600_000));
        assert_eq!(parse(Kind::Duration, " 3 s "), Ok(3000));
        assert_eq!(parse(Kind::Duration, "1S"), Ok(1000));
        assert_eq!(parse(Kind::Duration, "500MS"), Ok(500));
        assert_eq!(
            parse(Kind::Duration, "2"),
            Err(UnitError::NoUnit {
                kind: Kind::Duration
            })
        );
    }

    #[test]
    fn sizes_need_a_unit_and_are_binary_in_any_spelling() {
        for s in [
            "64M", "64m", "64MB", "64mb", "64MiB", "64mib", "64 M", "0.0625G",
        ] {
            assert_eq!(parse(Kind::Size, s), Ok(64 << 20), "{s}");
        }
        assert_eq!(parse(Kind::Size, "512k"), Ok(512 << 10));
        assert_eq!(parse(Kind::Size, "1GiB"), Ok(1 << 30));
        assert_eq!(parse(Kind::Size, "100B"), Ok(100));
        assert_eq!(parse(Kind::Size, "100b"), Ok(100));
        assert_eq!(parse(Kind::Size, "1T"), Ok(1 << 40));
        assert_eq!(
            parse(Kind::Size, "64"),
            Err(UnitError::NoUnit { kind: Kind::Size })
        );
    }

    #[test]
    fn decimals_are_read_exactly() {
        assert_eq!(parse(Kind::Duration, "0.1s"), Ok(100));
        assert_eq!(parse(Kind::Duration, ".5s"), Ok(500));
        assert_eq!(parse(Kind::Duration, "5.s"), Ok(5000));
        assert_eq!(parse(Kind::Duration, "1.250000s"), Ok(1250));
        assert_eq!(parse(Kind::Size, "1.5K"), Ok(1536));
        assert_eq!(parse(Kind::Cpus, "0.333"), Ok(333));
        assert_eq!(parse(Kind::Cpus, "2"), Ok(2000));
        assert_eq!(parse(Kind::Count, "64"), Ok(64));
    }

    #[test]
    fn fractions_of_the_base_unit_are_refused_with_the_rounded_value() {
        assert_eq!(
            parse(Kind::Duration, "1.5ms"),
            Err(UnitError::Finer {
                kind: Kind::Duration,
                rounded_up: 2
            })
        );
        assert_eq!(
            parse(Kind::Duration, "1.0000001s"),
            Err(UnitError::Finer {
                kind: Kind::Duration,
                rounded_up: 1001
            })
        );
        assert_eq!(
            parse(Kind::Count, "2.5"),
            Err(UnitError::Finer {
                kind: Kind::Count,
                rounded_up: 3
            })
        );
        assert!(parse(Kind::Cpus, "0.0001").is_err());
        let long = format!("1.{}1s", "0".repeat(40));
        assert!(matches!(
            parse(Kind::Duration, &long),
            Err(UnitError::Finer { .. })
        ));
    }

    #[test]
    fn mistakes_are_told_apart() {
        let k = Kind::Size;
        assert_eq!(parse(k, ""), Err(UnitError::NotANumber { kind: k }));
        assert_eq!(parse(k, "lots"), Err(UnitError::NotANumber { kind: k }));
        assert_eq!(parse(k, "M"), Err(UnitError::NotANumber { kind: k }));
        assert_eq!(parse(k, "1.2.3M"), Err(UnitError::NotANumber { kind: k }));
        assert_eq!(parse(k, "-64M"), Err(UnitError::Negative { kind: k }));
        assert_eq!(parse(k, "-x"), Err(UnitError::NotANumber { kind: k }));
        assert_eq!(
            parse(k, "64X"),
            Err(UnitError::UnknownUnit {
                kind: k,
                unit: "X".into()
            })
        );
        assert_eq!(
            parse(Kind::Count, "1e3"),
            Err(UnitError::UnknownUnit {
                kind: Kind::Count,
                unit: "e3".into()
            })
        );
        assert_eq!(
            parse(k, "99999999999999999999999999999999999999999999G"),
            Err(UnitError::TooLarge { kind: k })
        );
        assert_eq!(
            parse(k, "17179869184G"),
            Err(UnitError::TooLarge { kind: k })
        );
    }

    #[test]
    fn a_mistyped_unit_points_to_the_likely_one() {
        let likely = |kind, s: &str| parse(kind, s).unwrap_err().likely_unit().map(|u| u.name);
        assert_eq!(likely(Kind::Duration, "10sec"), Some("s"));
        assert_eq!(likely(Kind::Duration, "10msec"), Some("ms"));
        assert_eq!(likely(Kind::Duration, "2min"), Some("m"));
        assert_eq!(likely(Kind::Duration, "2hours"), Some("h"));
        assert_eq!(likely(Kind::Size, "2Mbytes"), Some("M"));
        assert_eq!(likely(Kind::Duration, "2d"), None);
    }

    #[test]
    fn messages_say_what_is_wrong() {
        let msg = |kind, s: &str| parse(kind, s).unwrap_err().to_string();
        assert_eq!(
            msg(Kind::Size, "64"),
            "a size needs a unit (B, K, M, G or T)"
        );
        assert_eq!(
            msg(Kind::Duration, "2d"),
            "\"d\" is not a unit of duration (ms, s, m or h)"
        );
        assert_eq!(msg(Kind::Duration, "-1s"), "a duration cannot be negative");
        assert_eq!(msg(Kind::Duration, "1.5ms"), "finer than a millisecond");
        assert_eq!(msg(Kind::Count, "1.5"), "not a whole number");
        assert_eq!(msg(Kind::Cpus, "lots"), "not a number of CPUs");
    }

    #[test]
    fn formatting_picks_the_largest_exact_unit_and_reads_back() {
        assert_eq!(Kind::Size.format(16 << 30), "16G");
        assert_eq!(Kind::Size.format(16 << 20), "16M");
        assert_eq!(Kind::Size.format(1536), "1536B");
        assert_eq!(Kind::Size.format(1), "1B");
        assert_eq!(Kind::Duration.format(900_000), "15m");
        assert_eq!(Kind::Duration.format(10_000), "10s");
        assert_eq!(Kind::Duration.format(1), "1ms");
        assert_eq!(Kind::Cpus.format(10), "0.01");
        assert_eq!(Kind::Cpus.format(500), "0.5");
        assert_eq!(Kind::Cpus.format(64_000), "64");
        for kind in [Kind::Size, Kind::Duration, Kind::Count, Kind::Cpus] {
            for base in [1, 10, 999, 1000, 1024, 1536, 60_000, 1 << 20, 3 << 30] {
                assert_eq!(parse(kind, &kind.format(base)), Ok(base), "{kind} {base}");
            }
        }
    }
}

//! The limit flags of a job (`--timeout`, `--memory`, `--disk`,
//! `--output-limit`, `--pids`, `--cpus`). Each is read with the parser of
//! its kind of unit ([`crate::units`]) and checked against the API's bounds
//! ([`kiln_protocol::limits`]) here, where the flag is known: a mistake is
//! reported in the user's words (the flag, the text typed, and a form that
//! would be right), never as an API field the user did not type.

use kiln_protocol::limits;
use serde_json::{json, Value};

use crate::units::{self, Kind, UnitError};

/// One limit flag and the JobSpec field it sets.
#[derive(Debug)]
pub struct LimitFlag {
    /// The flag, without its `--`.
    pub flag: &'static str,
    /// The field under `limits`.
    pub field: &'static str,
    kind: Kind,
    /// Base units of `kind` per unit of the field (bytes per MiB, ...).
    scale: u64,
    /// The field's unit when it is coarser than the base unit, for messages.
    granularity: &'static str,
    /// The field's `(min, default, max)`.
    bounds: (u64, u64, u64),
}

pub const TIMEOUT: LimitFlag = LimitFlag {
    flag: "timeout",
    field: "timeout_ms",
    kind: Kind::Duration,
    scale: 1,
    granularity: "milliseconds",
    bounds: limits::TIMEOUT_MS,
};

pub const MEMORY: LimitFlag = LimitFlag {
    flag: "memory",
    field: "memory_mb",
    kind: Kind::Size,
    scale: 1 << 20,
    granularity: "MiB",
    bounds: limits::MEMORY_MB,
};

pub const DISK: LimitFlag = LimitFlag {
    flag: "disk",
    field: "disk_mb",
    kind: Kind::Size,
    scale: 1 << 20,
    granularity: "MiB",
    bounds: limits::DISK_MB,
};

pub const OUTPUT_LIMIT: LimitFlag = LimitFlag {
    flag: "output-limit",
    field: "output_bytes",
    kind: Kind::Size,
    scale: 1,
    granularity: "bytes",
    bounds: limits::OUTPUT_BYTES,
};

pub const PIDS: LimitFlag = LimitFlag {
    flag: "pids",
    field: "pids",
    kind: Kind::Count,
    scale: 1,
    granularity: "processes",
    bounds: limits::PIDS,
};

/// The field is a number of CPUs; its value here is in thousandths.
pub const CPUS: LimitFlag = LimitFlag {
    flag: "cpus",
    field: "cpus",
    kind: Kind::Cpus,
    scale: 1,
    granularity: "thousandths of a CPU",
    bounds: limits::CPU_MILLIS,
};

/// A limit flag whose text cannot be used, said in the flag's terms.
#[derive(Debug, thiserror::Error)]
#[error(
    "--{} {typed:?}: {problem}{advice} (allowed {} to {})",
    .flag.flag,
    .flag.written(.flag.bounds.0),
    .flag.written(.flag.bounds.2)
)]
pub struct LimitFlagError {
    flag: &'static LimitFlag,
    typed: String,
    problem: Problem,
    /// `; did you mean 64M?`, `; e.g. 256M`, or nothing.
    advice: String,
}

/// What is wrong with a limit flag's text.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// It is not a value of the flag's kind.
    #[error(transparent)]
    Unreadable(UnitError),
    /// A value below the API's minimum for the field.
    #[error("below the minimum")]
    BelowMinimum,
    /// A value above the API's maximum for the field.
    #[error("above the maximum")]
    AboveMaximum,
    /// A value between two units of a field that counts coarser than the
    /// parser (`64.5M` for a field in MiB).
    #[error("this limit is set in whole {granularity}")]
    Coarser { granularity: &'static str },
}

impl LimitFlag {
    /// Reads the flag's text into the field's value (in the field's unit;
    /// thousandths of a CPU for `--cpus`).
    pub fn parse(&'static self, typed: &str) -> Result<u64, LimitFlagError> {
        self.value(typed)
            .map_err(|problem| self.error(typed, problem))
    }

    /// The field's value as the API's JSON has it.
    pub fn json(&self, value: u64) -> Value {
        match self.kind {
            Kind::Cpus => json!(value as f64 / 1000.0),
            _ => json!(value),
        }
    }

    fn value(&self, typed: &str) -> Result<u64, Problem> {
        let base = units::parse(self.kind, typed).map_err(Problem::Unreadable)?;
        if !base.is_multiple_of(self.scale) {
            return Err(Problem::Coarser {
                granularity: self.granularity,
            });
        }
        let v = base / self.scale;
        let (min, _, max) = self.bounds;
        if v < min {
            Err(Problem::BelowMinimum)
        } else if v > max {
            Err(Problem::AboveMaximum)
        } else {
            Ok(v)
        }
    }

    /// A field value written as the flag takes it (`16M`, `15m`, `0.01`).
    fn written(&self, v: u64) -> String {
        self.kind.format(v * self.scale)
    }

    fn error(&'static self, typed: &str, problem: Problem) -> LimitFlagError {
        let default = self.bounds.1;
        let advice = match self.suggestions(typed, &problem) {
            Some(s) if s.is_empty() => format!("; e.g. {}", self.written(default)),
            Some(s) => format!("; did you mean {}?", either(&s)),
            None => String::new(),
        };
        LimitFlagError {
            flag: self,
            typed: typed.to_owned(),
            problem,
            advice,
        }
    }

    /// Right forms close to what was typed; an empty list asks for an
    /// example instead, `None` for no advice (the range says it all).
    fn suggestions(&self, typed: &str, problem: &Problem) -> Option<Vec<String>> {
        let number = leading_number(typed);
        let candidates: Vec<String> = match problem {
            Problem::BelowMinimum | Problem::AboveMaximum => return None,
            Problem::Unreadable(UnitError::TooLarge { .. }) => return None,
            Problem::Unreadable(UnitError::NotANumber { .. }) => Vec::new(),
            Problem::Unreadable(UnitError::Negative { .. }) => {
                vec![typed.trim().trim_start_matches('-').to_owned()]
            }
            Problem::Unreadable(e @ UnitError::UnknownUnit { .. }) => match e.likely_unit() {
                Some(u) => vec![format!("{number}{}", u.name)],
                None => self.with_each_unit(number),
            },
            Problem::Unreadable(UnitError::NoUnit { .. }) => self.with_each_unit(number),
            Problem::Unreadable(UnitError::Finer { rounded_up, .. }) => {
                let base = [rounded_up - 1, *rounded_up];
                base.iter().map(|b| self.kind.format(*b)).collect()
            }
            Problem::Coarser { .. } => {
                let below = units::parse(self.kind, typed).unwrap_or(0) / self.scale;
                vec![self.written(below), self.written(below + 1)]
            }
        };
        Some(
            candidates
                .into_iter()
                .filter(|c| self.value(c).is_ok())
                .collect(),
        )
    }

    /// `number` with each unit of the flag's kind.
    fn with_each_unit(&self, number: &str) -> Vec<String> {
        self.kind
            .units()
            .iter()
            .map(|u| format!("{number}{}", u.name))
            .collect()
    }
}

/// The number a text starts with (`64` of `64sec`).
fn leading_number(typed: &str) -> &str {
    let t = typed.trim();
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    &t[..end]
}

/// `a`, `a or b`, `a, b or c`.
fn either(items: &[String]) -> String {
    match items.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        Some((last, _)) => last.clone(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(f: &'static LimitFlag, typed: &str) -> String {
        f.parse(typed).unwrap_err().to_string()
    }

    #[test]
    fn right_values_become_the_fields_units() {
        assert_eq!(TIMEOUT.parse("1.5s").unwrap(), 1500);
        assert_eq!(MEMORY.parse("1G").unwrap(), 1024);
        assert_eq!(MEMORY.parse("64m").unwrap(), 64);
        assert_eq!(DISK.parse("16M").unwrap(), 16);
        assert_eq!(OUTPUT_LIMIT.parse("100B").unwrap(), 100);
        assert_eq!(PIDS.parse("32").unwrap(), 32);
        assert_eq!(CPUS.parse("0.5").unwrap(), 500);
        assert_eq!(CPUS.json(500), json!(0.5));
        assert_eq!(MEMORY.json(64), json!(64));
    }

    #[test]
    fn a_bare_number_suggests_the_units_that_would_fit() {
        assert_eq!(
            msg(&MEMORY, "64"),
            "--memory \"64\": a size needs a unit (B, K, M, G or T); did you mean 64M? (allowed 16M to 16G)"
        );
        assert_eq!(
            msg(&TIMEOUT, "500"),
            "--timeout \"500\": a duration needs a unit (ms, s, m or h); did you mean 500ms or 500s? (allowed 1ms to 15m)"
        );
        assert!(msg(&MEMORY, "1").contains("did you mean 1G?"));
        assert!(msg(&OUTPUT_LIMIT, "4096").contains("did you mean 4096B or 4096K?"));
        // No unit makes 0 a disk size: an example instead.
        assert!(msg(&DISK, "0").contains("; e.g. 64M"));
    }

    #[test]
    fn zero_and_out_of_range_values_name_the_range_in_the_flags_units() {
        assert_eq!(
            msg(&TIMEOUT, "0s"),
            "--timeout \"0s\": below the minimum (allowed 1ms to 15m)"
        );
        assert_eq!(
            msg(&MEMORY, "1M"),
            "--memory \"1M\": below the minimum (allowed 16M to 16G)"
        );
        assert_eq!(
            msg(&MEMORY, "64G"),
            "--memory \"64G\": above the maximum (allowed 16M to 16G)"
        );
        assert_eq!(
            msg(&TIMEOUT, "10h"),
            "--timeout \"10h\": above the maximum (allowed 1ms to 15m)"
        );
        assert!(msg(&PIDS, "0").contains("(allowed 4 to 4096)"));
        assert!(msg(&CPUS, "0").contains("(allowed 0.01 to 64)"));
        assert!(msg(&OUTPUT_LIMIT, "0B").contains("(allowed 1B to 64M)"));
        assert_eq!(
            msg(&MEMORY, "99999999999999999999999999999999999999999999G"),
            "--memory \"99999999999999999999999999999999999999999999G\": too large (allowed 16M to 16G)"
        );
    }

    #[test]
    fn negative_numbers_suggest_their_magnitude() {
        assert_eq!(
            msg(&MEMORY, "-64M"),
            "--memory \"-64M\": a size cannot be negative; did you mean 64M? (allowed 16M to 16G)"
        );
        assert!(msg(&PIDS, "-1").contains("cannot be negative; e.g. 64"));
        assert!(msg(&CPUS, "-2").contains("did you mean 2?"));
    }

    #[test]
    fn mistyped_units_suggest_the_likely_one() {
        assert_eq!(
            msg(&TIMEOUT, "10sec"),
            "--timeout \"10sec\": \"sec\" is not a unit of duration (ms, s, m or h); did you mean 10s? (allowed 1ms to 15m)"
        );
        assert!(msg(&MEMORY, "64X").contains("did you mean 64M?"));
        assert!(msg(&TIMEOUT, "2min").contains("did you mean 2m?"));
        assert_eq!(
            msg(&PIDS, "10k"),
            "--pids \"10k\": a count is a plain number, without \"k\"; e.g. 64 (allowed 4 to 4096)"
        );
        assert!(msg(&CPUS, "500m").contains("a number of CPUs is a plain number"));
    }

    #[test]
    fn words_are_refused_with_an_example() {
        assert_eq!(
            msg(&TIMEOUT, "soon"),
            "--timeout \"soon\": not a duration; e.g. 10s (allowed 1ms to 15m)"
        );
        assert!(msg(&MEMORY, "").contains("not a size; e.g. 256M"));
        assert!(msg(&CPUS, "NaN").contains("not a number of CPUs; e.g. 1"));
        assert!(msg(&CPUS, "inf").contains("not a number of CPUs"));
    }

    #[test]
    fn values_finer_than_the_field_suggest_the_neighbours() {
        assert_eq!(
            msg(&MEMORY, "64.5M"),
            "--memory \"64.5M\": this limit is set in whole MiB; did you mean 64M or 65M? (allowed 16M to 16G)"
        );
        assert!(
            msg(&TIMEOUT, "1.5ms").contains("finer than a millisecond; did you mean 1ms or 2ms?")
        );
        assert!(msg(&PIDS, "4.5").contains("not a whole number; did you mean 4 or 5?"));
        // Neither neighbour is allowed: an example.
        assert!(msg(&CPUS, "0.0001").contains("finer than a thousandth of a CPU; e.g. 1"));
        assert!(msg(&MEMORY, "100K").contains("whole MiB; e.g. 256M"));
    }
}

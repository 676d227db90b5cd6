//! The host's side of Kiln's Firecracker test guest: where the built ELF is
//! (`build.rs` compiles `guest/main.rs` into `$OUT_DIR`), the memory pattern
//! both sides compute, and the guest's line protocol as typed commands and
//! replies. See `README.md` for the guest itself.

use std::path::Path;

pub mod pattern;

/// The test guest's ELF, built with this crate (on x86-64 hosts only).
pub fn elf() -> &'static Path {
    let path = env!("KILN_TEST_GUEST_ELF");
    assert!(
        !path.is_empty(),
        "the Firecracker test guest is x86-64 only and was not built for this target"
    );
    Path::new(path)
}

/// The line the guest prints once it is ready for commands.
pub const READY: &str = "kiln-test-guest ready";

/// A command of the guest's line protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Answered with the same text.
    Echo(String),
    /// Write `pages` pattern pages for `seed`.
    Write { seed: u64, pages: u64 },
    /// Read `pages` pattern pages back and compare them with `seed`'s.
    Check { seed: u64, pages: u64 },
    /// The guest's timer ticks (100 Hz) so far.
    Count,
    /// The end of RAM as Firecracker described it to the guest.
    Mem,
    /// Processors in Firecracker's MP table.
    Cpus,
}

impl Command {
    /// The line to send (without the newline).
    pub fn line(&self) -> String {
        match self {
            Command::Echo(text) => format!("echo {text}"),
            Command::Write { seed, pages } => format!("write {seed} {pages}"),
            Command::Check { seed, pages } => format!("check {seed} {pages}"),
            Command::Count => "count".into(),
            Command::Mem => "mem".into(),
            Command::Cpus => "cpus".into(),
        }
    }
}

/// What `check` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckReport {
    /// Pages whose every pattern word matched.
    pub ok: u64,
    /// Pages with at least one word wrong.
    pub bad: u64,
    /// Wrapping sum of the words read.
    pub sum: u64,
}

/// A guest line that is not the reply the command expects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the test guest answered {line:?} where a `{expected}` reply was expected")]
pub struct ReplyError {
    /// The reply's keyword.
    pub expected: &'static str,
    /// What the guest said.
    pub line: String,
}

fn fields<'a>(line: &'a str, keyword: &'static str) -> Result<Vec<&'a str>, ReplyError> {
    let mut words = line.split_whitespace();
    if words.next() != Some(keyword) {
        return Err(ReplyError {
            expected: keyword,
            line: line.to_owned(),
        });
    }
    Ok(words.collect())
}

fn number(line: &str, keyword: &'static str) -> Result<u64, ReplyError> {
    let bad = || ReplyError {
        expected: keyword,
        line: line.to_owned(),
    };
    match fields(line, keyword)?.as_slice() {
        [n] => n.parse().map_err(|_| bad()),
        _ => Err(bad()),
    }
}

/// `count TICKS` -> TICKS.
pub fn parse_count(line: &str) -> Result<u64, ReplyError> {
    number(line, "count")
}

/// `mem BYTES` -> BYTES.
pub fn parse_mem(line: &str) -> Result<u64, ReplyError> {
    number(line, "mem")
}

/// `cpus N` -> N.
pub fn parse_cpus(line: &str) -> Result<u64, ReplyError> {
    number(line, "cpus")
}

/// `wrote PAGES SUM` -> (PAGES, SUM).
pub fn parse_wrote(line: &str) -> Result<(u64, u64), ReplyError> {
    let bad = || ReplyError {
        expected: "wrote",
        line: line.to_owned(),
    };
    match fields(line, "wrote")?.as_slice() {
        [pages, sum] => Ok((
            pages.parse().map_err(|_| bad())?,
            u64::from_str_radix(sum, 16).map_err(|_| bad())?,
        )),
        _ => Err(bad()),
    }
}

/// `check ok=N bad=M sum=SUM` -> the report.
pub fn parse_check(line: &str) -> Result<CheckReport, ReplyError> {
    let bad = || ReplyError {
        expected: "check",
        line: line.to_owned(),
    };
    let f = fields(line, "check")?;
    let value = |key: &str| -> Option<&str> { f.iter().find_map(|w| w.strip_prefix(key)) };
    Ok(CheckReport {
        ok: value("ok=").and_then(|v| v.parse().ok()).ok_or_else(bad)?,
        bad: value("bad=").and_then(|v| v.parse().ok()).ok_or_else(bad)?,
        sum: value("sum=")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .ok_or_else(bad)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_elf_was_built() {
        let bytes = std::fs::read(elf()).expect("the test guest ELF");
        assert_eq!(&bytes[..4], b"\x7fELF");
        assert_eq!(bytes[4], 2, "ELF64");
        // e_entry: Firecracker's loader wants it at or above 1 MiB.
        let entry = u64::from_le_bytes(bytes[24..32].try_into().unwrap());
        assert_eq!(entry, 16 << 20);
    }

    #[test]
    fn replies_parse_and_wrong_ones_name_what_was_expected() {
        assert_eq!(parse_count("count 42"), Ok(42));
        assert_eq!(parse_mem("mem 134217728"), Ok(128 << 20));
        assert_eq!(parse_wrote("wrote 3 00000000000000ff"), Ok((3, 255)));
        assert_eq!(
            parse_check("check ok=2 bad=1 sum=10"),
            Ok(CheckReport {
                ok: 2,
                bad: 1,
                sum: 16
            })
        );
        let e = parse_count("error: unknown command").unwrap_err();
        assert_eq!(e.expected, "count");
        assert!(e.to_string().contains("error: unknown command"));
        assert!(parse_check("check ok=2").is_err());
    }

    #[test]
    fn commands_render_as_the_guest_reads_them() {
        assert_eq!(Command::Write { seed: 7, pages: 9 }.line(), "write 7 9");
        assert_eq!(Command::Echo("a b".into()).line(), "echo a b");
    }

    #[test]
    fn the_checksum_sums_every_pattern_word() {
        let by_hand = (0..3)
            .flat_map(|p| (0..pattern::WORDS_PER_PAGE).map(move |i| pattern::word(5, p, i)))
            .fold(0u64, u64::wrapping_add);
        assert_eq!(pattern::checksum(5, 3), by_hand);
        assert_ne!(pattern::word(5, 0, 0), pattern::word(6, 0, 0));
        assert_ne!(pattern::word(5, 0, 0), pattern::word(5, 1, 0));
    }
}

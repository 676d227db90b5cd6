//! Human units on the command line: durations (`1.5s`, `500ms`, `2m`) and
//! sizes (`64M`, `1G`, `512k`, bytes without suffix), parsed once into
//! milliseconds and bytes with errors that say what is accepted.

/// Parses a duration into milliseconds; a bare number means seconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        (s, 1000.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; use e.g. 500ms, 1.5s, 2m"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} is not a positive duration"));
    }
    Ok((v * mult).round() as u64)
}

/// Parses a size into bytes: `k`/`K`, `m`/`M`, `g`/`G` are binary (KiB,
/// MiB, GiB), an optional trailing `B`/`iB` is accepted.
pub fn parse_size_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size; use e.g. 64M, 1G, 512k"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} is not a positive size"));
    }
    Ok((v * mult as f64).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("500ms").unwrap(), 500);
        assert_eq!(parse_duration_ms("1.5s").unwrap(), 1500);
        assert_eq!(parse_duration_ms("2").unwrap(), 2000);
        assert_eq!(parse_duration_ms("2m").unwrap(), 120_000);
        assert!(parse_duration_ms("soon").unwrap_err().contains("soon"));
        assert!(parse_duration_ms("-1s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_bytes("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size_bytes("512k").unwrap(), 512 << 10);
        assert_eq!(parse_size_bytes("100").unwrap(), 100);
        assert!(parse_size_bytes("lots").is_err());
    }
}

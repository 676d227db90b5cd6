//! The server process as `/proc` sees it: its own CPU time (all threads,
//! children excluded) and the memory of it and of its descendants (the
//! sandboxes it created), for `--server-pid`.

use std::collections::HashMap;
use std::fs;

/// utime + stime of `pid` in clock ticks (fields 14 and 15 of
/// `/proc/<pid>/stat`, see proc(5)); children's times are fields 16 and 17
/// and are not included.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f = fields_after_comm(&stat)?;
    // After the comm field, field 3 (state) is index 0, so field N is N - 3.
    let utime: u64 = f.get(14 - 3)?.parse().ok()?;
    let stime: u64 = f.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_s() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// The fields after `(comm)`, which may itself contain spaces and parens.
fn fields_after_comm(stat: &str) -> Option<Vec<&str>> {
    let close = stat.rfind(')')?;
    Some(stat[close + 1..].split_whitespace().collect())
}

fn ppid(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    fields_after_comm(&stat)?.get(1)?.parse().ok()
}

/// A `kB` figure from a `/proc` key-value file.
fn kib(path: &str, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// VmRSS of `pid`, KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    kib(&format!("/proc/{pid}/status"), "VmRSS")
}

/// Proportional set size of `pid` (shared pages divided among their
/// users), KiB.
pub fn pss_kib(pid: i32) -> Option<u64> {
    kib(&format!("/proc/{pid}/smaps_rollup"), "Pss")
}

/// `pid` and all its descendants.
pub fn tree(pid: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(pp) = ppid(p) {
                children.entry(pp).or_default().push(p);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        if let Some(c) = children.get(&parent) {
            out.extend(c.iter().copied().filter(|p| *p != parent));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_is_readable() {
        let me = std::process::id() as i32;
        assert!(cpu_ticks(me).is_some());
        assert!(rss_kib(me).unwrap() > 0);
        assert!(tree(me).contains(&me));
    }

    #[test]
    fn comm_with_parens_and_spaces_parses() {
        let f = fields_after_comm("12 (a) b (c) S 1 2 3").unwrap();
        assert_eq!(f, ["S", "1", "2", "3"]);
    }
}

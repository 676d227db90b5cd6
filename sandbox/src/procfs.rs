//! What the host's `/proc` (and `statvfs`) tell about a sandbox's
//! processes: identity beyond pid reuse for the crash records, CPU time,
//! network counters of a process's network namespace and the use of a
//! filesystem seen through a process's root. Shared by the backends' live
//! figures.

use std::ffi::CString;
use std::fs;

/// Start time of `pid` in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`), or `None` if no such process exists.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after the last ')' are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Clock ticks per second of `/proc` times.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as u64
}

/// CPU time of processes from `/proc/<pid>/stat`, in microseconds: each
/// one's own time, plus, with `children`, that of its waited-for children
/// (an init that reaps every job keeps finished jobs counted that way).
pub(crate) fn cpu_us(pids: &[i32], children: bool) -> u64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|s| stat_ticks(&s, children))
        .sum();
    ticks * 1_000_000 / clock_ticks()
}

/// `utime + stime` (fields 14 and 15), plus `cutime + cstime` (16 and 17)
/// with `children`, of one `/proc/<pid>/stat` line (the command name in
/// parentheses may contain spaces).
fn stat_ticks(stat: &str, children: bool) -> u64 {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    rest.split_whitespace()
        .skip(11)
        .take(if children { 4 } else { 2 })
        .filter_map(|f| f.parse::<i64>().ok())
        .map(|t| t.max(0) as u64)
        .sum()
}

/// Resident memory of a process (`VmRSS`), in bytes.
pub(crate) fn rss_bytes(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// Used and total bytes of the filesystem at `path`.
pub(crate) fn disk_usage(path: &str) -> Option<(u64, u64)> {
    let path = CString::new(path).ok()?;
    // SAFETY: statvfs is plain data, valid when zeroed.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs fills the struct from a valid C path.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    let total = st.f_blocks as u64 * frsize;
    let free = st.f_bfree as u64 * frsize;
    Some((total.saturating_sub(free), total))
}

/// Received and sent bytes over every interface of `pid`'s network
/// namespace.
pub(crate) fn net_bytes(pid: i32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    Some(parse_net_dev(&text))
}

/// What a microVM received and sent through its tap `dev`, from the
/// table of the namespace process `pid` is in (its VMM's, the host side):
/// what the tap transmits the guest receives, and the other way round.
pub(crate) fn tap_bytes(pid: i32, dev: &str) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    parse_tap(&text, dev)
}

fn parse_tap(text: &str, dev: &str) -> Option<(u64, u64)> {
    let line = text.lines().skip(2).find(|l| {
        l.split_once(':')
            .is_some_and(|(name, _)| name.trim() == dev)
    })?;
    let (rx, tx) = parse_net_dev(&format!("\n\n{line}"));
    Some((tx, rx))
}

/// Sums received and transmitted bytes over every interface of a
/// `/proc/net/dev` table (two header lines, then `name: rx_bytes ... tx_bytes ...`).
fn parse_net_dev(text: &str) -> (u64, u64) {
    let mut rx = 0u64;
    let mut tx = 0u64;
    for line in text.lines().skip(2) {
        let Some((_, rest)) = line.split_once(':') else {
            continue;
        };
        let f: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if f.len() >= 9 {
            rx = rx.saturating_add(f[0]);
            tx = tx.saturating_add(f[8]);
        }
    }
    (rx, tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_start_time_is_known_and_stable() {
        let me = std::process::id();
        let t = start_time(me).expect("our own stat");
        assert_eq!(start_time(me), Some(t));
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn stat_times_are_summed_past_a_command_with_spaces() {
        let stat = "42 (my prog) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 5 1 20 0 1 0 100 0 0";
        assert_eq!(stat_ticks(stat, true), 7 + 3 + 5 + 1);
        assert_eq!(stat_ticks(stat, false), 7 + 3);
    }

    #[test]
    fn net_dev_is_summed_over_interfaces() {
        let t = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0\n  eth0:      50       1    0    0    0     0          0         0       7       1    0    0    0     0       0          0\n";
        assert_eq!(parse_net_dev(t), (150, 107));
        // A tap's counters are the guest's the other way round.
        assert_eq!(parse_tap(t, "eth0"), Some((7, 50)));
        assert_eq!(parse_tap(t, "kn1"), None);
    }

    #[test]
    fn our_own_resident_memory_and_root_filesystem_are_readable() {
        assert!(rss_bytes(std::process::id() as i32).unwrap() > 0);
        let (used, total) = disk_usage("/").unwrap();
        assert!(total > 0 && used <= total);
    }
}

//! Live figures of a sandbox for the metrics stream: CPU, memory and pids
//! from the backend's stats (a jail's cgroup), disk use of its work
//! directory (statvfs through `/proc/<holder>/root`, which reaches into the
//! mount namespace of the jail's current room) and network counters of the
//! room's own network namespace (`/proc/<holder>/net/dev`).

use std::ffi::CString;

use kiln_sandbox::{AnySandbox, Sandbox};
use serde::Serialize;

/// One sample.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LiveSample {
    /// Unix time of the sample, in seconds.
    pub ts: f64,
    /// CPU time used since the sandbox started, in microseconds.
    pub cpu_usage_us: Option<u64>,
    pub memory_bytes: u64,
    pub memory_peak_bytes: Option<u64>,
    pub pids: u64,
    pub oom_kills: u64,
    /// Used and total bytes of the work directory (`/work`).
    pub disk_used_bytes: Option<u64>,
    pub disk_total_bytes: Option<u64>,
    /// Summed over the sandbox's interfaces (only loopback without network).
    pub net_rx_bytes: Option<u64>,
    pub net_tx_bytes: Option<u64>,
}

/// Samples `sandbox` now. Disk and network are read through the holder of
/// the jail's room; a microVM's are not visible from the host (`null`).
pub fn sample(sandbox: &AnySandbox) -> LiveSample {
    let s = sandbox.stats();
    let (pid, cpu_usage_us) = match sandbox {
        AnySandbox::Jail(j) => {
            // One read of the group's processes serves both the room's
            // holder and, without cpuacct, the CPU time.
            let procs = j.cgroup().map(|cg| cg.procs());
            (
                j.room_pid_among(procs.as_deref().unwrap_or_default())
                    .unwrap_or(0),
                s.cpu_usage_us.or_else(|| procs.as_deref().map(proc_cpu_us)),
            )
        }
        AnySandbox::Qemu(_) => (0, s.cpu_usage_us),
    };
    let (disk_used_bytes, disk_total_bytes) = match disk(pid) {
        Some((u, t)) => (Some(u), Some(t)),
        None => (None, None),
    };
    let (net_rx_bytes, net_tx_bytes) = match net(pid) {
        Some((r, t)) => (Some(r), Some(t)),
        None => (None, None),
    };
    LiveSample {
        ts: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default(),
        cpu_usage_us,
        memory_bytes: s.memory_bytes,
        memory_peak_bytes: s.memory_peak_bytes,
        pids: s.pids,
        oom_kills: s.oom_kills,
        disk_used_bytes,
        disk_total_bytes,
        net_rx_bytes,
        net_tx_bytes,
    }
}

/// CPU time of a group's processes from `/proc/<pid>/stat`, for hosts whose
/// cgroup v1 `cpuacct` is not where the jail's group is: each process's own
/// time plus that of its waited-for children. The agent is init and reaps
/// every job, so finished jobs stay counted in its children's time.
fn proc_cpu_us(pids: &[i32]) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks: u64 = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|s| stat_ticks(&s))
        .sum();
    ticks * 1_000_000 / hz
}

/// `utime + stime + cutime + cstime` of one `/proc/<pid>/stat` line (fields
/// 14 to 17; the command name in parentheses may contain spaces).
fn stat_ticks(stat: &str) -> u64 {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    rest.split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|f| f.parse::<i64>().ok())
        .map(|t| t.max(0) as u64)
        .sum()
}

fn disk(pid: i32) -> Option<(u64, u64)> {
    if pid <= 0 {
        return None;
    }
    let path = CString::new(format!("/proc/{pid}/root/work")).ok()?;
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

fn net(pid: i32) -> Option<(u64, u64)> {
    if pid <= 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    Some(parse_net_dev(&text))
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
    fn stat_times_are_summed_past_a_command_with_spaces() {
        let stat = "42 (my prog) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 5 1 20 0 1 0 100 0 0";
        assert_eq!(stat_ticks(stat), 7 + 3 + 5 + 1);
    }

    #[test]
    fn net_dev_is_summed_over_interfaces() {
        let t = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0\n  eth0:      50       1    0    0    0     0          0         0       7       1    0    0    0     0       0          0\n";
        assert_eq!(parse_net_dev(t), (150, 107));
    }
}

//! Live figures of a sandbox for the metrics stream, as its backend reports
//! them (`Sandbox::stats`), with the time of the sample.

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
    /// Summed over the sandbox's interfaces (a jail's: only loopback without
    /// network); a microVM's tap (none without network).
    pub net_rx_bytes: Option<u64>,
    pub net_tx_bytes: Option<u64>,
    /// The bandwidth limit in force each way, Mbit/s (0: none); absent
    /// for a sandbox without a network of Kiln's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net_rate_mbit: Option<u32>,
    /// Exits of the guest's vCPUs to the VMM (Firecracker; as of the
    /// VMM's latest metrics line, written every 60 s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm_exits: Option<u64>,
}

/// Samples `sandbox` now: what its backend can see (a jail's cgroup and
/// room; a microVM's VMM process and its tap, whose guest disk is not
/// visible from the host, `null`, and whose network is `null` when it has
/// none).
pub fn sample(sandbox: &AnySandbox) -> LiveSample {
    let s = sandbox.stats();
    LiveSample {
        ts: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default(),
        cpu_usage_us: s.cpu_usage_us,
        memory_bytes: s.memory_bytes,
        memory_peak_bytes: s.memory_peak_bytes,
        pids: s.pids,
        oom_kills: s.oom_kills,
        disk_used_bytes: s.disk_used_bytes,
        disk_total_bytes: s.disk_total_bytes,
        net_rx_bytes: s.net_rx_bytes,
        net_tx_bytes: s.net_tx_bytes,
        net_rate_mbit: sandbox.network_info().map(|n| n.rate_mbit),
        vmm_exits: s.vmm_exits,
    }
}

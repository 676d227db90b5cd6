//! Firecracker's own metrics. Once given a path (`PUT /metrics`),
//! Firecracker appends one JSON object per line to it: at that call, every
//! 60 seconds, and on each `FlushMetrics` action. Counters (Firecracker's
//! `SharedIncMetric`) hold what happened *since the previous line*; gauges
//! and latencies (`SharedStoreMetric`) hold the latest value. This module
//! parses the lines and adds them up into the figures Kiln exposes per VM:
//! vCPU exits to the VMM, serial traffic, snapshot latencies, faults and
//! signals (names and meanings from `src/vmm/src/logger/metrics.rs`).

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Longest metrics line accepted (a full line is about 6 KiB).
const MAX_LINE: usize = 1 << 20;

/// Why reading the metrics file failed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The file could not be opened or read.
    #[error("cannot read Firecracker's metrics file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line is not Firecracker's metrics JSON.
    #[error("line {line} of Firecracker's metrics file {path} is not its metrics JSON: {source}")]
    Parse {
        path: PathBuf,
        line: u64,
        #[source]
        source: serde_json::Error,
    },
    /// A line grew past the limit without ending.
    #[error("Firecracker's metrics file {path} has a line longer than {MAX_LINE} bytes")]
    Overlong { path: PathBuf },
}

/// One metrics line, reduced to what Kiln reads. Every field defaults, so
/// lines of other Firecracker versions (fewer or more groups) still parse.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct MetricsLine {
    pub utc_timestamp_ms: u64,
    pub vcpu: VcpuLine,
    pub uart: UartLine,
    pub latencies_us: LatenciesLine,
    pub vmm: VmmLine,
    pub seccomp: SeccompLine,
    pub signals: SignalsLine,
}

/// `vcpu`: exits handled by the VMM in user space, per interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct VcpuLine {
    pub exit_io_in: u64,
    pub exit_io_out: u64,
    pub exit_mmio_read: u64,
    pub exit_mmio_write: u64,
    pub failures: u64,
}

/// `uart`: the serial console, per interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct UartLine {
    pub read_count: u64,
    pub write_count: u64,
    pub missed_read_count: u64,
    pub missed_write_count: u64,
    pub error_count: u64,
}

/// `latencies_us`: the latest duration of each operation, microseconds
/// (`vmm_*`: the part inside the VMM thread).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct LatenciesLine {
    pub full_create_snapshot: u64,
    pub diff_create_snapshot: u64,
    pub load_snapshot: u64,
    pub pause_vm: u64,
    pub resume_vm: u64,
    pub vmm_full_create_snapshot: u64,
    pub vmm_load_snapshot: u64,
    pub vmm_pause_vm: u64,
    pub vmm_resume_vm: u64,
}

/// `vmm`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct VmmLine {
    pub panic_count: u64,
}

/// `seccomp`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct SeccompLine {
    pub num_faults: u64,
}

/// `signals`: how many of each fatal signal the VMM caught.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct SignalsLine {
    pub sigbus: u64,
    pub sigsegv: u64,
    pub sigxfsz: u64,
    pub sigxcpu: u64,
    pub sigpipe: u64,
    pub sighup: u64,
    pub sigill: u64,
}

/// Parses one metrics line.
pub fn parse_line(line: &str) -> Result<MetricsLine, serde_json::Error> {
    serde_json::from_str(line)
}

/// A VM's metrics summed over every line read so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmmMetrics {
    /// Lines read.
    pub lines: u64,
    /// Time of the latest line, milliseconds since the Unix epoch.
    pub utc_timestamp_ms: u64,
    /// Exits to the VMM since it started (the sum of every line).
    pub vcpu: VcpuLine,
    /// Serial traffic since the VMM started.
    pub uart: UartLine,
    /// The latest latency of each operation.
    pub latencies_us: LatenciesLine,
    /// Panics, seccomp faults and fatal signals (latest values).
    pub vmm: VmmLine,
    pub seccomp: SeccompLine,
    pub signals: SignalsLine,
}

impl VmmMetrics {
    /// Folds one line in: counters add up, gauges take the line's value
    /// when it has one (a zero latency means "not measured in this
    /// interval", so the previous value stays).
    pub fn add(&mut self, line: &MetricsLine) {
        self.lines += 1;
        self.utc_timestamp_ms = line.utc_timestamp_ms;
        let v = &line.vcpu;
        self.vcpu.exit_io_in += v.exit_io_in;
        self.vcpu.exit_io_out += v.exit_io_out;
        self.vcpu.exit_mmio_read += v.exit_mmio_read;
        self.vcpu.exit_mmio_write += v.exit_mmio_write;
        self.vcpu.failures += v.failures;
        let u = &line.uart;
        self.uart.read_count += u.read_count;
        self.uart.write_count += u.write_count;
        self.uart.missed_read_count += u.missed_read_count;
        self.uart.missed_write_count += u.missed_write_count;
        self.uart.error_count += u.error_count;
        let (l, mine) = (&line.latencies_us, &mut self.latencies_us);
        for (theirs, ours) in [
            (l.full_create_snapshot, &mut mine.full_create_snapshot),
            (l.diff_create_snapshot, &mut mine.diff_create_snapshot),
            (l.load_snapshot, &mut mine.load_snapshot),
            (l.pause_vm, &mut mine.pause_vm),
            (l.resume_vm, &mut mine.resume_vm),
            (
                l.vmm_full_create_snapshot,
                &mut mine.vmm_full_create_snapshot,
            ),
            (l.vmm_load_snapshot, &mut mine.vmm_load_snapshot),
            (l.vmm_pause_vm, &mut mine.vmm_pause_vm),
            (l.vmm_resume_vm, &mut mine.vmm_resume_vm),
        ] {
            if theirs != 0 {
                *ours = theirs;
            }
        }
        self.vmm = line.vmm;
        self.seccomp = line.seccomp;
        // `sigpipe` is a counter, the others are set once when caught.
        let sigpipe = self.signals.sigpipe + line.signals.sigpipe;
        self.signals = SignalsLine {
            sigpipe,
            ..line.signals
        };
    }
}

/// Reads a metrics file as Firecracker appends to it, line by line.
#[derive(Debug)]
pub struct MetricsReader {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    totals: VmmMetrics,
}

impl MetricsReader {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            offset: 0,
            partial: Vec::new(),
            totals: VmmMetrics::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the lines appended since the last call and returns the totals.
    /// A line still being written is kept for the next call.
    pub fn read_new(&mut self) -> Result<VmmMetrics, MetricsError> {
        let read_err = |source| MetricsError::Read {
            path: self.path.clone(),
            source,
        };
        let mut file = fs::File::open(&self.path).map_err(read_err)?;
        file.seek(SeekFrom::Start(self.offset)).map_err(read_err)?;
        let mut fresh = Vec::new();
        let n = file.read_to_end(&mut fresh).map_err(read_err)?;
        self.offset += n as u64;
        self.partial.extend_from_slice(&fresh);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..end]);
            if text.trim().is_empty() {
                continue;
            }
            let parsed = parse_line(&text).map_err(|source| MetricsError::Parse {
                path: self.path.clone(),
                line: self.totals.lines + 1,
                source,
            })?;
            self.totals.add(&parsed);
        }
        if self.partial.len() > MAX_LINE {
            return Err(MetricsError::Overlong {
                path: self.path.clone(),
            });
        }
        Ok(self.totals)
    }

    /// The totals as of the last read.
    pub fn totals(&self) -> VmmMetrics {
        self.totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line as Firecracker v1.17 writes it (shortened: groups Kiln does
    /// not read are dropped, and `vcpu`'s latency aggregates kept to show
    /// they are ignored).
    const LINE: &str = r#"{"utc_timestamp_ms":1796671456356,"api_server":{"process_startup_time_us":0,"process_startup_time_cpu_us":0},"block":{},"uart":{"error_count":0,"flush_count":0,"missed_read_count":0,"missed_write_count":0,"read_count":11,"write_count":48,"rate_limiter_dropped_bytes":0},"latencies_us":{"full_create_snapshot":0,"diff_create_snapshot":0,"load_snapshot":0,"pause_vm":0,"resume_vm":0,"vmm_full_create_snapshot":0,"vmm_diff_create_snapshot":0,"vmm_load_snapshot":0,"vmm_pause_vm":0,"vmm_resume_vm":0},"seccomp":{"num_faults":0},"vcpu":{"exit_io_in":74,"exit_io_out":51,"exit_mmio_read":0,"exit_mmio_write":0,"failures":0,"kvmclock_ctrl_fails":0,"exit_io_in_agg":{"min_us":0,"max_us":22,"sum_us":28}},"vmm":{"panic_count":0},"signals":{"sigbus":0,"sigsegv":0,"sigxfsz":0,"sigxcpu":0,"sigpipe":0,"sighup":0,"sigill":0}}"#;

    #[test]
    fn a_firecracker_line_parses() {
        let l = parse_line(LINE).unwrap();
        assert_eq!(l.utc_timestamp_ms, 1_796_671_456_356);
        assert_eq!(l.vcpu.exit_io_in, 74);
        assert_eq!(l.vcpu.exit_io_out, 51);
        assert_eq!(l.uart.write_count, 48);
        assert!(parse_line("{\"vcpu\": 3}").is_err());
        // A line of a version without some groups.
        assert_eq!(parse_line("{}").unwrap(), MetricsLine::default());
    }

    #[test]
    fn counters_add_up_and_latencies_keep_the_last_measured_value() {
        let mut m = VmmMetrics::default();
        let mut a = parse_line(LINE).unwrap();
        a.latencies_us.load_snapshot = 900;
        m.add(&a);
        let mut b = MetricsLine::default();
        b.vcpu.exit_io_in = 6;
        b.signals.sigpipe = 1;
        m.add(&b);
        b.signals.sigpipe = 2;
        m.add(&b);
        assert_eq!(m.lines, 3);
        assert_eq!(m.vcpu.exit_io_in, 86);
        assert_eq!(m.latencies_us.load_snapshot, 900);
        assert_eq!(m.signals.sigpipe, 3);
    }

    #[test]
    fn the_reader_takes_whole_lines_as_they_are_appended() {
        let dir = std::env::temp_dir().join(format!("kiln-fc-metrics-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.json");
        fs::write(&path, format!("{LINE}\n{}", &LINE[..40])).unwrap();
        let mut r = MetricsReader::new(&path);
        assert_eq!(r.read_new().unwrap().lines, 1);
        // The rest of the second line, and a third.
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, format!("{}\n{LINE}\n", &LINE[40..]).as_bytes()).unwrap();
        let totals = r.read_new().unwrap();
        assert_eq!(totals.lines, 3);
        assert_eq!(totals.vcpu.exit_io_out, 3 * 51);
        std::io::Write::write_all(&mut f, b"not json\n").unwrap();
        let e = r.read_new().unwrap_err();
        assert!(matches!(e, MetricsError::Parse { line: 4, .. }), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}

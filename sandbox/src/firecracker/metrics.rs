//! Firecracker's own metrics. Once given a path (`PUT /metrics`),
//! Firecracker appends one JSON object per line to it: at that call, every
//! 60 seconds, and on each `FlushMetrics` action. Counters (Firecracker's
//! `SharedIncMetric`) hold what happened *since the previous line*; gauges
//! and latencies (`SharedStoreMetric`) hold the latest value. This module
//! parses the lines and adds them up into the figures Kiln exposes per VM:
//! vCPU exits to the VMM, serial traffic, snapshot latencies, faults and
//! signals (names and meanings from `src/vmm/src/logger/metrics.rs`).

use std::collections::HashMap;
use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

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

/// Every Firecracker VM of a backend, for Kiln's `/metrics`: the counters
/// of the live VMs (read from their metrics files at scrape time) plus
/// those of the VMs already gone, so the exported counters never go back.
/// Cheap to clone.
#[derive(Clone, Default)]
pub struct Fleet {
    state: Arc<Mutex<FleetState>>,
}

#[derive(Default)]
struct FleetState {
    next: u64,
    live: HashMap<u64, Arc<Mutex<MetricsReader>>>,
    /// The totals of retired VMs.
    retired: FleetTotals,
    /// Metrics files that could not be read or parsed (a VMM killed while
    /// writing, a full disk); their VM's counters stay as last read.
    read_errors: u64,
}

/// Counters summed over VMs (the gauges of [`VmmMetrics`] have no sum).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetTotals {
    pub vms_started: u64,
    pub vcpu: VcpuLine,
    pub uart: UartLine,
    pub seccomp_faults: u64,
    pub panics: u64,
    /// VMMs that caught a fatal signal (SIGBUS, SIGSEGV, SIGXFSZ, SIGXCPU,
    /// SIGHUP, SIGILL), and SIGPIPEs caught.
    pub fatal_signals: u64,
    pub sigpipes: u64,
}

impl FleetTotals {
    fn absorb(&mut self, m: &VmmMetrics) {
        let (v, u, s) = (&m.vcpu, &m.uart, &m.signals);
        self.vcpu.exit_io_in += v.exit_io_in;
        self.vcpu.exit_io_out += v.exit_io_out;
        self.vcpu.exit_mmio_read += v.exit_mmio_read;
        self.vcpu.exit_mmio_write += v.exit_mmio_write;
        self.vcpu.failures += v.failures;
        self.uart.read_count += u.read_count;
        self.uart.write_count += u.write_count;
        self.uart.missed_read_count += u.missed_read_count;
        self.uart.missed_write_count += u.missed_write_count;
        self.uart.error_count += u.error_count;
        self.seccomp_faults += m.seccomp.num_faults;
        self.panics += m.vmm.panic_count;
        let fatal = [
            s.sigbus, s.sigsegv, s.sigxfsz, s.sigxcpu, s.sighup, s.sigill,
        ];
        self.fatal_signals += u64::from(fatal.iter().any(|&n| n > 0));
        self.sigpipes += s.sigpipe;
    }
}

/// A VM's place in its [`Fleet`]; dropping it retires the VM (its last
/// counters move into the fleet's retired totals).
#[must_use = "dropping the ticket retires the VM from the fleet at once"]
pub struct FleetTicket {
    fleet: Fleet,
    key: u64,
}

impl Fleet {
    /// Counts a new VM whose metrics `reader` reads.
    pub fn enroll(&self, reader: Arc<Mutex<MetricsReader>>) -> FleetTicket {
        let mut st = lock(&self.state);
        let key = st.next;
        st.next += 1;
        st.retired.vms_started += 1;
        st.live.insert(key, reader);
        FleetTicket {
            fleet: self.clone(),
            key,
        }
    }

    /// VMs enrolled and not yet retired.
    pub fn live(&self) -> usize {
        lock(&self.state).live.len()
    }

    /// The counters of every VM so far: the live ones as far as their
    /// files have been written (Firecracker writes a line every 60 s and
    /// when asked to flush), plus the retired ones.
    pub fn totals(&self) -> FleetTotals {
        let mut st = lock(&self.state);
        let mut sum = st.retired;
        let mut errors = 0;
        for reader in st.live.values() {
            let mut r = lock(reader);
            match r.read_new() {
                Ok(m) => sum.absorb(&m),
                Err(_) => {
                    errors += 1;
                    sum.absorb(&r.totals());
                }
            }
        }
        st.read_errors += errors;
        sum
    }

    fn retire(&self, key: u64) {
        let mut st = lock(&self.state);
        let Some(reader) = st.live.remove(&key) else {
            return;
        };
        let mut r = lock(&reader);
        let last = match r.read_new() {
            Ok(m) => m,
            Err(_) => {
                st.read_errors += 1;
                r.totals()
            }
        };
        st.retired.absorb(&last);
    }

    /// A collector for a `prometheus-client` registry that reads the
    /// fleet at scrape time.
    pub fn collector(&self) -> Box<dyn Collector> {
        Box::new(FleetCollector(self.clone()))
    }
}

impl Drop for FleetTicket {
    fn drop(&mut self) {
        self.fleet.retire(self.key);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct FleetCollector(Fleet);

/// A counter family: its name after `kiln_firecracker_`, its help, and its
/// values by `kind` label (one value with an empty kind: no label).
type CounterFamily<'a> = (&'a str, &'a str, &'a [(&'a str, u64)]);

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("live", &self.live()).finish()
    }
}

impl Collector for FleetCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let t = self.0.totals();
        let (live, errors) = {
            let st = lock(&self.0.state);
            (st.live.len() as i64, st.read_errors)
        };
        let p = "kiln_firecracker";
        gauge(
            &mut e,
            &format!("{p}_vms"),
            "Firecracker VMs alive now.",
            live,
        )?;
        let counters: [CounterFamily<'_>; 7] = [
            (
                "vms_started",
                "Firecracker VMs started (booted or restored).",
                &[("", t.vms_started)],
            ),
            (
                "vcpu_exits",
                "vCPU exits handled by the VMM in user space, by kind (Firecracker's vcpu.exit_*).",
                &[
                    ("io_in", t.vcpu.exit_io_in),
                    ("io_out", t.vcpu.exit_io_out),
                    ("mmio_read", t.vcpu.exit_mmio_read),
                    ("mmio_write", t.vcpu.exit_mmio_write),
                ],
            ),
            (
                "vcpu_failures",
                "vCPU run failures (Firecracker's vcpu.failures).",
                &[("", t.vcpu.failures)],
            ),
            (
                "serial",
                "Serial console accesses by the guest, by kind (Firecracker's uart.*_count).",
                &[
                    ("read", t.uart.read_count),
                    ("write", t.uart.write_count),
                    ("missed_read", t.uart.missed_read_count),
                    ("missed_write", t.uart.missed_write_count),
                    ("error", t.uart.error_count),
                ],
            ),
            (
                "seccomp_faults",
                "System calls a VMM's seccomp filter refused.",
                &[("", t.seccomp_faults)],
            ),
            ("panics", "VMM panics.", &[("", t.panics)]),
            (
                "signals",
                "VMMs that caught a fatal signal, and SIGPIPEs caught.",
                &[("fatal", t.fatal_signals), ("sigpipe", t.sigpipes)],
            ),
        ];
        for (name, help, values) in counters {
            let name = format!("{p}_{name}");
            let mut family = e.encode_descriptor(&name, help, None, MetricType::Counter)?;
            for &(kind, v) in values {
                if kind.is_empty() {
                    family.encode_counter::<(), u64, u64>(&v, None)?;
                } else {
                    family
                        .encode_family(&[("kind", kind)])?
                        .encode_counter::<(), u64, u64>(&v, None)?;
                }
            }
        }
        let name = format!("{p}_metrics_read_errors");
        let mut family = e.encode_descriptor(
            &name,
            "Reads of a VM's metrics file that failed (its counters stay as last read).",
            None,
            MetricType::Counter,
        )?;
        family.encode_counter::<(), u64, u64>(&errors, None)?;
        Ok(())
    }
}

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> std::fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
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

    #[test]
    fn the_fleet_sums_live_and_retired_vms_and_a_bad_file_keeps_the_last_counts() {
        let dir = std::env::temp_dir().join(format!("kiln-fc-fleet-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.json"), dir.join("b.json"));
        fs::write(&a, format!("{LINE}\n")).unwrap();
        fs::write(&b, format!("{LINE}\n{LINE}\n")).unwrap();
        let fleet = Fleet::default();
        let ta = fleet.enroll(Arc::new(Mutex::new(MetricsReader::new(&a))));
        let tb = fleet.enroll(Arc::new(Mutex::new(MetricsReader::new(&b))));
        let t = fleet.totals();
        assert_eq!((fleet.live(), t.vms_started), (2, 2));
        assert_eq!(t.vcpu.exit_io_in, 3 * 74);
        assert_eq!(t.uart.write_count, 3 * 48);
        // Reading twice does not count twice.
        assert_eq!(fleet.totals(), t);
        // a's last line arrives as it is retired; b's file goes bad.
        fs::write(&a, format!("{LINE}\n{LINE}\n")).unwrap();
        drop(ta);
        let mut f = fs::OpenOptions::new().append(true).open(&b).unwrap();
        std::io::Write::write_all(&mut f, b"garbage\n").unwrap();
        let t = fleet.totals();
        assert_eq!((fleet.live(), t.vms_started), (1, 2));
        assert_eq!(t.vcpu.exit_io_in, 4 * 74);
        drop(tb);
        assert_eq!(fleet.live(), 0);
        assert_eq!(fleet.totals().vcpu.exit_io_in, 4 * 74);
        assert_eq!(lock(&fleet.state).read_errors, 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}

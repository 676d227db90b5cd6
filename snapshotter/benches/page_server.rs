//! Page-server benchmarks, each side by side with its baseline in one run:
//!
//! 1. lazy fault service (faults/s, p50/p99 per fault) against the same
//!    accesses to a plain `MAP_PRIVATE` mapping of the memory file;
//! 2. prefetch throughput (MiB/s) for 64 and 256 MiB working sets against a
//!    sequential `read` of the same bytes, with the file in the page cache
//!    (warm) and evicted from it (cold);
//! 3. time to first touch and to touching the whole working set, lazy
//!    against prefetch.
//!
//! Run as root: `cargo bench -p kiln-snapshotter --bench page_server`.
//! `KILN_BENCH_QUICK=1` runs one round instead of five; `KILN_BENCH_ONLY=1,3`
//! runs only the named sections; `KILN_BENCH_PREFETCH_THREADS=N` sets the
//! page server's prefetch threads for section 2 (default: its own default).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_snapshotter::guest::{GuestMemory, HandshakeFormat, RegionSpec};
use kiln_snapshotter::memory::MemoryFile;
use kiln_snapshotter::working_set::WorkingSet;
use kiln_snapshotter::{PageServer, PageServerConfig, ServeMode, SnapshotSource};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Guest memory starts this far into the file (a non-zero region offset).
const BASE_OFFSET: u64 = 16 * MIB;
const FILE_LEN: u64 = BASE_OFFSET + 256 * MIB;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn evict(path: &Path) {
    let f = File::open(path).unwrap();
    // SAFETY: advice on a file we own; drops its clean page-cache pages.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

fn warm(path: &Path) {
    let mut f = File::open(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    while f.read(&mut buf).unwrap() > 0 {}
}

fn make_file(path: &Path) {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut chunk = vec![0u8; MIB as usize];
    let f = File::create(path).unwrap();
    for i in 0..FILE_LEN / MIB {
        for w in chunk.chunks_mut(8) {
            w.copy_from_slice(&rng.next().to_le_bytes());
        }
        f.write_all_at(&chunk, i * MIB).unwrap();
    }
    f.sync_all().unwrap();
}

struct PrivateMapping(*mut u8, usize);
impl PrivateMapping {
    fn new(path: &Path) -> Self {
        let f = File::open(path).unwrap();
        // SAFETY: a fresh private read-only mapping of the whole file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FILE_LEN as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Self(p.cast(), FILE_LEN as usize)
    }
    fn touch(&self, off: u64) -> u8 {
        // SAFETY: `off` is inside the mapping.
        unsafe { std::ptr::read_volatile(self.0.add(off as usize)) }
    }
}
impl Drop for PrivateMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps what `new` mapped.
        unsafe { libc::munmap(self.0.cast(), self.1) };
    }
}

fn lazy_faults(dir: &Path, mem: &Path, rounds: usize) {
    println!("\n## 1. Lazy fault service vs MAP_PRIVATE page-cache faults (64 MiB region, 8192 random pages, warm cache)");
    let server = PageServer::new().unwrap();
    let sock = dir.join("lazy.sock");
    server
        .listen(&sock, SnapshotSource::new(mem, ServeMode::Lazy))
        .unwrap();
    let region = RegionSpec {
        size: 64 * MIB,
        offset: BASE_OFFSET,
    };
    let mut pages: Vec<u64> = (0..region.size / PAGE).map(|p| p * PAGE).collect();
    Rng(7).shuffle(&mut pages);
    pages.truncate(8192);
    warm(mem);
    let (mut uffd_lat, mut map_lat) = (Vec::new(), Vec::new());
    let (mut uffd_rate, mut map_rate) = (Vec::new(), Vec::new());
    let mut sink = 0u8;
    for _ in 0..rounds {
        let guest = GuestMemory::restore(&sock, &[region], HandshakeFormat::Current).unwrap();
        let start = Instant::now();
        for &off in &pages {
            let t = Instant::now();
            sink ^= guest.touch(0, off);
            uffd_lat.push(t.elapsed());
        }
        uffd_rate.push(pages.len() as f64 / start.elapsed().as_secs_f64());
        drop(guest);
        let map = PrivateMapping::new(mem);
        let start = Instant::now();
        for &off in &pages {
            let t = Instant::now();
            sink ^= map.touch(BASE_OFFSET + off);
            map_lat.push(t.elapsed());
        }
        map_rate.push(pages.len() as f64 / start.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    uffd_lat.sort();
    map_lat.sort();
    let server_side = server.metrics().snapshot().fault_latency;
    println!("| path | faults/s (median of {rounds}) | p50 per fault | p99 per fault |");
    println!("| --- | --- | --- | --- |");
    for (name, rate, lat) in [
        ("userfaultfd page server", &mut uffd_rate, &uffd_lat),
        ("MAP_PRIVATE file mapping", &mut map_rate, &map_lat),
    ] {
        println!(
            "| {name} | {:.0} | {:.1} µs | {:.1} µs |",
            median(rate),
            percentile(lat, 0.5).as_secs_f64() * 1e6,
            percentile(lat, 0.99).as_secs_f64() * 1e6
        );
    }
    println!(
        "server-side service time (message read -> page installed): p50 <= {:.1} µs, p99 <= {:.1} µs (histogram bucket bounds)",
        server_side.quantile(0.5).as_secs_f64() * 1e6,
        server_side.quantile(0.99).as_secs_f64() * 1e6
    );
    println!(
        "ratio page-server/page-cache: rate {:.2}x, p50 {:.1}x slower",
        median(&mut uffd_rate) / median(&mut map_rate),
        percentile(&uffd_lat, 0.5).as_secs_f64() / percentile(&map_lat, 0.5).as_secs_f64()
    );
}

fn write_working_set(mem: &Path, path: &Path, size: u64, seed: u64) -> Vec<u64> {
    let identity = MemoryFile::open(mem).unwrap().identity();
    let mut offsets: Vec<u64> = (0..size / PAGE).map(|p| BASE_OFFSET + p * PAGE).collect();
    Rng(seed).shuffle(&mut offsets);
    WorkingSet {
        page_size: PAGE as u32,
        identity,
        offsets: offsets.clone(),
    }
    .write_atomic(path)
    .unwrap();
    offsets
}

/// Restores with prefetch and returns the server-side prefetch duration.
fn one_prefetch(server: &PageServer, sock: &Path, size: u64) -> Duration {
    let before = server.recent_restores().len();
    let guest = GuestMemory::restore(
        sock,
        &[RegionSpec {
            size,
            offset: BASE_OFFSET,
        }],
        HandshakeFormat::Current,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let took = loop {
        let ns = server
            .restores()
            .iter()
            .map(|r| r.metrics.prefetch_ns)
            .max()
            .unwrap_or(0);
        if ns > 0 {
            break Duration::from_nanos(ns);
        }
        assert!(Instant::now() < deadline, "prefetch did not finish");
        std::thread::sleep(Duration::from_micros(200));
    };
    drop(guest);
    // Each restore lives until shutdown here (the VMM is this process), so
    // use a fresh server per round: see the caller.
    let _ = before;
    took
}

fn sequential_read(mem: &Path, size: u64) -> Duration {
    let f = File::open(mem).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let start = Instant::now();
    let mut off = BASE_OFFSET;
    while off < BASE_OFFSET + size {
        let n = f.read_at(&mut buf, off).unwrap();
        assert!(n > 0);
        off += n as u64;
    }
    std::hint::black_box(&buf);
    start.elapsed()
}

/// Sequential read of the same bytes into freshly mapped anonymous memory:
/// what it costs to land the bytes in new pages, as a guest's must.
fn read_into_fresh_memory(mem: &Path, size: u64) -> Duration {
    let f = File::open(mem).unwrap();
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let dst = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(dst, libc::MAP_FAILED);
    // SAFETY: advice on the mapping just created (4 KiB pages, like uffd installs).
    unsafe { libc::madvise(dst, size as usize, libc::MADV_NOHUGEPAGE) };
    // SAFETY: the mapping is `size` bytes, writable, and used only here.
    let buf = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), size as usize) };
    let start = Instant::now();
    let mut done = 0usize;
    while done < size as usize {
        let end = (done + MIB as usize).min(size as usize);
        let n = f
            .read_at(&mut buf[done..end], BASE_OFFSET + done as u64)
            .unwrap();
        assert!(n > 0);
        done += n;
    }
    let took = start.elapsed();
    // SAFETY: unmaps the mapping created above; `buf` is not used after.
    unsafe { libc::munmap(dst, size as usize) };
    took
}

/// The page server's defaults, with `KILN_BENCH_PREFETCH_THREADS` (if set)
/// as the number of prefetch threads.
fn prefetch_config() -> PageServerConfig {
    let mut config = PageServerConfig::default();
    if let Some(n) = std::env::var("KILN_BENCH_PREFETCH_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        config.prefetch_threads = n;
    }
    config
}

/// The 1-minute load average, to read every result against.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Puts `mem` in the page cache (`cold` false) or out of it, before each
/// measured pass.
fn prepare_cache(mem: &Path, cold: bool) {
    if cold {
        evict(mem)
    } else {
        warm(mem)
    }
}

fn prefetch_throughput(dir: &Path, mem: &Path, rounds: usize) {
    println!(
        "\n## 2. Prefetch throughput vs sequential read of the same bytes (median of {rounds}; {} prefetch threads)",
        prefetch_config().prefetch_threads
    );
    println!("| working set | cache | prefetch MiB/s | sequential read MiB/s | prefetch / read | same, per-round pairs | read into fresh anon memory MiB/s | prefetch / that | load |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for size in [64 * MIB, 256 * MIB] {
        let ws_path: PathBuf = dir.join(format!("ws-{}", size / MIB));
        write_working_set(mem, &ws_path, size, size);
        for cold in [false, true] {
            let (mut pre, mut seq, mut fresh) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                let server = PageServer::with_config(prefetch_config()).unwrap();
                let sock = dir.join("prefetch.sock");
                let mut source = SnapshotSource::new(mem, ServeMode::Prefetch);
                source.working_set = ws_path.clone();
                server.listen(&sock, source).unwrap();
                prepare_cache(mem, cold);
                let t = one_prefetch(&server, &sock, size);
                pre.push(size as f64 / MIB as f64 / t.as_secs_f64());
                drop(server);
                prepare_cache(mem, cold);
                let t = sequential_read(mem, size);
                seq.push(size as f64 / MIB as f64 / t.as_secs_f64());
                prepare_cache(mem, cold);
                let t = read_into_fresh_memory(mem, size);
                fresh.push(size as f64 / MIB as f64 / t.as_secs_f64());
            }
            // Each prefetch against the read right after it: less exposed
            // to the load drifting between rounds than the ratio of medians.
            let mut paired: Vec<f64> = pre.iter().zip(&seq).map(|(p, s)| p / s).collect();
            let paired = median(&mut paired);
            let (p, s, f) = (median(&mut pre), median(&mut seq), median(&mut fresh));
            println!(
                "| {} MiB | {} | {:.0} | {:.0} | {:.0}% | {:.0}% | {:.0} | {:.0}% | {} |",
                size / MIB,
                if cold { "cold" } else { "warm" },
                p,
                s,
                100.0 * p / s,
                100.0 * paired,
                f,
                100.0 * p / f,
                load_average()
            );
        }
    }
}

fn time_to_touch(dir: &Path, mem: &Path, rounds: usize) {
    println!("\n## 3. Time to first touch and to touching the whole 64 MiB working set (warm cache, median of {rounds})");
    let size = 64 * MIB;
    let ws_path = dir.join("ws-touch");
    let order = write_working_set(mem, &ws_path, size, 99);
    println!("| mode | first touch, median (min) | whole working set, median (min) |");
    println!("| --- | --- | --- |");
    for mode in [ServeMode::Lazy, ServeMode::Prefetch] {
        let (mut first, mut all) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            warm(mem);
            let server = PageServer::new().unwrap();
            let sock = dir.join("touch.sock");
            let mut source = SnapshotSource::new(mem, mode);
            source.working_set = ws_path.clone();
            server.listen(&sock, source).unwrap();
            let start = Instant::now();
            let guest = GuestMemory::restore(
                &sock,
                &[RegionSpec {
                    size,
                    offset: BASE_OFFSET,
                }],
                HandshakeFormat::Current,
            )
            .unwrap();
            let mut sink = 0u8;
            sink ^= guest.touch(0, order[0] - BASE_OFFSET);
            first.push(start.elapsed().as_secs_f64() * 1e3);
            for off in &order[1..] {
                sink ^= guest.touch(0, off - BASE_OFFSET);
            }
            all.push(start.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(sink);
            drop(guest);
        }
        let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let (first_min, all_min) = (min(&first), min(&all));
        println!(
            "| {mode:?} | {:.2} ms ({first_min:.2}) | {:.1} ms ({all_min:.1}) |",
            median(&mut first),
            median(&mut all)
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::var_os("KILN_BENCH_QUICK").is_some();
    let dir = std::env::temp_dir().join(format!("kiln-pagesrv-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mem = dir.join("memory");
    make_file(&mem);
    println!("# kiln-snapshotter page server benchmarks");
    println!(
        "memory file: {} MiB; guest region at file offset {} MiB; 4 KiB pages",
        FILE_LEN / MIB,
        BASE_OFFSET / MIB
    );
    println!("load average at start: {}", load_average());
    let rounds = if quick { 1 } else { 5 };
    let only = std::env::var("KILN_BENCH_ONLY").unwrap_or_default();
    let run = |n: &str| only.is_empty() || only.split(',').any(|o| o == n);
    if run("1") {
        lazy_faults(&dir, &mem, rounds);
    }
    if run("2") {
        prefetch_throughput(&dir, &mem, rounds);
    }
    if run("3") {
        time_to_touch(&dir, &mem, rounds * 2 - 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

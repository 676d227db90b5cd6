//! Helpers shared by the page-server tests: temporary directories, memory
//! files with known contents, bounded waiting, and a child-process VMM.
//!
//! The child VMM re-executes the test binary with `KILN_TEST_VMM=1` and runs
//! only the `child_vmm` test, which plays Firecracker's side of a restore in
//! a separate process, so that a restore can be killed for real.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_snapshotter::guest::{GuestMemory, HandshakeFormat, RegionSpec};

pub const PAGE: u64 = 4096;
pub const MIB: u64 = 1 << 20;

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "kiln-snap-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A small deterministic generator (xorshift64*), enough for test patterns.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Writes a memory file of `len` bytes where no two pages are alike (and no
/// page is all zeros), so any misplaced or zero page is caught.
pub fn memory_file(path: &Path, len: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut bytes = vec![0u8; len as usize];
    for chunk in bytes.chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    for (i, page) in bytes.chunks_mut(PAGE as usize).enumerate() {
        page[..8].copy_from_slice(&(i as u64 | 1 << 63).to_le_bytes());
    }
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// Polls `cond` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `f` on its own thread and fails the test if it takes longer than
/// `timeout` (a page server that stops serving would hang it forever).
pub fn within<T: Send + 'static>(timeout: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!(
            "guest access did not finish within {timeout:?}: the page server stopped serving"
        ),
    }
}

/// `(region, offset)` of every page of `regions`, shuffled.
pub fn shuffled_pages(regions: &[RegionSpec], seed: u64) -> Vec<(usize, u64)> {
    let mut pages: Vec<(usize, u64)> = regions
        .iter()
        .enumerate()
        .flat_map(|(i, r)| (0..r.size / PAGE).map(move |p| (i, p * PAGE)))
        .collect();
    Rng::new(seed).shuffle(&mut pages);
    pages
}

/// Reads each page in `pages` and checks it byte for byte against `file`.
pub fn check_pages(guest: &GuestMemory, file: &[u8], pages: &[(usize, u64)]) {
    let mut buf = vec![0u8; PAGE as usize];
    for &(region, off) in pages {
        guest.read(region, off, &mut buf);
        let at = (guest.region_spec(region).offset + off) as usize;
        assert!(
            buf == file[at..at + PAGE as usize],
            "region {region} offset {off:#x} (file offset {at:#x}) differs from the memory file"
        );
    }
}

pub fn regions_to_env(regions: &[RegionSpec]) -> String {
    regions
        .iter()
        .map(|r| format!("{}:{}", r.size, r.offset))
        .collect::<Vec<_>>()
        .join(",")
}

fn regions_from_env(s: &str) -> Vec<RegionSpec> {
    s.split(',')
        .map(|pair| {
            let (size, offset) = pair.split_once(':').unwrap();
            RegionSpec {
                size: size.parse().unwrap(),
                offset: offset.parse().unwrap(),
            }
        })
        .collect()
}

/// What a child VMM does after its handshake.
pub struct ChildPlan<'a> {
    pub socket: &'a Path,
    pub memory: &'a Path,
    pub regions: &'a [RegionSpec],
    pub seed: u64,
    /// Touch this fraction (per mille) of all pages, in a seeded random order.
    pub per_mille: u64,
    /// Print `HALFWAY` after half the pages and then sleep until killed.
    pub stall_halfway: bool,
}

/// Starts a child process that plays the VMM for one restore.
pub fn spawn_child_vmm(test_binary_filter: &str, plan: &ChildPlan<'_>) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            test_binary_filter,
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KILN_TEST_VMM", "1")
        .env("KILN_TEST_SOCKET", plan.socket)
        .env("KILN_TEST_MEMORY", plan.memory)
        .env("KILN_TEST_REGIONS", regions_to_env(plan.regions))
        .env("KILN_TEST_SEED", plan.seed.to_string())
        .env("KILN_TEST_PER_MILLE", plan.per_mille.to_string())
        .env(
            "KILN_TEST_STALL",
            if plan.stall_halfway { "1" } else { "0" },
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Waits (bounded) for a child's stdout to print a line containing `marker`
/// (the test harness prints `test child_vmm ... ` before it on the same line).
pub fn wait_for_line(child: &mut Child, marker: &str, timeout: Duration) -> bool {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    let marker = marker.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(&marker) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(timeout).is_ok()
}

/// Child processes killed (and reaped) when the test ends, even by panic.
pub struct Children(pub Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (bounded) for a child to exit; kills it and returns `None` on timeout.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pages a child plan touches, in order.
pub fn plan_pages(regions: &[RegionSpec], seed: u64, per_mille: u64) -> Vec<(usize, u64)> {
    let mut pages = shuffled_pages(regions, seed);
    let keep = (pages.len() as u64 * per_mille / 1000).max(1) as usize;
    pages.truncate(keep);
    pages
}

/// Body of the child VMM: called from a `#[test]` that returns at once unless
/// `KILN_TEST_VMM` is set.
pub fn child_vmm_main() {
    if std::env::var_os("KILN_TEST_VMM").is_none() {
        return;
    }
    let var = |k: &str| std::env::var(k).unwrap();
    let regions = regions_from_env(&var("KILN_TEST_REGIONS"));
    let file = std::fs::read(var("KILN_TEST_MEMORY")).unwrap();
    let pages = plan_pages(
        &regions,
        var("KILN_TEST_SEED").parse().unwrap(),
        var("KILN_TEST_PER_MILLE").parse().unwrap(),
    );
    let guest = GuestMemory::restore(
        Path::new(&var("KILN_TEST_SOCKET")),
        &regions,
        HandshakeFormat::Current,
    )
    .unwrap();
    let half = pages.len() / 2;
    check_pages(&guest, &file, &pages[..half]);
    if var("KILN_TEST_STALL") == "1" {
        println!("HALFWAY");
        // Bounded: the parent kills us long before this ends.
        std::thread::sleep(Duration::from_secs(60));
        std::process::exit(3);
    }
    check_pages(&guest, &file, &pages[half..]);
    println!("DONE {}", pages.len());
}

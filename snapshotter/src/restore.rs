//! Serving one restore: the fault loop of a single VM's userfaultfd.
//!
//! Each accepted restore gets its own thread running [`Restore::run`], so a
//! VM that misbehaves (or a bug that panics) only ever affects itself. The
//! loop follows Firecracker's contract: faults are served with `UFFDIO_COPY`
//! from the shared memory-file mapping; `EEXIST` means the page is already
//! there (we only wake the waiter); `EAGAIN` means a remove event is pending,
//! so the fault is retried after reading events; ranges named by
//! `UFFD_EVENT_REMOVE` are served as zero pages from then on. Within every
//! batch of messages, remove events are applied before faults, because the
//! kernel may queue a fault ahead of the remove that logically precedes it.
//!
//! In prefetch mode the working set is installed in slices (256 KiB first,
//! doubling up to 4 MiB) between polls of the uffd, so the VM's own faults
//! are never stuck behind the whole working set. Each slice is cut into
//! 256 KiB pieces that the prefetch threads
//! (`PageServerConfig::prefetch_threads`) claim one at a time, so a thread
//! the scheduler preempts holds up at most one piece; a thread reads its
//! piece of the file in with one `MADV_POPULATE_READ` and installs it with a
//! multi-page `UFFDIO_COPY_MODE_DONTWAKE` copy straight from the file
//! mapping. The
//! cost is in materialising fresh pages (the guest's anonymous pages, and
//! the page cache's when the file is cold), not in the copy, so it is that
//! work the threads share. One `UFFDIO_WAKE` per region releases every
//! waiter at the end. A fault on a page the prefetch already installed gets
//! `EEXIST` and an explicit wake.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::handshake::RegionTable;
use crate::memory::MemoryFile;
use crate::metrics::{PageServerMetrics, RestoreMetrics};
use crate::sys::{self, FillOutcome, UffdEvent};
use crate::working_set::WorkingSet;

/// Largest piece of working set installed by one `UFFDIO_COPY`.
const PREFETCH_CHUNK: u64 = 4 << 20;
/// Working set installed between two polls of the uffd (a lazy fault outside
/// the working set waits at most for one slice: ~2 ms at the rates measured).
const PREFETCH_SLICE_BYTES: u64 = 4 << 20;
/// The first slice is small, and slices double up to [`PREFETCH_SLICE_BYTES`],
/// so the VM's first faults are not stuck behind a large slice.
const PREFETCH_FIRST_SLICE_BYTES: u64 = 256 << 10;
/// The unit of work the prefetch threads claim: small enough that the
/// threads finish a slice together even when one of them is preempted, large
/// enough that one `UFFDIO_COPY` and one read request cover many pages.
const PREFETCH_PIECE: u64 = 256 << 10;
/// Messages read from the uffd per `read`.
const EVENT_BATCH: usize = 64;
/// Poll interval while faults wait for a pending remove event.
const RETRY_INTERVAL: Duration = Duration::from_millis(1);

/// Why serving a restore stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// `poll` on the uffd, pidfd or shutdown eventfd failed.
    #[error("polling the userfaultfd failed: {0}")]
    Poll(#[source] io::Error),
    /// The uffd reported an error condition (POLLERR/POLLNVAL).
    #[error("the userfaultfd reported an error condition (revents {0:#x})")]
    UffdError(i16),
    /// Reading messages from the uffd failed.
    #[error("reading userfaultfd events failed: {0}")]
    ReadEvents(#[source] io::Error),
    /// `UFFDIO_COPY`/`UFFDIO_ZEROPAGE`/`UFFDIO_WAKE` failed unexpectedly.
    #[error("installing guest memory at {addr:#x} (+{len:#x}) failed: {source}")]
    Fill {
        /// Guest (VMM virtual) address.
        addr: u64,
        /// Bytes being installed.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// How a restore ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum RestoreEnd {
    /// The VMM process exited (its pidfd became readable).
    VmmExited,
    /// The guest memory's address space is gone (`ESRCH` from the kernel).
    GuestMemoryGone,
    /// The page server is shutting down.
    Shutdown,
    /// Serving failed; the message says why.
    Failed(String),
}

/// One chunk of working set still to install.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    region: usize,
    dst: u64,
    file_off: u64,
    len: u64,
}

/// Result of installing one range.
enum Fill {
    /// The range is complete; `installed` bytes of it were installed by
    /// us, the rest was already present.
    Done {
        /// Bytes this call installed.
        installed: u64,
    },
    /// Not done: the rest must wait until pending events are read.
    Pending,
    /// The VMM's address space has gone away.
    Gone,
    /// The range is no longer registered (unmapped under us); dropped.
    Dropped,
}

/// The state of one VM's restore.
pub(crate) struct Restore {
    uffd: OwnedFd,
    pidfd: Option<OwnedFd>,
    table: RegionTable,
    memory: Arc<MemoryFile>,
    removed: Vec<Vec<u64>>,
    recording: Option<Vec<u64>>,
    prefetch: VecDeque<Chunk>,
    prefetch_threads: usize,
    unplanned: Option<WorkingSet>,
    prefetch_started: Option<Instant>,
    slice_bytes: u64,
    deferred: Vec<(u64, Instant)>,
    zeros: Vec<u8>,
    metrics: Arc<RestoreMetrics>,
    global: Arc<PageServerMetrics>,
}

impl Restore {
    /// Prepares a restore. `record` asks for the fault order to be kept;
    /// `working_set` (already checked against the memory file) is prefetched,
    /// planned only once the faults pending at start have been served, and
    /// installed by up to `prefetch_threads` threads (this one included).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        uffd: OwnedFd,
        pidfd: Option<OwnedFd>,
        table: RegionTable,
        memory: Arc<MemoryFile>,
        record: bool,
        working_set: Option<WorkingSet>,
        prefetch_threads: usize,
        metrics: Arc<RestoreMetrics>,
        global: Arc<PageServerMetrics>,
    ) -> Self {
        let removed = table
            .regions()
            .iter()
            .map(|r| vec![0u64; r.pages().div_ceil(64) as usize])
            .collect();
        Self {
            uffd,
            pidfd,
            table,
            memory,
            removed,
            recording: record.then(Vec::new),
            prefetch: VecDeque::new(),
            prefetch_threads: prefetch_threads.max(1),
            unplanned: working_set,
            prefetch_started: None,
            slice_bytes: PREFETCH_FIRST_SLICE_BYTES,
            deferred: Vec::new(),
            zeros: Vec::new(),
            metrics,
            global,
        }
    }

    /// The recorded fault order, once `run` has returned (recording restores only).
    pub(crate) fn take_recording(&mut self) -> Option<Vec<u64>> {
        self.recording.take()
    }

    /// The page size shared by every region, if they agree.
    pub(crate) fn uniform_page_size(table: &RegionTable) -> Option<u64> {
        let first = table.regions().first()?.page_size;
        table
            .regions()
            .iter()
            .all(|r| r.page_size == first)
            .then_some(first)
    }

    /// Serves faults until the VMM exits, its memory goes away, `shutdown`
    /// becomes readable, or an unrecoverable error occurs.
    pub(crate) fn run(&mut self, shutdown: BorrowedFd<'_>) -> Result<RestoreEnd, RestoreError> {
        // Buffers reused across wake-ups: a fault costs no allocation.
        let mut events = Vec::with_capacity(EVENT_BATCH);
        let mut faults: Vec<(u64, Instant)> = Vec::with_capacity(EVENT_BATCH);
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: shutdown.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.pidfd.as_ref().map_or(-1, |p| p.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let watched = if self.pidfd.is_some() { 3 } else { 2 };
        if self.unplanned.is_some() {
            self.prefetch_started = Some(Instant::now());
        }
        loop {
            let timeout = if !self.prefetch.is_empty() || self.unplanned.is_some() {
                Some(Duration::ZERO)
            } else if !self.deferred.is_empty() {
                Some(RETRY_INTERVAL)
            } else {
                None
            };
            for f in &mut fds {
                f.revents = 0;
            }
            sys::poll_fds(&mut fds[..watched], timeout).map_err(RestoreError::Poll)?;
            let uffd_revents = fds[0].revents;
            if fds[1].revents != 0 {
                return Ok(RestoreEnd::Shutdown);
            }
            if watched > 2 && fds[2].revents != 0 {
                return Ok(RestoreEnd::VmmExited);
            }
            if uffd_revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                return Err(RestoreError::UffdError(uffd_revents));
            }
            events.clear();
            if uffd_revents & libc::POLLIN != 0 {
                while sys::uffd_read_events(self.uffd.as_fd(), &mut events, EVENT_BATCH)
                    .map_err(RestoreError::ReadEvents)?
                    == EVENT_BATCH
                {}
            }
            let read_at = Instant::now();
            for ev in &events {
                match *ev {
                    UffdEvent::Remove { start, end } => self.mark_removed(start, end),
                    UffdEvent::Other(code) => tracing::debug!(code, "ignoring userfaultfd event"),
                    UffdEvent::PageFault { .. } => {}
                }
            }
            faults.clear();
            faults.append(&mut self.deferred);
            faults.extend(events.iter().filter_map(|ev| match ev {
                UffdEvent::PageFault { address } => Some((*address, read_at)),
                _ => None,
            }));
            for &(addr, since) in &faults {
                match self.serve_fault(addr, since)? {
                    Fill::Done { .. } | Fill::Dropped => {}
                    Fill::Pending => self.deferred.push((addr, since)),
                    Fill::Gone => return Ok(RestoreEnd::GuestMemoryGone),
                }
            }
            if let Some(ws) = self.unplanned.take() {
                self.plan_prefetch(&ws);
            }
            if let Some(end) = self.prefetch_step()? {
                return Ok(end);
            }
        }
    }

    /// Turns the working set into chunks of guest memory to install, sorted
    /// by file offset, with their large reads planned.
    fn plan_prefetch(&mut self, ws: &WorkingSet) {
        for (off, len) in ws.runs() {
            for (ri, r) in self.table.regions().iter().enumerate() {
                let start = off.max(r.offset);
                let end = (off + len).min(r.offset + r.size);
                let mut at = start;
                while at < end {
                    let piece = (end - at).min(PREFETCH_CHUNK);
                    self.prefetch.push_back(Chunk {
                        region: ri,
                        dst: r.base + (at - r.offset),
                        file_off: at,
                        len: piece,
                    });
                    at += piece;
                }
            }
        }
        self.prefetch.make_contiguous().sort_by_key(|c| c.file_off);
        if self.prefetch.is_empty() {
            // Nothing to install: still report a (zero-length) prefetch.
            if let Some(started) = self.prefetch_started.take() {
                self.metrics
                    .prefetch_ns
                    .store(started.elapsed().as_nanos().max(1) as u64, Relaxed);
            }
        }
    }

    fn mark_removed(&mut self, start: u64, end: u64) {
        self.metrics.remove_events.fetch_add(1, Relaxed);
        self.global.remove_events.fetch_add(1, Relaxed);
        for (ri, r) in self.table.regions().iter().enumerate() {
            let s = start.max(r.base);
            let e = end.min(r.base + r.size);
            if s >= e {
                continue;
            }
            let first = (s - r.base) / r.page_size;
            let last = (e - r.base).div_ceil(r.page_size);
            for page in first..last {
                self.removed[ri][(page / 64) as usize] |= 1 << (page % 64);
            }
        }
    }

    fn is_removed(&self, region: usize, page: u64) -> bool {
        self.removed[region][(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    fn serve_fault(&mut self, addr: u64, since: Instant) -> Result<Fill, RestoreError> {
        let Some(ri) = self.table.find(addr) else {
            self.global.faults_outside_regions.fetch_add(1, Relaxed);
            tracing::warn!(
                addr = format_args!("{addr:#x}"),
                "fault outside every region; cannot serve it"
            );
            return Ok(Fill::Dropped);
        };
        let r = self.table.regions()[ri];
        let dst = addr & !(r.page_size - 1);
        let page = (dst - r.base) / r.page_size;
        let file_off = r.offset + (dst - r.base);
        let zero = self.is_removed(ri, page);
        let outcome = self.fill(dst, if zero { None } else { Some(file_off) }, r.page_size)?;
        if let Fill::Done { installed: 1.. } = outcome {
            let latency = since.elapsed();
            self.metrics.fault_latency.observe(latency);
            self.global.fault_latency.observe(latency);
            if zero {
                self.metrics.zero_pages_served.fetch_add(1, Relaxed);
                self.global.zero_pages_served.fetch_add(1, Relaxed);
            } else {
                self.metrics.faults_served.fetch_add(1, Relaxed);
                self.metrics.fault_bytes.fetch_add(r.page_size, Relaxed);
                self.global.faults_served.fetch_add(1, Relaxed);
                if let Some(rec) = &mut self.recording {
                    rec.push(file_off);
                }
            }
        }
        Ok(outcome)
    }

    /// Installs `[dst, dst + len)` from file offset `src` (zeros when `None`),
    /// continuing past partial copies and waking waiters on pages that
    /// already exist.
    fn fill(&mut self, dst: u64, src: Option<u64>, len: u64) -> Result<Fill, RestoreError> {
        let page = self.table.regions()[self.table.find(dst).unwrap_or(0)].page_size;
        let mut done = 0;
        let mut installed = 0;
        while done < len {
            let at = dst + done;
            let result = match src {
                Some(off) => sys::uffd_copy(
                    self.uffd.as_fd(),
                    at,
                    self.memory.ptr_at(off + done),
                    len - done,
                    false,
                ),
                None if page == sys::page_size() as u64 => {
                    sys::uffd_zeropage(self.uffd.as_fd(), at, len - done)
                }
                None => {
                    // Huge pages have no zeropage ioctl: copy from a zero buffer.
                    if self.zeros.len() < page as usize {
                        self.zeros = vec![0; page as usize];
                    }
                    sys::uffd_copy(self.uffd.as_fd(), at, self.zeros.as_ptr(), page, false)
                }
            };
            match result {
                Ok(FillOutcome::Filled(n)) => {
                    let n = if n == 0 { len - done } else { n };
                    self.count_copied(n, src.is_some());
                    installed += n;
                    done += n;
                }
                Ok(FillOutcome::Exists { filled }) => {
                    self.count_copied(filled, src.is_some());
                    installed += filled;
                    done += filled;
                    self.metrics.faults_already_present.fetch_add(1, Relaxed);
                    self.global.faults_already_present.fetch_add(1, Relaxed);
                    sys::uffd_wake(self.uffd.as_fd(), dst + done, page).map_err(|source| {
                        RestoreError::Fill {
                            addr: dst + done,
                            len: page,
                            source,
                        }
                    })?;
                    done += page;
                }
                Ok(FillOutcome::Again { filled }) if filled > 0 => {
                    self.count_copied(filled, src.is_some());
                    installed += filled;
                    done += filled;
                }
                Ok(FillOutcome::Again { .. }) => {
                    self.metrics.copy_retries.fetch_add(1, Relaxed);
                    self.global.copy_retries.fetch_add(1, Relaxed);
                    return Ok(Fill::Pending);
                }
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(Fill::Gone),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    tracing::debug!(
                        addr = format_args!("{at:#x}"),
                        "range unmapped while serving it"
                    );
                    return Ok(Fill::Dropped);
                }
                Err(source) => {
                    return Err(RestoreError::Fill {
                        addr: at,
                        len: len - done,
                        source,
                    })
                }
            }
        }
        Ok(Fill::Done { installed })
    }

    fn count_copied(&self, bytes: u64, from_file: bool) {
        if from_file && bytes > 0 {
            self.global.bytes_copied.fetch_add(bytes, Relaxed);
        }
    }

    /// Installs one slice of working set; returns an end if the VM is gone.
    fn prefetch_step(&mut self) -> Result<Option<RestoreEnd>, RestoreError> {
        if self.prefetch.is_empty() {
            return Ok(None);
        }
        let mut slice = Vec::new();
        let mut bytes = 0;
        let budget = self.slice_bytes;
        self.slice_bytes = (self.slice_bytes * 2).min(PREFETCH_SLICE_BYTES);
        while bytes < budget {
            let Some(mut chunk) = self.prefetch.pop_front() else {
                break;
            };
            let take = chunk.len.min(budget - bytes);
            if take < chunk.len {
                let mut rest = chunk;
                rest.advance(take);
                chunk.len = take;
                self.prefetch.push_front(rest);
            }
            bytes += take;
            slice.push(chunk);
        }
        let page_of = |c: &Chunk| self.table.regions()[c.region].page_size;
        let pieces = cut_into_pieces(slice, PREFETCH_PIECE, page_of);
        let threads = self.prefetch_threads.min(pieces.len());
        let ctx = Installer {
            uffd: self.uffd.as_fd(),
            memory: &self.memory,
            table: &self.table,
            removed: &self.removed,
            pieces: &pieces,
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        };
        let outcomes: Vec<Installed> = std::thread::scope(|scope| {
            let helpers: Vec<_> = (1..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut out = ctx.install();
                        // A fresh thread: its CPU clock is this slice's work.
                        out.cpu_ns = sys::thread_cpu_time().as_nanos() as u64;
                        out
                    })
                })
                .collect();
            let mut out = vec![ctx.install()];
            out.extend(
                helpers
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Installed::panicked())),
            );
            out
        });
        // Pieces nobody claimed (the threads stopped early) are left too.
        let claimed = ctx.next.into_inner().min(pieces.len());
        let mut leftovers = pieces[claimed..].to_vec();
        let mut gone = false;
        let mut error = None;
        for o in outcomes {
            self.metrics.cpu_ns.fetch_add(o.cpu_ns, Relaxed);
            self.metrics.prefetch_pages.fetch_add(o.pages, Relaxed);
            self.metrics.prefetch_bytes.fetch_add(o.bytes, Relaxed);
            self.metrics
                .faults_already_present
                .fetch_add(o.present, Relaxed);
            self.global
                .faults_already_present
                .fetch_add(o.present, Relaxed);
            self.global.prefetch_bytes.fetch_add(o.bytes, Relaxed);
            self.global.bytes_copied.fetch_add(o.bytes, Relaxed);
            if !o.leftover.is_empty() {
                self.metrics.copy_retries.fetch_add(1, Relaxed);
                self.global.copy_retries.fetch_add(1, Relaxed);
            }
            leftovers.extend(o.leftover);
            gone |= o.gone;
            error = error.or(o.error);
        }
        if let Some(e) = error {
            return Err(e);
        }
        if gone {
            return Ok(Some(RestoreEnd::GuestMemoryGone));
        }
        // Chunks interrupted by a pending event go back first, in order.
        leftovers.sort_by_key(|c| c.file_off);
        for chunk in leftovers.into_iter().rev() {
            self.prefetch.push_front(chunk);
        }
        if self.prefetch.is_empty() {
            for r in self.table.regions() {
                match sys::uffd_wake(self.uffd.as_fd(), r.base, r.size) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                        return Ok(Some(RestoreEnd::GuestMemoryGone))
                    }
                    Err(source) => {
                        return Err(RestoreError::Fill {
                            addr: r.base,
                            len: r.size,
                            source,
                        })
                    }
                }
            }
            if let Some(started) = self.prefetch_started.take() {
                let took = started.elapsed();
                self.metrics
                    .prefetch_ns
                    .store(took.as_nanos() as u64, Relaxed);
                self.global.prefetch_duration.observe(took);
            }
        }
        Ok(None)
    }
}

/// Read-only view of a restore shared by the threads installing one slice of
/// working set (no events are processed while they run), and the slice's
/// pieces, which the threads claim in order through `next`.
struct Installer<'a> {
    uffd: BorrowedFd<'a>,
    memory: &'a MemoryFile,
    table: &'a RegionTable,
    removed: &'a [Vec<u64>],
    pieces: &'a [Chunk],
    next: AtomicUsize,
    /// Set by a thread that must stop (pending event, VM gone, error) so the
    /// others stop claiming pieces too.
    stop: AtomicBool,
}

/// What one worker installed.
#[derive(Default)]
struct Installed {
    /// CPU time of the helper thread that installed this (0 for the
    /// serving thread, whose time is counted when the restore ends).
    cpu_ns: u64,
    pages: u64,
    bytes: u64,
    present: u64,
    leftover: Vec<Chunk>,
    gone: bool,
    error: Option<RestoreError>,
}

impl Installed {
    fn panicked() -> Self {
        Self {
            error: Some(RestoreError::Fill {
                addr: 0,
                len: 0,
                source: io::Error::other("a prefetch worker panicked"),
            }),
            ..Self::default()
        }
    }
}

impl Installer<'_> {
    fn is_removed(&self, region: usize, page: u64) -> bool {
        self.removed[region][(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Claims pieces until none is left and installs each with
    /// `UFFDIO_COPY_MODE_DONTWAKE`, skipping removed and already-present
    /// pages. Stops (and makes the other threads stop) at the first `EAGAIN`,
    /// a pending event the serving thread must read, returning the rest of
    /// its piece; pieces never claimed are the caller's to put back.
    fn install(&self) -> Installed {
        let mut out = Installed::default();
        while !self.stop.load(Relaxed) {
            let Some(&piece) = self.pieces.get(self.next.fetch_add(1, Relaxed)) else {
                break;
            };
            let mut chunk = piece;
            // Read (if cold) and map this piece of the file in one call
            // instead of one fault per few pages during the copies; the
            // threads do it in parallel, as fresh page-cache pages cost as
            // much as guest pages. Advisory: failure only costs speed.
            let _ = sys::populate_read(self.memory.ptr_at(chunk.file_off), chunk.len as usize);
            let r = self.table.regions()[chunk.region];
            while chunk.len > 0 {
                let first_page = (chunk.dst - r.base) / r.page_size;
                let pages = chunk.len / r.page_size;
                // Removed pages must read as zeros, not snapshot bytes: skip them.
                let skip = (0..pages)
                    .take_while(|p| self.is_removed(chunk.region, first_page + p))
                    .count() as u64;
                if skip > 0 {
                    chunk.advance(skip * r.page_size);
                    continue;
                }
                let run = (0..pages)
                    .take_while(|p| !self.is_removed(chunk.region, first_page + p))
                    .count() as u64
                    * r.page_size;
                let src = self.memory.ptr_at(chunk.file_off);
                match sys::uffd_copy(self.uffd, chunk.dst, src, run, true) {
                    Ok(FillOutcome::Filled(n)) => {
                        let n = if n == 0 { run } else { n };
                        out.bytes += n;
                        out.pages += n / r.page_size;
                        chunk.advance(n);
                    }
                    Ok(FillOutcome::Exists { filled }) => {
                        out.bytes += filled;
                        out.pages += filled / r.page_size;
                        out.present += 1;
                        chunk.advance(filled + r.page_size);
                    }
                    Ok(FillOutcome::Again { filled }) if filled > 0 => {
                        out.bytes += filled;
                        out.pages += filled / r.page_size;
                        chunk.advance(filled);
                    }
                    Ok(FillOutcome::Again { .. }) => {
                        out.leftover.push(chunk);
                        self.stop.store(true, Relaxed);
                        return out;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                        out.gone = true;
                        self.stop.store(true, Relaxed);
                        return out;
                    }
                    // Unmapped under us: nothing left to install there.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => chunk.len = 0,
                    Err(source) => {
                        out.error = Some(RestoreError::Fill {
                            addr: chunk.dst,
                            len: run,
                            source,
                        });
                        self.stop.store(true, Relaxed);
                        return out;
                    }
                }
            }
        }
        out
    }
}

/// Cuts a slice of chunks into pieces of at most `max` bytes (whole pages),
/// in order.
fn cut_into_pieces(chunks: Vec<Chunk>, max: u64, page_of: impl Fn(&Chunk) -> u64) -> Vec<Chunk> {
    let mut pieces = Vec::new();
    for mut chunk in chunks {
        let page = page_of(&chunk);
        let step = (max / page).max(1) * page;
        while chunk.len > 0 {
            let mut piece = chunk;
            piece.len = chunk.len.min(step);
            chunk.advance(piece.len);
            pieces.push(piece);
        }
    }
    pieces
}

impl Chunk {
    fn advance(&mut self, bytes: u64) {
        let bytes = bytes.min(self.len);
        self.dst += bytes;
        self.file_off += bytes;
        self.len -= bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(file_off: u64, len: u64) -> Chunk {
        Chunk {
            region: 0,
            dst: 0x7000_0000_0000 + file_off,
            file_off,
            len,
        }
    }

    /// The shares, in order, cover exactly the chunks' bytes, and each
    /// piece keeps its guest address and file offset in step.
    fn assert_covers(chunks: &[Chunk], shares: &[Vec<Chunk>]) {
        let flat: Vec<Chunk> = shares.iter().flatten().copied().collect();
        let mut expected = chunks.iter().copied();
        let mut current = expected.next();
        for piece in flat {
            let c = current.as_mut().expect("pieces beyond the chunks");
            assert_eq!((piece.dst, piece.file_off), (c.dst, c.file_off));
            assert!(piece.len > 0 && piece.len <= c.len);
            c.advance(piece.len);
            if c.len == 0 {
                current = expected.next();
            }
        }
        assert!(current.is_none(), "bytes left over: {current:?}");
    }

    #[test]
    fn a_slice_is_cut_into_page_aligned_pieces_in_order() {
        const PAGE: u64 = 4096;
        // One chunk shorter than a piece, one spanning several.
        let slice = vec![chunk(0, 3 * PAGE), chunk(4 << 20, 150 * PAGE)];
        let pieces = cut_into_pieces(slice.clone(), 64 * PAGE, |_| PAGE);
        let lens: Vec<u64> = pieces.iter().map(|p| p.len / PAGE).collect();
        assert_eq!(lens, [3, 64, 64, 22]);
        assert_covers(&slice, &[pieces]);
        // Pages larger than a piece: one page per piece.
        let huge = vec![chunk(0, 3 << 21)];
        let pieces = cut_into_pieces(huge.clone(), 64 * PAGE, |_| 2 << 20);
        assert_eq!(pieces.len(), 3);
        assert_covers(&huge, &[pieces]);
    }
}

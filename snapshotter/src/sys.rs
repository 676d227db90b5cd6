//! The userfaultfd ABI the page server speaks, typed, and the system calls
//! it shares with the rest of Kiln, re-exported from `kiln-sys` (descriptor
//! passing, peer credentials, pidfds, `poll`, eventfds, signals, memory
//! advice, anonymous mappings).
//!
//! It exists so that every `unsafe` block of the crate lives in one reviewed
//! place. The rest of the crate sees safe functions taking `BorrowedFd` and
//! returning `io::Result`. The userfaultfd ABI is declared here by hand (from
//! `include/uapi/linux/userfaultfd.h`) rather than through the `userfaultfd`
//! crate: we need `UFFDIO_COPY_MODE_DONTWAKE`, `UFFDIO_WAKE`, partial-copy
//! results, raw event reading on a fd we did not create, and the crate's
//! `-sys` build needs libclang at build time. Forty lines of ABI are cheaper.

use std::ffi::c_void;
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use kiln_sys::cvt;
pub use kiln_sys::eventfd::{eventfd, signal as eventfd_signal};
pub use kiln_sys::fd::set_nonblocking;
pub use kiln_sys::mmap::{madvise_dontneed, page_size, populate_read, AnonMapping};
pub use kiln_sys::pidfd::pidfd_open;
pub use kiln_sys::poll::poll as poll_fds;
pub use kiln_sys::poll::poll_borrowed as poll;
pub use kiln_sys::sock_ctrl_msg::{peer_cred, recv_with_fds, send_with_fds};

/// The userfaultfd API version (`UFFD_API` in the uapi header).
pub const UFFD_API: u64 = 0xAA;
/// Feature bit asking the kernel to report `madvise(MADV_DONTNEED/REMOVE)` as
/// `UFFD_EVENT_REMOVE` (`UFFD_FEATURE_EVENT_REMOVE`, bit 3).
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// Register mode: report faults on missing pages (`UFFDIO_REGISTER_MODE_MISSING`).
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// Copy mode: do not wake the faulting threads (`UFFDIO_COPY_MODE_DONTWAKE`).
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1;

/// Event code of a page fault message (`UFFD_EVENT_PAGEFAULT`).
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// Event code of a remove (madvise DONTNEED/REMOVE) message (`UFFD_EVENT_REMOVE`).
pub const UFFD_EVENT_REMOVE: u8 = 0x15;

// ioctl numbers: _IOWR/_IOR(UFFDIO = 0xAA, nr, struct), computed from the
// struct sizes in the uapi header (asserted below).
const UFFDIO_API: u64 = 0xC018_AA3F;
const UFFDIO_REGISTER: u64 = 0xC020_AA00;
const UFFDIO_WAKE: u64 = 0x8010_AA02;
const UFFDIO_COPY: u64 = 0xC028_AA03;
const UFFDIO_ZEROPAGE: u64 = 0xC020_AA04;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: 32 bytes, an event code and a 24-byte union.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawUffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioCopy>() == 40);
const _: () = assert!(size_of::<UffdioZeropage>() == 32);
const _: () = assert!(size_of::<RawUffdMsg>() == 32);

/// One message read from a userfaultfd, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    /// A thread touched a missing page at `address` (not page aligned).
    PageFault {
        /// The faulting address.
        address: u64,
    },
    /// `madvise(MADV_DONTNEED/MADV_REMOVE)` dropped `[start, end)`.
    Remove {
        /// First byte of the removed range.
        start: u64,
        /// One past the last byte of the removed range.
        end: u64,
    },
    /// Any other event (fork, remap, unmap) with its raw code.
    Other(u8),
}

/// The most messages [`uffd_read_events`] reads in one call.
pub const UFFD_READ_MAX: usize = 64;

/// Reads as many pending messages as fit in `out` from a non-blocking uffd
/// (at most `max`, at most [`UFFD_READ_MAX`]).
/// Returns the number decoded; 0 when nothing is pending.
pub fn uffd_read_events(
    uffd: BorrowedFd<'_>,
    out: &mut Vec<UffdEvent>,
    max: usize,
) -> io::Result<usize> {
    // On the stack: this runs once per fault wake-up, so no allocation.
    let mut buf = [MaybeUninit::<RawUffdMsg>::uninit(); UFFD_READ_MAX];
    let max = max.clamp(1, UFFD_READ_MAX);
    // SAFETY: `buf` has room for `max` messages; the kernel writes at
    // most that many bytes and only whole messages.
    let n = unsafe {
        libc::read(
            uffd.as_raw_fd(),
            buf.as_mut_ptr().cast::<c_void>(),
            max * size_of::<RawUffdMsg>(),
        )
    };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            return Ok(0);
        }
        return Err(err);
    }
    let count = n as usize / size_of::<RawUffdMsg>();
    for i in 0..count {
        // SAFETY: the kernel initialised the first `count` messages.
        let msg = unsafe { buf.as_ptr().add(i).read().assume_init() };
        out.push(match msg.event {
            UFFD_EVENT_PAGEFAULT => UffdEvent::PageFault {
                address: msg.arg[1],
            },
            UFFD_EVENT_REMOVE => UffdEvent::Remove {
                start: msg.arg[0],
                end: msg.arg[1],
            },
            other => UffdEvent::Other(other),
        });
    }
    Ok(count)
}

/// Outcome of one `UFFDIO_COPY` or `UFFDIO_ZEROPAGE` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillOutcome {
    /// This many bytes from the start of the range were filled (may be short).
    Filled(u64),
    /// The page at `start + filled` already exists; `filled` bytes before it were filled.
    Exists {
        /// Bytes filled before the existing page.
        filled: u64,
    },
    /// A non-cooperative event (e.g. remove) is pending: read events, then retry.
    Again {
        /// Bytes filled before the kernel asked us to retry.
        filled: u64,
    },
}

fn fill_result(ret: libc::c_int, reported: i64) -> io::Result<FillOutcome> {
    let filled = reported.max(0) as u64;
    if ret == 0 {
        return Ok(FillOutcome::Filled(filled));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok(FillOutcome::Exists { filled }),
        Some(libc::EAGAIN) => Ok(FillOutcome::Again { filled }),
        _ if reported == -(libc::EEXIST as i64) => Ok(FillOutcome::Exists { filled: 0 }),
        _ if reported == -(libc::EAGAIN as i64) => Ok(FillOutcome::Again { filled: 0 }),
        _ => Err(err),
    }
}

/// `UFFDIO_COPY`: atomically installs `len` bytes read from `src` at `dst`.
///
/// `src` must point to `len` readable bytes in this process (we pass pointers
/// into our own read-only file mapping or a zero buffer).
pub fn uffd_copy(
    uffd: BorrowedFd<'_>,
    dst: u64,
    src: *const u8,
    len: u64,
    dontwake: bool,
) -> io::Result<FillOutcome> {
    let mut arg = UffdioCopy {
        dst,
        src: src as u64,
        len,
        mode: if dontwake {
            UFFDIO_COPY_MODE_DONTWAKE
        } else {
            0
        },
        copy: 0,
    };
    // SAFETY: `arg` is a valid `uffdio_copy`; the kernel validates `dst`
    // against the registered ranges of the uffd's mm and reads `src` through
    // copy_from_user, so a bad pointer yields EFAULT, not memory unsafety here.
    let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &mut arg) };
    fill_result(ret, arg.copy)
}

/// `UFFDIO_ZEROPAGE`: maps zero pages over `[dst, dst + len)` and wakes waiters.
pub fn uffd_zeropage(uffd: BorrowedFd<'_>, dst: u64, len: u64) -> io::Result<FillOutcome> {
    let mut arg = UffdioZeropage {
        range: UffdioRange { start: dst, len },
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: `arg` is a valid `uffdio_zeropage` living for the call.
    let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut arg) };
    fill_result(ret, arg.zeropage)
}

/// `UFFDIO_WAKE`: wakes every thread waiting on a fault in `[start, start + len)`.
pub fn uffd_wake(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut arg = UffdioRange { start, len };
    // SAFETY: `arg` is a valid `uffdio_range` living for the call.
    cvt(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WAKE as _, &mut arg) }).map(drop)
}

/// Creates a non-blocking, close-on-exec userfaultfd with the remove event
/// enabled, as Firecracker does before a `Uffd` snapshot load.
pub fn uffd_create_like_firecracker() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer flags.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_EVENT_REMOVE,
        ioctls: 0,
    };
    // SAFETY: `api` is a valid `uffdio_api` living for the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) })?;
    Ok(fd)
}

/// `UFFDIO_REGISTER` in missing mode over `[start, start + len)`.
pub fn uffd_register(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut arg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: `arg` is a valid `uffdio_register` living for the call.
    cvt(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut arg) }).map(drop)
}

/// True when `fd` is a userfaultfd (its `/proc/self/fd` link names the anon inode).
pub fn is_userfaultfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|target| target.as_os_str() == "anon_inode:[userfaultfd]")
        .unwrap_or(false)
}

/// The signals that stop `kiln snapshot serve-pages`.
const TERMINATION: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// Blocks SIGINT and SIGTERM in the calling thread (and threads it spawns
/// afterwards), so that [`wait_for_termination_signal`] can collect them.
pub fn block_termination_signals() -> io::Result<()> {
    kiln_sys::signal::block(&TERMINATION)
}

/// Waits for SIGINT or SIGTERM (blocked beforehand) and returns its number.
pub fn wait_for_termination_signal() -> io::Result<i32> {
    kiln_sys::signal::wait(&TERMINATION)
}

/// CPU time the calling thread has used so far (`CLOCK_THREAD_CPUTIME_ID`:
/// user and system time, to the nanosecond). Zero if the clock cannot be
/// read, which Linux does not do for the calling thread.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if ret != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_cpu_time_counts_this_threads_work_only() {
        // Burn CPU here, then check that a fresh thread starts from (almost)
        // nothing while this one has the time it burned.
        let start = thread_cpu_time();
        let mut x = 0u64;
        let mut rounds = 0u64;
        while thread_cpu_time() - start < Duration::from_millis(20) && rounds < 1 << 32 {
            for i in 0..10_000u64 {
                x = x.wrapping_mul(31).wrapping_add(std::hint::black_box(i));
            }
            rounds += 1;
        }
        std::hint::black_box(x);
        let burned = thread_cpu_time() - start;
        assert!(burned >= Duration::from_millis(20), "burned {burned:?}");
        let fresh = std::thread::spawn(thread_cpu_time).join().unwrap();
        assert!(
            fresh < burned,
            "a new thread has used {fresh:?}, this one {burned:?}: the clock is not per thread"
        );
    }
}

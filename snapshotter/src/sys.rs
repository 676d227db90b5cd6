//! Thin, typed wrappers around the Linux system calls the page server needs:
//! the userfaultfd ioctls, unix-socket credential and file-descriptor passing,
//! pidfds, `poll`, `madvise` and signal masks.
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

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Reads as many pending messages as fit in `out` from a non-blocking uffd.
/// Returns the number decoded; 0 when nothing is pending.
pub fn uffd_read_events(
    uffd: BorrowedFd<'_>,
    out: &mut Vec<UffdEvent>,
    max: usize,
) -> io::Result<usize> {
    let mut buf: Vec<MaybeUninit<RawUffdMsg>> = Vec::with_capacity(max);
    // SAFETY: `buf` has capacity for `max` messages; the kernel writes at
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

/// Sets `O_NONBLOCK` on `fd` (poll on a blocking uffd always reports POLLERR).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd with integer arguments.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    }
    Ok(())
}

/// Credentials of the process at the other end of a unix socket (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id of the peer when it connected.
    pub pid: i32,
    /// Its user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
}

/// Reads `SO_PEERCRED` from a connected unix socket.
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Maximum number of descriptors we accept in one message; extras are closed.
const MAX_FDS: usize = 4;

/// Receives one message into `buf`, returning its length and every fd that
/// came with it as SCM_RIGHTS (closed on drop if unused).
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut cmsg_buf = [0u64; 16];
    // SAFETY: CMSG_SPACE only computes a size.
    let cmsg_space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize;
    debug_assert!(cmsg_space <= size_of::<[u64; 16]>());
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space as _;
    // SAFETY: `msg` points at `iov` (covering `buf`) and `cmsg_buf`, all of
    // which outlive the call and are sized as declared.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled in,
    // bounded by `msg_controllen`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..payload / size_of::<RawFd>() {
                    let fd = data.add(i).read_unaligned();
                    // The kernel installed this fd for us; we own it now.
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control message truncated: more descriptors than expected",
        ));
    }
    Ok((n as usize, fds))
}

/// Sends `data` in one `sendmsg`, with `fd` attached as SCM_RIGHTS when given.
pub fn send_with_fd(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<usize> {
    let mut cmsg_buf = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: the control buffer is 32 bytes, enough for one cmsghdr with
        // one int (CMSG_SPACE(4) == 24); we fill exactly that header.
        unsafe {
            msg.msg_control = cmsg_buf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(size_of::<RawFd>() as u32) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
            libc::CMSG_DATA(cmsg)
                .cast::<RawFd>()
                .write_unaligned(fd.as_raw_fd());
        }
    }
    // SAFETY: `msg` references `iov` and `cmsg_buf`, valid for the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Opens a pidfd for `pid`; it polls readable once the process has exited.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A non-blocking eventfd, used to wake poll loops on shutdown.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer flags.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes an eventfd readable (wakes every poller).
pub fn eventfd_signal(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `poll(2)` over `(fd, events)` pairs; returns each fd's `revents`.
/// `None` waits forever. EINTR is reported as "nothing ready".
pub fn poll(fds: &[(BorrowedFd<'_>, i16)], timeout: Option<Duration>) -> io::Result<Vec<i16>> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|(fd, events)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: *events,
            revents: 0,
        })
        .collect();
    let timeout_ms = match timeout {
        None => -1,
        Some(d) => d.as_millis().min(i32::MAX as u128) as i32,
    };
    // SAFETY: `pollfds` is a live array of `len` pollfd structs.
    let ret = unsafe {
        libc::poll(
            pollfds.as_mut_ptr(),
            pollfds.len() as libc::nfds_t,
            timeout_ms,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![0; fds.len()]);
        }
        return Err(err);
    }
    Ok(pollfds.iter().map(|p| p.revents).collect())
}

/// `madvise(MADV_POPULATE_READ)`: faults `[addr, addr + len)` of our own file
/// mapping in, reading the file with large requests. Falls back to
/// `MADV_WILLNEED` on kernels older than 5.14.
pub fn populate_read(addr: *const u8, len: usize) -> io::Result<()> {
    // SAFETY: advice only; the range lies in a live mapping owned by the
    // caller, and POPULATE_READ never writes to it.
    let ret = unsafe { libc::madvise(addr as *mut c_void, len, libc::MADV_POPULATE_READ) };
    if ret == 0 {
        return Ok(());
    }
    // SAFETY: as above; WILLNEED only starts readahead.
    cvt(unsafe { libc::madvise(addr as *mut c_void, len, libc::MADV_WILLNEED) }).map(drop)
}

/// `madvise(MADV_DONTNEED)` over a range of an anonymous mapping: the VMM's
/// balloon path, which raises `UFFD_EVENT_REMOVE` on a registered range.
///
/// # Safety
/// The range must be a mapping owned by the caller whose contents nobody
/// holds references into (they are discarded).
pub unsafe fn madvise_dontneed(addr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    cvt(unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTNEED) }).map(drop)
}

/// An anonymous private read-write mapping, unmapped on drop: the stand-in
/// for a VMM's guest memory.
#[derive(Debug)]
pub struct AnonMapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; access is through raw pointers whose
// synchronisation is the users' concern (the kernel serialises faults).
unsafe impl Send for AnonMapping {}
// SAFETY: as above.
unsafe impl Sync for AnonMapping {}

impl AnonMapping {
    /// Maps `len` bytes (page multiple) of anonymous memory, not populated.
    pub fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: addr.cast(),
            len,
        })
    }

    /// First byte of the mapping.
    pub fn addr(&self) -> *mut u8 {
        self.addr
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread (and threads it spawns
/// afterwards), so that `wait_for_termination_signal` can collect them.
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_set();
    // SAFETY: `set` is an initialised sigset.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Waits for SIGINT or SIGTERM (blocked beforehand) and returns its number.
pub fn wait_for_termination_signal() -> io::Result<i32> {
    let set = termination_set();
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised, `sig` is a valid out pointer.
    let ret = unsafe { libc::sigwait(&set, &mut sig) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(sig)
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset uses it.
    unsafe {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGINT);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGTERM);
        set.assume_init()
    }
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf with a constant name has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size <= 0 {
        4096
    } else {
        size as usize
    }
}

//! Thin, safe wrappers over the Linux system calls the agent needs and `std`
//! does not offer: poll(2), signalfd(2), wait4(2), openat2(2), setfsuid(2),
//! AF_VSOCK sockets. Every `unsafe` block of the agent outside the forked
//! child lives here.

use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Maps a `-1` return to the current `errno`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Retries a call interrupted by a signal.
fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// A pipe as `(read end, write end)`, both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn update_fl(fd: RawFd, get: libc::c_int, set: libc::c_int, flag: libc::c_int) -> io::Result<()> {
    // SAFETY: F_GETFL/F_GETFD take no argument and only read fd state.
    let old = cvt(unsafe { libc::fcntl(fd, get) })?;
    // SAFETY: F_SETFL/F_SETFD with an int argument.
    cvt(unsafe { libc::fcntl(fd, set, old | flag) })?;
    Ok(())
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    update_fl(fd, libc::F_GETFL, libc::F_SETFL, libc::O_NONBLOCK)
}

pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    update_fl(fd, libc::F_GETFD, libc::F_SETFD, libc::FD_CLOEXEC)
}

/// Whether `fd` is an open file descriptor.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// read(2) into `buf`; `Ok(0)` is end of file.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    retry(|| {
        // SAFETY: `buf` is valid writable memory of `buf.len()` bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
}

/// write(2) from `buf`.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    retry(|| {
        // SAFETY: `buf` is valid readable memory of `buf.len()` bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
}

/// poll(2) over `fds`, waiting at most `timeout` (forever if `None`).
/// Returns the number of ready entries; an interrupted wait returns 0.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = match timeout {
        None => -1,
        Some(d) => d.as_millis().min(i32::MAX as u128) as libc::c_int,
    };
    // SAFETY: `fds` is a valid slice of pollfd structures.
    match cvt(unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) }) {
        Ok(n) => Ok(n as usize),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
        Err(e) => Err(e),
    }
}

/// The signals the agent handles through its signalfd.
pub const HANDLED_SIGNALS: [libc::c_int; 4] =
    [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Blocks [`HANDLED_SIGNALS`] and returns a non-blocking signalfd that
/// reports them. Children must unblock them again (see `spawn`).
pub fn block_signals_into_signalfd() -> io::Result<OwnedFd> {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset/sigprocmask/signalfd
    // only read it afterwards.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for s in HANDLED_SIGNALS {
            libc::sigaddset(set.as_mut_ptr(), s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = cvt(libc::signalfd(
            -1,
            set.as_ptr(),
            libc::SFD_NONBLOCK | libc::SFD_CLOEXEC,
        ))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Reads every pending signal from a signalfd.
pub fn read_signals(fd: RawFd) -> Vec<libc::c_int> {
    let mut out = Vec::new();
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    loop {
        let mut info = MaybeUninit::<libc::signalfd_siginfo>::zeroed();
        // SAFETY: the buffer is exactly one signalfd_siginfo.
        let n = unsafe { libc::read(fd, info.as_mut_ptr().cast(), size) };
        if n != size as isize {
            return out;
        }
        // SAFETY: the kernel filled the whole structure.
        out.push(unsafe { info.assume_init() }.ssi_signo as libc::c_int);
    }
}

/// How a reaped process ended, with its resource usage.
#[derive(Debug, Clone, Copy)]
pub struct Reaped {
    pub pid: i32,
    pub status: libc::c_int,
    pub rusage: libc::rusage,
}

/// Reaps one terminated child without blocking (`wait4(-1, WNOHANG)`).
pub fn reap_one() -> Option<Reaped> {
    let mut status = 0;
    let mut ru = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: both out-pointers are valid for writes.
    let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, ru.as_mut_ptr()) };
    if pid <= 0 {
        return None;
    }
    Some(Reaped {
        pid,
        status,
        // SAFETY: zero-initialised and filled by the kernel on success.
        rusage: unsafe { ru.assume_init() },
    })
}

/// Sends `sig` to process group `pgid` (`kill(-pgid, sig)`); a group that
/// no longer exists is not an error.
pub fn kill_group(pgid: i32, sig: libc::c_int) {
    if pgid > 1 {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(-pgid, sig) };
    }
}

/// Sends SIGKILL to every process the agent may signal (PID 1 only).
pub fn kill_everything() {
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(-1, libc::SIGKILL) };
}

pub fn getpid() -> u32 {
    std::process::id()
}

/// Makes this process the reaper of its orphaned descendants.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag.
    cvt(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) })?;
    Ok(())
}

/// Opens `path` (relative) beneath `dir` with openat2(2): no `..` escape, no
/// absolute symlinks, no /proc magic links (RESOLVE_BENEATH |
/// RESOLVE_NO_MAGICLINKS).
pub fn open_beneath(
    dir: RawFd,
    path: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        mode as u64
    } else {
        0
    };
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    let fd = retry(|| {
        // SAFETY: `path` is NUL-terminated and `how` is a valid open_how of
        // the size passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as RawFd)
        }
    })?;
    // SAFETY: openat2 returned a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates directory `name` in `dir`; an existing entry is not an error.
pub fn mkdir_at(dir: RawFd, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    match cvt(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other.map(drop),
    }
}

pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `st` is valid for writes.
    cvt(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded and filled the structure.
    Ok(unsafe { st.assume_init() })
}

pub fn fchmod(fd: RawFd, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: no memory arguments.
    cvt(unsafe { libc::fchmod(fd, mode) }).map(drop)
}

pub fn fchown(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: no memory arguments.
    cvt(unsafe { libc::fchown(fd, uid, gid) }).map(drop)
}

/// Runs filesystem work as `uid`/`gid` (the fs ids only: permission checks
/// and ownership of created files), restoring the previous ids afterwards.
pub struct FsIdentity {
    old_uid: u32,
    old_gid: u32,
}

impl FsIdentity {
    #[must_use = "the identity is restored when the guard drops"]
    pub fn assume(uid: u32, gid: u32) -> Self {
        // SAFETY: setfsgid/setfsuid have no memory effects; they return the
        // previous id whether or not the change succeeded.
        let old_gid = unsafe { libc::setfsgid(gid) } as u32;
        let old_uid = unsafe { libc::setfsuid(uid) } as u32;
        Self { old_uid, old_gid }
    }
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        // SAFETY: as in `assume`.
        unsafe {
            libc::setfsuid(self.old_uid);
            libc::setfsgid(self.old_gid);
        }
    }
}

/// A listening AF_VSOCK stream socket on `port`, any CID.
pub fn vsock_listen(cid: u32, port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket returned a fresh descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: `addr` is a valid sockaddr_vm of the size passed.
    cvt(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    // SAFETY: no memory arguments.
    cvt(unsafe { libc::listen(sock.as_raw_fd(), 4) })?;
    Ok(sock)
}

/// Accepts one connection (close-on-exec) from a listening socket.
pub fn accept(listener: RawFd) -> io::Result<OwnedFd> {
    let fd = retry(|| {
        // SAFETY: null address pointers are allowed by accept4.
        cvt(unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })
    })?;
    // SAFETY: accept4 returned a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

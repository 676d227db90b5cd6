//! Thin, safe wrappers over the Linux system calls the agent needs and `std`
//! does not offer: wait4(2), openat2(2), setfsuid(2), mount API, AF_VSOCK
//! sockets; and, re-exported from `kiln-sys` (which the sandbox crate and
//! the page server share), pipes, poll(2), signalfd(2), pidfds and
//! descriptor passing. Every `unsafe` block of the agent outside the
//! forked child lives here.

use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub use kiln_sys::fd::{is_open as fd_is_open, pipe, set_cloexec, set_nonblocking};
pub use kiln_sys::pidfd::pidfd_open;
pub use kiln_sys::poll::{poll, wait_readable};
pub use kiln_sys::sock_ctrl_msg::{send_with_fds, seqpacket_pair};
use kiln_sys::{cvt, retry_eintr as retry};

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

/// The signals the agent handles through its signalfd.
pub const HANDLED_SIGNALS: [libc::c_int; 4] =
    [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Blocks [`HANDLED_SIGNALS`] and returns a non-blocking signalfd that
/// reports them. Children must unblock them again (see `spawn`).
pub fn block_signals_into_signalfd() -> io::Result<OwnedFd> {
    kiln_sys::signal::block_into_signalfd(&HANDLED_SIGNALS)
}

pub use kiln_sys::signal::read_signalfd as read_signals;

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
    // SAFETY: open_how is plain data, valid when zeroed.
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
        // SAFETY: as above.
        let old_uid = unsafe { libc::setfsuid(uid) } as u32;
        Self { old_uid, old_gid }
    }
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        // SAFETY: as in `assume`; prctl takes integers.
        unsafe {
            libc::setfsuid(self.old_uid);
            libc::setfsgid(self.old_gid);
            // A change of the fs ids clears "dumpable" (commit_creds), and
            // a room's holder shares the agent's memory, whose flag that is:
            // a non-dumpable holder cannot be entered with setns through
            // its pidfd (see `room`). Nothing but the agent's own user can
            // use the flag, and that user is trusted.
            libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
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
    // SAFETY: sockaddr_vm is plain data, valid when zeroed.
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

/// `fsopen`/`fsconfig`/`fsmount` flags and commands (linux/mount.h).
const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;

/// A new tmpfs with the given mount options (`size`, `mode`, `uid`...), as a
/// detached mount: a descriptor of its root that is attached nowhere until
/// someone `move_mount`s it (see `room`). It is `nosuid,nodev`.
pub fn detached_tmpfs(options: &[(&CStr, &CStr)]) -> io::Result<OwnedFd> {
    let raw = |r: libc::c_long| -> io::Result<RawFd> {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as RawFd)
        }
    };
    // SAFETY: fsopen takes a NUL-terminated name; it returns a new fd.
    let fs = raw(unsafe { libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), FSOPEN_CLOEXEC) })?;
    // SAFETY: fsopen returned a fresh descriptor.
    let fs = unsafe { OwnedFd::from_raw_fd(fs) };
    for (key, value) in options {
        // SAFETY: key and value are NUL-terminated strings.
        raw(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        })?;
    }
    // SAFETY: no memory arguments.
    raw(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    })?;
    // SAFETY: no memory arguments; returns a new fd.
    let mnt = raw(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        )
    })?;
    // SAFETY: fsmount returned a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(mnt) })
}

/// setns(2): moves this process into the namespaces `nstype` (CLONE_NEW*
/// flags) of the process behind the pidfd `fd`, or of the namespace fd.
pub fn setns(fd: RawFd, nstype: libc::c_int) -> io::Result<()> {
    // SAFETY: no memory arguments.
    cvt(unsafe { libc::setns(fd, nstype) }).map(drop)
}

/// Opens this process's own pid namespace, to come back to it after a
/// `setns(room, CLONE_NEWPID)` (which only changes where children go).
pub fn own_pid_namespace() -> io::Result<OwnedFd> {
    std::fs::File::open("/proc/self/ns/pid").map(OwnedFd::from)
}

//! Rooms: the namespaces a lease's jobs run in.
//!
//! A jail outlives many leases: between two of them the host sends `Reset`,
//! and everything the first lease's jobs could change must be gone before
//! the second begins. Jobs therefore never run in the jail's own
//! namespaces but in a *room*: new pid, mount, network and IPC namespaces
//! with a fresh tmpfs on the work directory, `/tmp` and `/dev/shm`, a fresh
//! `/proc` that shows only the room's processes, and a network namespace
//! with only a loopback interface. Its pid 1 is the *holder*, a copy of the
//! agent cloned into the new namespaces that mounts them and then only
//! reaps. Killing the holder makes the kernel kill every process of the room
//! (the room's pid namespace dies with its init), and with the last process
//! the mount, network and IPC namespaces go too: files, sockets in any
//! state (TIME_WAIT included), System V and POSIX IPC objects. What the
//! jobs shared with the jail is only what they cannot change: the
//! read-only root, the device nodes, the user namespace (whose keyrings the
//! seccomp filter keeps them from), and the cgroup, whose counters the host
//! resets.
//!
//! The work directory is a detached tmpfs made with the new mount API
//! (`fsmount`): the agent keeps a descriptor of its root, through which it
//! writes and reads the job's files, and the holder attaches it in the room.
//!
//! Job processes enter a room with `setns` on the holder's pidfd (see
//! `spawn` and `zygote`) and are the agent's children, so that the agent
//! reaps them as it reaps any exec; orphans inside the room are the
//! holder's.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::sys;

/// The namespaces a room has of its own.
pub const ROOM_NAMESPACES: libc::c_int =
    libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC;

/// What a process entering a room joins itself; the pid namespace is
/// joined for its children, by whoever forks them.
pub const ENTER_NAMESPACES: libc::c_int =
    libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC;

/// How long a holder may take to set its room up (a handful of mounts).
const HOLDER_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// `MOVE_MOUNT_F_EMPTY_PATH` (linux/mount.h).
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Why a room could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    /// The work directory's tmpfs could not be made.
    #[error("making the room's work directory tmpfs failed: {0}")]
    Workdir(#[source] io::Error),
    /// The holder could not be cloned.
    #[error("cloning the room's holder failed: {0}")]
    Clone(#[source] io::Error),
    /// The holder failed at one of its set-up steps.
    #[error("the room's holder failed to {step}: {source}")]
    Setup {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    /// The holder did not report back in time.
    #[error("the room's holder did not finish its set-up within {0:?}")]
    Timeout(Duration),
    /// A pidfd for the holder could not be had.
    #[error("opening a pidfd for the room's holder failed: {0}")]
    Pidfd(#[source] io::Error),
    /// The plan itself is unusable.
    #[error("{0}")]
    Plan(String),
}

/// What every room of a sandbox looks like; prepared once at `Hello`.
#[derive(Debug)]
pub struct RoomPlan {
    workdir: CString,
    work_options: Vec<(CString, CString)>,
    scratch_options: CString,
    loopback: bool,
}

impl RoomPlan {
    /// Rooms with `workdir` (absolute) owned by `uid`/`gid`, and `/tmp`,
    /// `/dev/shm` and the work directory `disk_mb` MiB each.
    pub fn new(
        workdir: &str,
        uid: u32,
        gid: u32,
        disk_mb: u64,
        loopback: bool,
    ) -> Result<Self, RoomError> {
        if !workdir.starts_with('/') || workdir == "/" {
            return Err(RoomError::Plan(format!(
                "workdir {workdir:?} must be an absolute path below /"
            )));
        }
        for scratch in SCRATCH {
            let s = scratch.to_str().expect("ASCII");
            if workdir == s || workdir.starts_with(&format!("{s}/")) {
                return Err(RoomError::Plan(format!(
                    "workdir {workdir:?} lies in {s}, which each room mounts afresh"
                )));
            }
        }
        let c = |s: String| CString::new(s).expect("no NUL in numbers");
        let workdir = CString::new(workdir)
            .map_err(|_| RoomError::Plan(format!("workdir {workdir:?} contains NUL")))?;
        Ok(Self {
            workdir,
            work_options: vec![
                (c"size".into(), c(format!("{disk_mb}m"))),
                (c"mode".into(), c"0755".into()),
                (c"uid".into(), c(uid.to_string())),
                (c"gid".into(), c(gid.to_string())),
            ],
            scratch_options: c(format!("mode=1777,size={disk_mb}m")),
            loopback,
        })
    }
}

/// Directories every room mounts a fresh tmpfs on, besides the work
/// directory.
const SCRATCH: [&CStr; 2] = [c"/tmp", c"/dev/shm"];

/// The holder's set-up steps, by the number it reports on failure.
const STEPS: [&str; 8] = [
    "make itself dumpable",
    "make its mounts private",
    "attach the work directory",
    "mount a tmpfs on /tmp",
    "mount a tmpfs on /dev/shm",
    "mount a fresh /proc",
    "bring loopback up",
    "block SIGCHLD",
];

/// A live room.
#[derive(Debug)]
pub struct Room {
    holder: i32,
    pidfd: OwnedFd,
    work: OwnedFd,
}

impl Room {
    /// Makes a room: its work tmpfs, then the holder, which mounts the rest.
    /// Returns once the holder is ready, so that the room can be entered.
    pub fn create(plan: &RoomPlan) -> Result<Room, RoomError> {
        let opts: Vec<(&CStr, &CStr)> = plan
            .work_options
            .iter()
            .map(|(k, v)| (k.as_c_str(), v.as_c_str()))
            .collect();
        let work = sys::detached_tmpfs(&opts).map_err(RoomError::Workdir)?;
        let (report_r, report_w) = sys::pipe().map_err(RoomError::Clone)?;
        let ctx = HolderCtx {
            plan,
            work: work.as_raw_fd(),
            report: report_w.as_raw_fd(),
        };
        // SAFETY: clone without CLONE_VM and without a new stack is fork with
        // namespace flags: the child runs on a copy of this stack and memory.
        // The agent is single-threaded, and the child only makes raw system
        // calls on data prepared above before it `_exit`s (`holder_main`).
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (ROOM_NAMESPACES | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        if pid < 0 {
            return Err(RoomError::Clone(io::Error::last_os_error()));
        }
        if pid == 0 {
            // SAFETY: see above; never returns.
            unsafe { holder_main(&ctx) }
        }
        let holder = pid as i32;
        drop(report_w);
        let fail = |e: RoomError| {
            // SAFETY: the holder is our child and not reaped yet.
            unsafe {
                libc::kill(holder, libc::SIGKILL);
                libc::waitpid(holder, std::ptr::null_mut(), 0);
            }
            e
        };
        match read_report(report_r.as_raw_fd()) {
            Ok(()) => {}
            Err(e) => return Err(fail(e)),
        }
        let pidfd = sys::pidfd_open(holder).map_err(|e| fail(RoomError::Pidfd(e)))?;
        Ok(Room {
            holder,
            pidfd,
            work,
        })
    }

    /// The holder's pid (the room's pid 1), as the agent sees it.
    pub fn holder(&self) -> i32 {
        self.holder
    }

    /// A pidfd of the holder, for `setns` into the room.
    pub fn pidfd(&self) -> RawFd {
        self.pidfd.as_raw_fd()
    }

    /// The root of the room's work directory.
    pub fn work(&self) -> RawFd {
        self.work.as_raw_fd()
    }

    /// Kills the holder, and with it every process of the room. The agent
    /// still has to reap the holder: it finishes dying only once the room's
    /// processes whose parent is the agent have been reaped too.
    pub fn kill(&self) {
        // SAFETY: pidfd_send_signal with a pidfd we own and no siginfo; it
        // cannot hit a reused pid.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }
}

/// Waits for the holder's report: end of file is success, 8 bytes are the
/// failed step and its errno.
fn read_report(fd: RawFd) -> Result<(), RoomError> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match sys::wait_readable(fd, HOLDER_READY_TIMEOUT) {
            Ok(true) => {}
            Ok(false) => return Err(RoomError::Timeout(HOLDER_READY_TIMEOUT)),
            Err(e) => return Err(RoomError::Clone(e)),
        }
        match sys::read(fd, &mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(()),
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(RoomError::Clone(e)),
        }
    }
    let step = u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    let errno = i32::from_ne_bytes(buf[4..].try_into().expect("4 bytes"));
    Err(RoomError::Setup {
        step: STEPS.get(step).copied().unwrap_or("set up"),
        source: io::Error::from_raw_os_error(errno),
    })
}

/// Everything the holder needs, prepared before the clone.
struct HolderCtx<'a> {
    plan: &'a RoomPlan,
    work: RawFd,
    report: RawFd,
}

/// The holder: sets the room up, reports, then reaps the room's orphans
/// until it is killed.
///
/// # Safety
///
/// Runs in the child of `clone` (see `Room::create`): only raw system calls
/// on the prepared context; no allocation, no locks, no unwinding.
unsafe fn holder_main(ctx: &HolderCtx) -> ! {
    let fail = |step: u32| -> ! {
        let e = *libc::__errno_location();
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&step.to_ne_bytes());
        buf[4..].copy_from_slice(&e.to_ne_bytes());
        libc::write(ctx.report, buf.as_ptr().cast(), 8);
        libc::_exit(127)
    };
    // Whoever enters the room does so with setns on a pidfd of the holder,
    // which needs ptrace-read access to it. The agent may have lost
    // "dumpable" (a change of its fs uid for a job's files clears it, and
    // the clone inherits that), and without CAP_SYS_PTRACE that access is
    // refused: EPERM for every namespace.
    if libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0 {
        fail(0);
    }
    // Nothing mounted here may reach the jail's (or the host's) mounts.
    if libc::mount(
        std::ptr::null(),
        c"/".as_ptr(),
        std::ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ) != 0
    {
        fail(1);
    }
    if libc::syscall(
        libc::SYS_move_mount,
        ctx.work,
        c"".as_ptr(),
        libc::AT_FDCWD,
        ctx.plan.workdir.as_ptr(),
        MOVE_MOUNT_F_EMPTY_PATH,
    ) != 0
    {
        fail(2);
    }
    for (i, dir) in SCRATCH.iter().enumerate() {
        if libc::mount(
            c"tmpfs".as_ptr(),
            dir.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            ctx.plan.scratch_options.as_ptr().cast(),
        ) != 0
        {
            fail(3 + i as u32);
        }
    }
    if libc::mount(
        c"proc".as_ptr(),
        c"/proc".as_ptr(),
        c"proc".as_ptr(),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        std::ptr::null(),
    ) != 0
    {
        fail(5);
    }
    if ctx.plan.loopback && !loopback_up() {
        fail(6);
    }
    // SIGCHLD stays blocked so that sigwaitinfo below can wait for it.
    let mut chld: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut chld);
    libc::sigaddset(&mut chld, libc::SIGCHLD);
    if libc::sigprocmask(libc::SIG_BLOCK, &chld, std::ptr::null_mut()) != 0 {
        fail(7);
    }
    // Keep nothing of the agent's: not its host socket, not the pipes of
    // its execs. Closing the report pipe last tells the agent we are ready.
    libc::close_range(0, (ctx.report - 1) as libc::c_uint, 0);
    libc::close_range((ctx.report + 1) as libc::c_uint, libc::c_uint::MAX, 0);
    libc::close(ctx.report);
    loop {
        while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL) > 0 {}
        libc::sigwaitinfo(&chld, std::ptr::null_mut());
    }
}

/// Sets IFF_UP on `lo` in the room's network namespace (it starts down).
///
/// # Safety
///
/// Raw socket/ioctl calls on a stack `ifreq`; callable between clone and
/// exit.
unsafe fn loopback_up() -> bool {
    let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
    if s < 0 {
        return false;
    }
    let mut req: libc::ifreq = std::mem::zeroed();
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    let ok = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) == 0 && {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        libc::ioctl(s, libc::SIOCSIFFLAGS, &req) == 0
    };
    libc::close(s);
    ok
}

/// Restores this process's own pid namespace for its children when dropped,
/// after [`enter_for_children`] pointed them into a room.
pub struct ChildrenInRoom<'a> {
    own: &'a OwnedFd,
}

/// Makes the processes this one forks next start in `room`'s pid
/// namespace (setns with CLONE_NEWPID changes only where children go), until
/// the guard drops.
pub fn enter_for_children<'a>(room: &Room, own: &'a OwnedFd) -> io::Result<ChildrenInRoom<'a>> {
    sys::setns(room.pidfd(), libc::CLONE_NEWPID)?;
    Ok(ChildrenInRoom { own })
}

impl Drop for ChildrenInRoom<'_> {
    fn drop(&mut self) {
        if let Err(e) = sys::setns(self.own.as_raw_fd(), libc::CLONE_NEWPID) {
            // Every later room would nest inside this one: nothing the agent
            // can go on from.
            crate::log_error!("cannot return to the agent's own pid namespace: {e}");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workdir_inside_a_scratch_directory_is_refused() {
        for bad in ["/tmp", "/tmp/w", "/dev/shm/x", "relative", "/"] {
            let e = RoomPlan::new(bad, 1000, 1000, 8, true).unwrap_err();
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
        assert!(RoomPlan::new("/work", 1000, 1000, 8, true).is_ok());
        assert!(RoomPlan::new("/tmpwork", 1000, 1000, 8, true).is_ok());
    }
}

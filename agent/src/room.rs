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
//! One exception to "new": a room whose jobs never used the network (not
//! one packet sent or received, over IPv4 or IPv6: every counter of its
//! `/proc/net/snmp` and `snmp6` still zero once its processes are gone)
//! passes its network namespace on to the next room. A socket that only
//! bound a port and closed leaves nothing behind, and anything that could
//! (a connection, with its TIME_WAIT, its ephemeral-port hint, any
//! datagram) moves a counter. Making a network namespace (sysctl tables, a
//! loopback device, IPv6 set-up) and its deferred clean-up were a seventh
//! of all the CPU a trivial job cost.
//!
//! The work directory is a detached tmpfs made with the new mount API
//! (`fsmount`): the agent keeps a descriptor of its root, through which it
//! writes and reads the job's files, and the holder attaches it in the room.
//!
//! Job processes enter a room with `setns` on the holder's pidfd (see
//! `spawn` and `zygote`) and are the agent's children, so that the agent
//! reaps them as it reaps any exec; orphans inside the room are the
//! holder's.
//!
//! The holder shares the agent's memory (`CLONE_VM`, on a stack of its
//! own): a fork-like copy made every page of the agent copy-on-write, and
//! the agent paid for that with a page fault on each page it wrote after
//! every reset. Sharing memory, the holder must not touch anything the
//! agent uses: it makes its system calls directly (`raw`), never through
//! libc (whose `errno` lives in the agent's thread-local storage), reads its
//! plan only until it reports, and from then on only its own stack.

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
    /// The holder's network namespace or its traffic counters could not be
    /// opened.
    #[error(
        "opening the room's network namespace files (/proc/{holder}/ns/net, net/snmp, net/snmp6) failed: {source}"
    )]
    Net {
        holder: i32,
        #[source]
        source: io::Error,
    },
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
const STEPS: [&str; 9] = [
    "enter the previous room's network namespace",
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
    stack: HolderStack,
    net: RoomNet,
}

/// A room's network namespace, and its traffic counters, kept open so that
/// they can be read after the room's processes are gone.
#[derive(Debug)]
pub struct RoomNet {
    ns: OwnedFd,
    snmp: std::fs::File,
    snmp6: std::fs::File,
}

impl RoomNet {
    fn open(holder: i32) -> io::Result<Self> {
        let open = |what: &str| std::fs::File::open(format!("/proc/{holder}/{what}"));
        Ok(Self {
            ns: open("ns/net")?.into(),
            snmp: open("net/snmp")?,
            snmp6: open("net/snmp6")?,
        })
    }

    /// Whether not one packet went through this namespace: every traffic
    /// counter of `snmp` (the `Ip`, `Icmp`, `IcmpMsg`, `Tcp`, `Udp`, `UdpLite`
    /// tables, but the constants among them) and of `snmp6` is zero.
    fn untouched(&self) -> bool {
        let check = |f: &std::fs::File, untouched: fn(&str) -> bool| -> bool {
            let mut buf = vec![0u8; 64 * 1024];
            let Ok(n) = std::os::unix::fs::FileExt::read_at(f, &mut buf, 0) else {
                return false;
            };
            std::str::from_utf8(&buf[..n]).is_ok_and(untouched)
        };
        check(&self.snmp, snmp_untouched) && check(&self.snmp6, snmp6_untouched)
    }
}

/// Fields of `/proc/net/snmp` that are settings, not counters.
const SNMP_CONSTANTS: [&str; 6] = [
    "Forwarding",
    "DefaultTTL",
    "RtoAlgorithm",
    "RtoMin",
    "RtoMax",
    "MaxConn",
];

/// `/proc/net/snmp` comes in pairs of lines: `Table: names...`, then
/// `Table: values...`.
fn snmp_untouched(text: &str) -> bool {
    let lines: Vec<&str> = text.lines().collect();
    let mut pairs = lines.chunks_exact(2);
    if lines.is_empty() || !pairs.remainder().is_empty() {
        return false;
    }
    pairs.all(|pair| {
        let names = pair[0].split_whitespace().skip(1);
        let values = pair[1].split_whitespace().skip(1);
        names
            .zip(values)
            .all(|(n, v)| SNMP_CONSTANTS.contains(&n) || v == "0")
    })
}

/// `/proc/net/snmp6` is `name value` lines.
fn snmp6_untouched(text: &str) -> bool {
    !text.is_empty()
        && text
            .lines()
            .all(|l| l.split_whitespace().nth(1).is_none_or(|v| v == "0"))
}

/// Bytes of the holder's stack (it needs a few hundred).
const HOLDER_STACK_BYTES: usize = 64 * 1024;

/// The holder's stack: an anonymous mapping with a guard page below it. It
/// may be unmapped only once the holder is gone, so a room dropped with its
/// holder possibly alive leaves it mapped (64 KiB, on a path that ends the
/// agent or its connection anyway).
#[derive(Debug)]
struct HolderStack {
    base: *mut libc::c_void,
    len: usize,
    holder_reaped: bool,
}

impl HolderStack {
    fn new() -> io::Result<Self> {
        let len = HOLDER_STACK_BYTES + 4096;
        // SAFETY: a fresh anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the lowest page of the mapping just made.
        if unsafe { libc::mprotect(base, 4096, libc::PROT_NONE) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: unmapping what was just mapped.
            unsafe { libc::munmap(base, len) };
            return Err(e);
        }
        Ok(Self {
            base,
            len,
            holder_reaped: false,
        })
    }

    /// The initial stack pointer: the mapping's end, 16-byte aligned.
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping, which is page aligned.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for HolderStack {
    fn drop(&mut self) {
        if self.holder_reaped {
            // SAFETY: the only user of the mapping, the holder, is gone.
            unsafe { libc::munmap(self.base, self.len) };
        }
    }
}

impl Room {
    /// Makes a room: its work tmpfs, then the holder, which mounts the rest.
    /// Returns once the holder is ready, so that the room can be entered.
    /// `net`: the network namespace of the previous room, when it may be
    /// reused (see the module docs); a new one otherwise.
    pub fn create(plan: &RoomPlan, net: Option<RoomNet>) -> Result<Room, RoomError> {
        let opts: Vec<(&CStr, &CStr)> = plan
            .work_options
            .iter()
            .map(|(k, v)| (k.as_c_str(), v.as_c_str()))
            .collect();
        let work = sys::detached_tmpfs(&opts).map_err(RoomError::Workdir)?;
        let (report_r, report_w) = sys::pipe().map_err(RoomError::Clone)?;
        let mut stack = HolderStack::new().map_err(RoomError::Clone)?;
        let ctx = HolderCtx {
            plan,
            work: work.as_raw_fd(),
            report: report_w.as_raw_fd(),
            net: net.as_ref().map_or(-1, |n| n.ns.as_raw_fd()),
        };
        let namespaces = if net.is_some() {
            ROOM_NAMESPACES & !libc::CLONE_NEWNET
        } else {
            ROOM_NAMESPACES
        };
        // SAFETY: the child shares our memory (CLONE_VM) and runs
        // `holder_entry` on its own stack. It makes only raw system calls,
        // reads `ctx` only until it reports on the pipe (we wait for that
        // below, with `ctx` alive), and afterwards touches its stack only.
        let pid = unsafe {
            libc::clone(
                holder_entry,
                stack.top(),
                libc::CLONE_VM | namespaces | libc::SIGCHLD,
                (&ctx as *const HolderCtx).cast_mut().cast(),
            )
        };
        if pid < 0 {
            return Err(RoomError::Clone(io::Error::last_os_error()));
        }
        let holder = pid;
        drop(report_w);
        let mut fail = |e: RoomError| {
            // SAFETY: the holder is our child and not reaped yet.
            unsafe {
                libc::kill(holder, libc::SIGKILL);
                libc::waitpid(holder, std::ptr::null_mut(), libc::__WALL);
            }
            stack.holder_reaped = true;
            e
        };
        match read_report(report_r.as_raw_fd()) {
            Ok(()) => {}
            Err(e) => return Err(fail(e)),
        }
        let pidfd = match sys::pidfd_open(holder) {
            Ok(fd) => fd,
            Err(e) => return Err(fail(RoomError::Pidfd(e))),
        };
        let net = match net {
            Some(n) => n,
            None => match RoomNet::open(holder) {
                Ok(n) => n,
                Err(e) => return Err(fail(RoomError::Net { holder, source: e })),
            },
        };
        Ok(Room {
            holder,
            pidfd,
            work,
            stack,
            net,
        })
    }

    /// Tells the room that its holder has been reaped, so that its stack
    /// can go with it.
    pub fn holder_reaped(&mut self) {
        self.stack.holder_reaped = true;
    }

    /// Ends a room whose holder has been reaped, handing over its network
    /// namespace when no packet ever went through it.
    pub fn retire(mut self) -> Option<RoomNet> {
        self.holder_reaped();
        let Room { net, .. } = self;
        net.untouched().then_some(net)
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
    /// The network namespace to enter, or -1 when the clone made one.
    net: RawFd,
}

/// Where `clone` starts the holder, on its own stack.
extern "C" fn holder_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `HolderCtx` that `Room::create` keeps alive
    // until the holder reports (see there).
    unsafe { holder_main(&*arg.cast::<HolderCtx>()) }
}

/// The holder: sets the room up, reports, then reaps the room's orphans
/// until it is killed.
///
/// # Safety
///
/// Runs in the child of `Room::create`'s `clone`, in the agent's memory:
/// only `raw` system calls (no libc, whose errno is the agent's), `ctx`
/// only until the report, no allocation, no locks, no unwinding.
unsafe fn holder_main(ctx: &HolderCtx) -> ! {
    let fail = |step: u32, ret: isize| -> ! {
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&step.to_ne_bytes());
        buf[4..].copy_from_slice(&((-ret) as i32).to_ne_bytes());
        raw::write(ctx.report, &buf);
        raw::exit(127)
    };
    let check = |step: u32, ret: isize| {
        if ret < 0 {
            fail(step, ret)
        }
    };
    if ctx.net >= 0 {
        check(0, raw::setns(ctx.net, libc::CLONE_NEWNET));
    }
    // Whoever enters the room does so with setns on a pidfd of the holder,
    // which needs ptrace-read access to it, and without CAP_SYS_PTRACE that
    // means a dumpable holder: EPERM for every namespace otherwise. The
    // flag belongs to the memory the holder shares with the agent, which
    // keeps it set too (see `sys::FsIdentity`).
    check(1, raw::prctl(libc::PR_SET_DUMPABLE, 1));
    // Nothing mounted here may reach the jail's (or the host's) mounts.
    check(
        2,
        raw::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ),
    );
    check(
        3,
        raw::move_mount(ctx.work, c"".as_ptr(), ctx.plan.workdir.as_ptr()),
    );
    for (i, dir) in SCRATCH.iter().enumerate() {
        check(
            4 + i as u32,
            raw::mount(
                c"tmpfs".as_ptr(),
                dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                ctx.plan.scratch_options.as_ptr(),
            ),
        );
    }
    check(
        6,
        raw::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ),
    );
    // A namespace handed over from the previous room has it up already.
    if ctx.plan.loopback && ctx.net < 0 {
        check(7, loopback_up());
    }
    // SIGCHLD stays blocked so that rt_sigtimedwait below can wait for it.
    let chld: u64 = 1 << (libc::SIGCHLD - 1);
    check(8, raw::block_signals(chld));
    // Keep nothing of the agent's: not its host socket, not the pipes of
    // its execs. Closing the report pipe last tells the agent we are ready.
    let report = ctx.report as u32;
    raw::close_range(0, report.saturating_sub(1));
    raw::close_range(report + 1, u32::MAX);
    raw::close(ctx.report);
    loop {
        while raw::reap_any() > 0 {}
        raw::wait_signals(chld);
    }
}

/// Sets IFF_UP on `lo` in the room's network namespace (it starts down).
///
/// # Safety
///
/// Raw system calls on a stack `ifreq`; for the holder.
unsafe fn loopback_up() -> isize {
    let s = raw::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
    if s < 0 {
        return s;
    }
    let mut req: libc::ifreq = std::mem::zeroed();
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    let mut ret = raw::ioctl(s as i32, libc::SIOCGIFFLAGS, &mut req);
    if ret >= 0 {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        ret = raw::ioctl(s as i32, libc::SIOCSIFFLAGS, &mut req);
    }
    raw::close(s as i32);
    ret
}

/// System calls made with the `syscall` instruction, for the holder: no
/// libc wrapper, so no `errno` (the result is `-errno` on failure), no
/// thread-local storage, nothing the agent it shares memory with uses.
/// x86_64 only, like the seccomp filters (`TargetArch::x86_64`).
mod raw {
    use std::ffi::c_char;

    /// A system call with up to six arguments.
    ///
    /// # Safety
    ///
    /// The caller vouches for the arguments of system call `n`.
    #[inline(always)]
    unsafe fn syscall(n: libc::c_long, a: [usize; 6]) -> isize {
        let ret: isize;
        // SAFETY: the Linux x86_64 system call convention: number in rax,
        // arguments in rdi, rsi, rdx, r10, r8, r9; rcx and r11 clobbered.
        std::arch::asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
        ret
    }

    pub unsafe fn setns(fd: libc::c_int, nstype: libc::c_int) -> isize {
        syscall(libc::SYS_setns, [fd as usize, nstype as usize, 0, 0, 0, 0])
    }

    pub unsafe fn prctl(option: libc::c_int, arg: libc::c_ulong) -> isize {
        syscall(libc::SYS_prctl, [option as usize, arg as usize, 0, 0, 0, 0])
    }

    pub unsafe fn mount(
        src: *const c_char,
        dst: *const c_char,
        fstype: *const c_char,
        flags: libc::c_ulong,
        data: *const c_char,
    ) -> isize {
        syscall(
            libc::SYS_mount,
            [
                src as usize,
                dst as usize,
                fstype as usize,
                flags as usize,
                data as usize,
                0,
            ],
        )
    }

    /// `move_mount(fd, "", AT_FDCWD, dst, MOVE_MOUNT_F_EMPTY_PATH)`.
    pub unsafe fn move_mount(fd: libc::c_int, empty: *const c_char, dst: *const c_char) -> isize {
        syscall(
            libc::SYS_move_mount,
            [
                fd as usize,
                empty as usize,
                libc::AT_FDCWD as usize,
                dst as usize,
                super::MOVE_MOUNT_F_EMPTY_PATH as usize,
                0,
            ],
        )
    }

    pub unsafe fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> isize {
        syscall(
            libc::SYS_socket,
            [domain as usize, ty as usize, proto as usize, 0, 0, 0],
        )
    }

    pub unsafe fn ioctl(fd: libc::c_int, req: libc::c_ulong, arg: *mut libc::ifreq) -> isize {
        syscall(
            libc::SYS_ioctl,
            [fd as usize, req as usize, arg as usize, 0, 0, 0],
        )
    }

    pub unsafe fn write(fd: libc::c_int, buf: &[u8]) -> isize {
        syscall(
            libc::SYS_write,
            [fd as usize, buf.as_ptr() as usize, buf.len(), 0, 0, 0],
        )
    }

    pub unsafe fn close(fd: libc::c_int) -> isize {
        syscall(libc::SYS_close, [fd as usize, 0, 0, 0, 0, 0])
    }

    pub unsafe fn close_range(first: u32, last: u32) -> isize {
        syscall(
            libc::SYS_close_range,
            [first as usize, last as usize, 0, 0, 0, 0],
        )
    }

    /// Adds `mask` (a kernel sigset: bit `n - 1` for signal `n`) to the
    /// blocked signals.
    pub unsafe fn block_signals(mask: u64) -> isize {
        let set = mask;
        syscall(
            libc::SYS_rt_sigprocmask,
            [
                libc::SIG_BLOCK as usize,
                &set as *const u64 as usize,
                0,
                8,
                0,
                0,
            ],
        )
    }

    /// Waits until one of the (blocked) signals in `mask` is pending and
    /// takes it.
    pub unsafe fn wait_signals(mask: u64) -> isize {
        let set = mask;
        syscall(
            libc::SYS_rt_sigtimedwait,
            [&set as *const u64 as usize, 0, 0, 8, 0, 0],
        )
    }

    /// Reaps one exited child of any kind without waiting; its pid, 0 or
    /// `-errno`.
    pub unsafe fn reap_any() -> isize {
        syscall(
            libc::SYS_wait4,
            [
                -1isize as usize,
                0,
                (libc::WNOHANG | libc::__WALL) as usize,
                0,
                0,
                0,
            ],
        )
    }

    /// Ends the holder.
    pub unsafe fn exit(code: libc::c_int) -> ! {
        loop {
            syscall(libc::SYS_exit, [code as usize, 0, 0, 0, 0, 0]);
        }
    }
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
    fn snmp_counters_tell_a_namespace_no_packet_went_through() {
        let quiet = "Ip: Forwarding DefaultTTL InReceives OutRequests\nIp: 2 64 0 0\nTcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens\nTcp: 1 200 120000 -1 0\n";
        assert!(snmp_untouched(quiet));
        assert!(!snmp_untouched(&quiet.replace("2 64 0 0", "2 64 0 3")));
        assert!(!snmp_untouched(&quiet.replace("-1 0", "-1 1")));
        assert!(!snmp_untouched("Ip: Forwarding\n"), "unpaired lines");
        assert!(!snmp_untouched(""));
        assert!(snmp6_untouched("Ip6InReceives 0\nIp6OutRequests 0\n"));
        assert!(!snmp6_untouched("Ip6InReceives 0\nIp6OutRequests 2\n"));
        assert!(!snmp6_untouched(""));
    }

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

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
//! state (TIME_WAIT included), IPv6 flow labels, System V and POSIX IPC
//! objects. What the jobs shared with the jail is only what they cannot
//! change: the read-only root, the device nodes, the user namespace (whose
//! keyrings the seccomp filter keeps them from), and the cgroup, whose
//! counters the host resets.
//!
//! No room ever inherits a namespace from another. Reusing a network
//! namespace whose traffic counters were all zero once looked safe and
//! saved CPU, but "no packet" is not "no state": a job can leave an IPv6
//! flow label lingering for 150 s with 16 bytes of its choosing in the
//! destination field, without sending anything, and the next room would
//! read it in `/proc/net/ip6_flowlabel`.
//!
//! The speed comes from making rooms ahead instead: [`RoomSupply`] keeps
//! one *spare*, started as soon as the previous spare went into service,
//! which a reset only swaps in. And the agent does not make it on its own
//! thread: a *builder*, a process sharing the agent's memory that the agent
//! clones without new namespaces (microseconds), clones the holder with
//! them. That clone is where the kernel sets the namespaces up (the network
//! namespace alone, sysctl tables, loopback device and IPv6, takes ~0.4 ms
//! on the benchmark machine), so it runs beside the agent. The holder is
//! cloned with `CLONE_PARENT`, so it is the agent's child all the same, and
//! with `CLONE_PARENT_SETTID`, which stores its pid where the agent reads
//! it before the holder ever runs: the agent's reaper always knows a
//! spare's holder. One spare is enough: a reset takes one and starts the
//! next, and a lease lasts longer than making a room. Without one (the
//! first room, or a spare that failed) the room is made the same way, and
//! waited for.
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
//! The builder and the holder share the agent's memory (`CLONE_VM`, each on
//! a stack of its own): a fork-like copy made every page of the agent
//! copy-on-write, and the agent paid for that with a page fault on each
//! page it wrote after every reset. Sharing memory, they must not touch
//! anything the agent uses: they make their system calls directly (`raw`),
//! never through libc (whose `errno` lives in the agent's thread-local
//! storage), read their plan only until they report, and from then on only
//! their own stacks.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use crate::{log_debug, log_warn, sys};

/// The namespaces a room has of its own.
pub const ROOM_NAMESPACES: libc::c_int =
    libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC;

/// What a process entering a room joins itself; the pid namespace is
/// joined for its children, by whoever forks them.
pub const ENTER_NAMESPACES: libc::c_int =
    libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC;

/// How long making a room may take (a clone and a handful of mounts).
const HOLDER_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// `MOVE_MOUNT_F_EMPTY_PATH` (linux/mount.h).
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Why a room could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    /// The work directory's tmpfs could not be made.
    #[error("making the room's work directory tmpfs failed: {0}")]
    Workdir(#[source] io::Error),
    /// The builder could not be started (or its pipe or stacks made).
    #[error("starting the room's builder failed: {0}")]
    Clone(#[source] io::Error),
    /// The builder or the holder failed at one of the set-up steps.
    #[error("the room's holder failed to {step}: {source}")]
    Setup {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    /// The room was not ready in time.
    #[error("the room's holder did not finish its set-up within {0:?}")]
    Timeout(Duration),
    /// A pidfd for the holder could not be had.
    #[error("opening a pidfd for the room's holder failed: {0}")]
    Pidfd(#[source] io::Error),
    /// The holder of a spare room died before the room was used.
    #[error("the spare room's holder {0} died before the room was used")]
    HolderDied(i32),
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

/// The set-up steps, by the number the builder or the holder reports on
/// failure.
const STEPS: [&str; 9] = [
    "be cloned into new pid, mount, network and IPC namespaces",
    "make itself dumpable",
    "make its mounts private",
    "attach the work directory",
    "mount a tmpfs on /tmp",
    "mount a tmpfs on /dev/shm",
    "mount a fresh /proc",
    "bring loopback up",
    "block SIGCHLD",
];

/// Where a sandbox's rooms come from: always new ones, one of them made
/// ahead (see the module docs).
#[derive(Debug)]
pub struct RoomSupply {
    plan: RoomPlan,
    /// At most one: a reset uses one and starts the next.
    spare: Option<PendingRoom>,
}

impl RoomSupply {
    pub fn new(plan: RoomPlan) -> Self {
        Self { plan, spare: None }
    }

    /// The next room: the spare, or, when there is none or it failed, one
    /// made now. Either way a room no process has been in but its holder.
    pub fn take(&mut self) -> Result<Room, RoomError> {
        if let Some(spare) = self.spare.take() {
            let asked = Instant::now();
            match spare.finish() {
                Ok(room) => {
                    log_debug!("spare room taken after {:?}", asked.elapsed());
                    return Ok(room);
                }
                Err(e) => log_warn!("the spare room is unusable ({e}); making one now"),
            }
        }
        PendingRoom::start(&self.plan)?.finish()
    }

    /// Starts making the spare room, unless there is one already.
    pub fn prepare_spare(&mut self) {
        if self.spare.is_some() {
            return;
        }
        match PendingRoom::start(&self.plan) {
            Ok(p) => self.spare = Some(p),
            Err(e) => log_warn!("cannot start a spare room ({e}); the next reset makes its own"),
        }
    }

    /// Tells the supply that the agent reaped `pid`; returns whether that
    /// was the spare's holder (whose room is then unusable).
    pub fn reaped(&mut self, pid: i32) -> bool {
        match &mut self.spare {
            Some(spare) if spare.holder() == Some(pid) => {
                spare.holder_died = true;
                true
            }
            _ => false,
        }
    }

    /// Kills the spare room, if there is one (its holder is reaped by
    /// whoever reaps next).
    pub fn discard_spare(&mut self) {
        if let Some(spare) = self.spare.take() {
            if let Ok(room) = spare.finish() {
                room.kill();
            }
        }
    }
}

/// A room being made: its builder was started, and its holder sets it up
/// while the agent goes on. [`PendingRoom::finish`] waits until it is ready.
#[derive(Debug)]
struct PendingRoom {
    /// Read by the builder and the holder until the report pipe reaches
    /// end of file; freed by `finish` then, leaked if that never came.
    ctx: *mut HolderCtx,
    work: OwnedFd,
    report: OwnedFd,
    holder_stack: ChildStack,
    builder_stack: ChildStack,
    /// The agent reaped the holder before the room was used.
    holder_died: bool,
}

impl PendingRoom {
    /// Makes the work tmpfs and starts the builder, which clones the holder.
    fn start(plan: &RoomPlan) -> Result<PendingRoom, RoomError> {
        let opts: Vec<(&CStr, &CStr)> = plan
            .work_options
            .iter()
            .map(|(k, v)| (k.as_c_str(), v.as_c_str()))
            .collect();
        let work = sys::detached_tmpfs(&opts).map_err(RoomError::Workdir)?;
        let (report_r, report_w) = sys::pipe().map_err(RoomError::Clone)?;
        let mut holder_stack = ChildStack::new(HOLDER_STACK_BYTES).map_err(RoomError::Clone)?;
        let mut builder_stack = ChildStack::new(BUILDER_STACK_BYTES).map_err(RoomError::Clone)?;
        let ctx = Box::into_raw(Box::new(HolderCtx {
            workdir: plan.workdir.clone(),
            scratch_options: plan.scratch_options.clone(),
            loopback: plan.loopback,
            work: work.as_raw_fd(),
            report: report_w.as_raw_fd(),
            holder_stack: holder_stack.top(),
            holder: AtomicI32::new(0),
        }));
        // SAFETY: the builder shares our memory (CLONE_VM) and runs
        // `builder_entry` on its own stack. It and the holder it clones make
        // only raw system calls and read `*ctx` only until the report pipe
        // reaches end of file, which `finish` waits for before it frees
        // `ctx` and the builder's stack (or leaks both, if it never comes).
        let builder = unsafe {
            libc::clone(
                builder_entry,
                builder_stack.top(),
                libc::CLONE_VM | libc::SIGCHLD,
                ctx.cast(),
            )
        };
        if builder < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: no builder exists, so nothing else refers to `ctx`.
            drop(unsafe { Box::from_raw(ctx) });
            return Err(RoomError::Clone(e));
        }
        holder_stack.in_use = true;
        builder_stack.in_use = true;
        Ok(PendingRoom {
            ctx,
            work,
            report: report_r,
            holder_stack,
            builder_stack,
            holder_died: false,
        })
    }

    /// The holder's pid, once the builder has cloned it.
    fn holder(&self) -> Option<i32> {
        // SAFETY: `ctx` lives until `finish` consumes this room.
        let pid = unsafe { &*self.ctx }.holder.load(Ordering::Acquire);
        (pid > 0).then_some(pid)
    }

    /// Waits until the room is ready (or failed).
    fn finish(mut self) -> Result<Room, RoomError> {
        let verdict = match read_report(self.report.as_fd()) {
            Ok(verdict) => verdict,
            Err(e) => {
                // The builder or the holder may still read `ctx` and run on
                // their stacks: kill the holder, and leave the rest alone.
                if let (Some(pid), false) = (self.holder(), self.holder_died) {
                    // SAFETY: kill has no memory effects; the holder is our
                    // child and not reaped (`holder_died` would say so).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                return Err(e);
            }
        };
        // End of file: the builder has exited, and the holder is past its
        // set-up (ready, or exiting after its report).
        let holder = self.holder();
        self.builder_stack.in_use = false;
        // SAFETY: neither the builder nor the holder reads `ctx` any more.
        drop(unsafe { Box::from_raw(self.ctx) });
        let Some(holder) = holder else {
            // The builder's clone failed: there never was a holder.
            self.holder_stack.in_use = false;
            return verdict.and(Err(RoomError::Clone(io::Error::other(
                "the builder ended without cloning a holder",
            ))));
        };
        if self.holder_died {
            self.holder_stack.in_use = false;
            return verdict.and(Err(RoomError::HolderDied(holder)));
        }
        let fail = |stack: &mut ChildStack, e: RoomError| {
            // SAFETY: the holder is our child and not reaped yet: the agent
            // reaps only outside this module, and `RoomSupply::reaped`
            // would have marked it.
            unsafe {
                libc::kill(holder, libc::SIGKILL);
                libc::waitpid(holder, std::ptr::null_mut(), libc::__WALL);
            }
            stack.in_use = false;
            e
        };
        if let Err(e) = verdict {
            return Err(fail(&mut self.holder_stack, e));
        }
        let pidfd = match sys::pidfd_open(holder) {
            Ok(fd) => fd,
            Err(e) => return Err(fail(&mut self.holder_stack, RoomError::Pidfd(e))),
        };
        Ok(Room {
            holder,
            pidfd,
            work: self.work,
            stack: self.holder_stack,
        })
    }
}

/// A live room.
#[derive(Debug)]
pub struct Room {
    holder: i32,
    pidfd: OwnedFd,
    work: OwnedFd,
    stack: ChildStack,
}

/// Bytes of the holder's stack (it needs a few hundred).
const HOLDER_STACK_BYTES: usize = 64 * 1024;

/// Bytes of the builder's stack (it needs less than the holder).
const BUILDER_STACK_BYTES: usize = 16 * 1024;

/// A stack for a process cloned with `CLONE_VM`: an anonymous mapping with
/// a guard page below it. It may be unmapped only once that process is
/// gone, so a stack dropped while possibly in use stays mapped (tens of
/// KiB, on a path that ends the agent or its connection anyway).
#[derive(Debug)]
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
    in_use: bool,
}

impl ChildStack {
    fn new(bytes: usize) -> io::Result<Self> {
        let len = bytes + 4096;
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
            in_use: false,
        })
    }

    /// The initial stack pointer: the mapping's end, 16-byte aligned.
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping, which is page aligned.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        if !self.in_use {
            // SAFETY: the only user of the mapping is gone (or never was).
            unsafe { libc::munmap(self.base, self.len) };
        }
    }
}

impl Room {
    /// Tells the room that its holder has been reaped, so that its stack
    /// can go with it.
    pub fn holder_reaped(&mut self) {
        self.stack.in_use = false;
    }

    /// The holder's pid (the room's pid 1), as the agent sees it.
    pub fn holder(&self) -> i32 {
        self.holder
    }

    /// A pidfd of the holder, for `setns` into the room.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// The root of the room's work directory.
    pub fn work(&self) -> BorrowedFd<'_> {
        self.work.as_fd()
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

/// Waits for the report pipe's end of file, which comes once the builder
/// has exited and the holder closed its end, and returns the verdict:
/// ready when nothing came before it, else the failed step and its errno
/// (8 bytes). `Err` when end of file did not come.
fn read_report(fd: BorrowedFd<'_>) -> Result<Result<(), RoomError>, RoomError> {
    let deadline = Instant::now() + HOLDER_READY_TIMEOUT;
    let mut buf = [0u8; 8];
    let mut got = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match sys::wait_readable(fd, left) {
            Ok(true) => {}
            Ok(false) => return Err(RoomError::Timeout(HOLDER_READY_TIMEOUT)),
            Err(e) => return Err(RoomError::Clone(e)),
        }
        // Past 8 bytes (nobody writes more), only end of file is awaited.
        let mut rest = [0u8; 8];
        let into = if got < buf.len() {
            &mut buf[got..]
        } else {
            &mut rest[..]
        };
        match sys::read(fd.as_raw_fd(), into) {
            Ok(0) => break,
            Ok(n) => got = (got + n).min(buf.len()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(RoomError::Clone(e)),
        }
    }
    if got == 0 {
        return Ok(Ok(()));
    }
    let step = u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    let errno = i32::from_ne_bytes(buf[4..].try_into().expect("4 bytes"));
    Ok(Err(RoomError::Setup {
        step: STEPS.get(step).copied().unwrap_or("set up"),
        source: io::Error::from_raw_os_error(errno),
    }))
}

/// Everything the builder and the holder need, prepared before the builder
/// is cloned, at an address that does not move.
#[derive(Debug)]
struct HolderCtx {
    workdir: CString,
    scratch_options: CString,
    loopback: bool,
    work: RawFd,
    /// The report pipe's write end.
    report: RawFd,
    /// The top of the holder's stack.
    holder_stack: *mut libc::c_void,
    /// The holder's pid in the agent's pid namespace: stored by the kernel
    /// (`CLONE_PARENT_SETTID`) before the holder first runs, 0 until then.
    holder: AtomicI32,
}

/// Where `clone` starts the builder, on its own stack.
extern "C" fn builder_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `HolderCtx` that `PendingRoom` keeps alive until
    // the report pipe reaches end of file, which needs the builder gone.
    unsafe { builder_main(&*arg.cast::<HolderCtx>()) }
}

/// The builder: clones the holder into the room's new namespaces (the
/// expensive part of making a room, done here rather than on the agent's
/// thread), reports if that fails, and exits.
///
/// # Safety
///
/// Runs in the child of `PendingRoom::start`'s `clone`, in the agent's
/// memory: only `raw` system calls, `ctx` only, no allocation, no locks,
/// no unwinding.
unsafe fn builder_main(ctx: &HolderCtx) -> ! {
    // Its descriptors are a copy of the agent's: keep only what the holder
    // needs, so that no copy of a job's pipe lingers in the holder.
    let (a, b) = if ctx.work < ctx.report {
        (ctx.work as u32, ctx.report as u32)
    } else {
        (ctx.report as u32, ctx.work as u32)
    };
    if a > 0 {
        raw::close_range(0, a - 1);
    }
    if b > a + 1 {
        raw::close_range(a + 1, b - 1);
    }
    raw::close_range(b + 1, u32::MAX);
    // The holder is the agent's child (CLONE_PARENT), with the agent's exit
    // signal for it, SIGCHLD, which CLONE_PARENT takes from this process.
    let flags = libc::CLONE_VM | libc::CLONE_PARENT | libc::CLONE_PARENT_SETTID | ROOM_NAMESPACES;
    let ret = raw::clone_on(
        flags as usize,
        ctx.holder_stack,
        ctx.holder.as_ptr(),
        holder_entry,
        (ctx as *const HolderCtx).cast_mut().cast(),
    );
    if ret < 0 {
        report_failure(ctx.report, 0, ret);
    }
    raw::exit(0)
}

/// Writes a failed step and its errno (`ret` is `-errno`) to the report
/// pipe.
///
/// # Safety
///
/// For the builder and the holder: raw system calls only.
unsafe fn report_failure(report: RawFd, step: u32, ret: isize) {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&step.to_ne_bytes());
    buf[4..].copy_from_slice(&((-ret) as i32).to_ne_bytes());
    raw::write(report, &buf);
}

/// Where the builder's `clone` starts the holder, on its own stack.
///
/// # Safety
///
/// `arg` is the `HolderCtx` that `PendingRoom` keeps alive until the holder
/// reports (see there).
unsafe extern "C" fn holder_entry(arg: *mut libc::c_void) -> ! {
    // SAFETY: see above.
    unsafe { holder_main(&*arg.cast::<HolderCtx>()) }
}

/// The holder: sets the room up, reports, then reaps the room's orphans
/// until it is killed.
///
/// # Safety
///
/// Runs in the child of the builder's `clone`, in the agent's memory: only
/// `raw` system calls (no libc, whose errno is the agent's), `ctx` only
/// until the report, no allocation, no locks, no unwinding.
unsafe fn holder_main(ctx: &HolderCtx) -> ! {
    let check = |step: u32, ret: isize| {
        if ret < 0 {
            report_failure(ctx.report, step, ret);
            raw::exit(127)
        }
    };
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
        raw::move_mount(ctx.work, c"".as_ptr(), ctx.workdir.as_ptr()),
    );
    for (i, dir) in SCRATCH.iter().enumerate() {
        check(
            4 + i as u32,
            raw::mount(
                c"tmpfs".as_ptr(),
                dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                ctx.scratch_options.as_ptr(),
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
    if ctx.loopback {
        check(7, loopback_up());
    }
    // SIGCHLD stays blocked so that rt_sigtimedwait below can wait for it.
    let chld: u64 = 1 << (libc::SIGCHLD - 1);
    check(8, raw::block_signals(chld));
    // Keep nothing of the agent's (the builder left only these two).
    // Closing the report pipe last tells the agent we are ready.
    raw::close(ctx.work);
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

/// System calls made with the `syscall` instruction, for the builder and
/// the holder: no
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

    /// `clone(flags, stack, parent_tid, 0, 0)` whose child starts on
    /// `stack` in `entry(arg)`, which never returns; the parent gets the
    /// child's pid or `-errno`.
    pub unsafe fn clone_on(
        flags: usize,
        stack: *mut libc::c_void,
        parent_tid: *mut i32,
        entry: unsafe extern "C" fn(*mut libc::c_void) -> !,
        arg: *mut libc::c_void,
    ) -> isize {
        let ret: isize;
        // SAFETY: the x86_64 clone convention: flags, stack, parent_tid,
        // child_tid, tls in rdi, rsi, rdx, r10, r8; rcx and r11 clobbered.
        // The child resumes after `syscall` with rax 0, on `stack` (16-byte
        // aligned, so that `call` leaves it as the ABI wants at the callee's
        // entry), and with the parent's other registers: r12 and r13 carry
        // `arg` and `entry`. It never comes back to the code after `ud2`.
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone as isize => ret,
            in("rdi") flags,
            in("rsi") stack,
            in("rdx") parent_tid,
            in("r10") 0usize,
            in("r8") 0usize,
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
        );
        ret
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
    sys::setns(room.pidfd().as_raw_fd(), libc::CLONE_NEWPID)?;
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

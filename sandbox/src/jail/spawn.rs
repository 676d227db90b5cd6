//! Starting `kiln-agent` as init of a fresh set of namespaces.
//!
//! The parent prepares everything (paths as C strings, the mount plan, the
//! seccomp programs, argv) and then `clone`s a child into new user, pid,
//! mount, net, ipc and uts namespaces. The child, a copy of a multi-threaded
//! process, may only make raw system calls until it execs: it allocates
//! nothing, takes no locks and reports failure as a `(step, errno)` pair on a
//! pipe. The parent writes the id maps and moves the child into its cgroup,
//! then lets it go; the child enters a new cgroup namespace, builds its root
//! from the plan (it attaches the overlays the parent mounted for it, see
//! `rootfs`, and mounts its `/proc`), pivots into it, drops capabilities,
//! sets no_new_privs, installs the filters and execs the agent by
//! descriptor, from an overlay of the jail's own that is attached nowhere
//! (so that the agent's host path need not be visible, or even exist,
//! inside the jail).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use seccompiler::BpfProgram;

/// One action of the child's filesystem plan.
#[derive(Debug)]
pub enum Step {
    Mount {
        src: Option<CString>,
        dst: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// `move_mount(mount, "", AT_FDCWD, dst, MOVE_MOUNT_F_EMPTY_PATH)`:
    /// attaches a detached mount the parent made (see `rootfs`).
    Attach { mount: RawFd, dst: CString },
    /// `chdir(root); pivot_root(".", "."); umount2(".", MNT_DETACH); chdir("/")`.
    PivotInto { root: CString },
}

impl Step {
    /// What the step does, for the parent's error message.
    pub fn describe(&self) -> String {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Step::Mount {
                src, dst, fstype, ..
            } => format!(
                "mount {} on {} ({})",
                src.as_ref().map(s).unwrap_or_default(),
                s(dst),
                fstype
                    .as_ref()
                    .map(s)
                    .unwrap_or_else(|| "bind/remount".into())
            ),
            Step::Attach { dst, .. } => format!("attach the overlay for {}", s(dst)),
            Step::PivotInto { root } => format!("pivot_root into {}", s(root)),
        }
    }
}

/// Everything the child needs, prepared by the parent.
pub struct Plan {
    pub steps: Vec<Step>,
    pub hostname: CString,
    pub filters: Vec<BpfProgram>,
    /// Capabilities the agent keeps (a bit mask of `CAP_*` numbers).
    pub keep_caps: u64,
    pub rlimits: Vec<(libc::__rlimit_resource_t, libc::rlim_t)>,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub dev_null: CString,
}

/// Fixed steps after the plan's own, numbered past `steps.len()` in errors.
const FIXED_STEPS: &[&str] = &[
    "wait for the parent",
    "setresgid(0)",
    "setresuid(0)",
    "setgroups([])",
    "unshare(CLONE_NEWCGROUP)",
    "make / private",
    "sethostname",
    "setrlimit",
    "arrange file descriptors",
    "drop capabilities",
    "set no_new_privs",
    "install seccomp filter",
    "exec the agent",
];

/// Describes the step `n` that failed.
pub fn describe_step(plan: &Plan, n: usize) -> String {
    if n < FIXED_PREFIX {
        return FIXED_STEPS[n].to_owned();
    }
    let n = n - FIXED_PREFIX;
    if let Some(s) = plan.steps.get(n) {
        return s.describe();
    }
    FIXED_STEPS
        .get(FIXED_PREFIX + n - plan.steps.len())
        .map_or_else(|| format!("step {n}"), |s| (*s).to_owned())
}

/// Fixed steps that run before the plan's steps.
const FIXED_PREFIX: usize = 6;

/// A started child: its pid and the pipes to release it and hear from it.
pub struct Child {
    pub pid: libc::pid_t,
    go: Option<OwnedFd>,
    err: OwnedFd,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Fds the child moves into place before exec.
pub struct ChildFds {
    pub agent_exe: RawFd,
    pub control: RawFd,
    pub log: RawFd,
}

/// `MOVE_MOUNT_F_EMPTY_PATH` (linux/mount.h).
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

const NS_FLAGS: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

/// Clones the child. It waits for [`Child::release`] before doing anything.
pub fn start(plan: &Plan, fds: ChildFds) -> io::Result<Child> {
    let (go_r, go_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let argv: Vec<*const libc::c_char> = plan
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = plan
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let fprogs: Vec<libc::sock_fprog> = plan
        .filters
        .iter()
        .map(|f| libc::sock_fprog {
            len: f.len() as u16,
            filter: f.as_ptr() as *mut libc::sock_filter,
        })
        .collect();
    let ctx = ChildCtx {
        plan,
        fds: &fds,
        go_r: go_r.as_raw_fd(),
        go_w: go_w.as_raw_fd(),
        err_r: err_r.as_raw_fd(),
        err_w: err_w.as_raw_fd(),
        argv: &argv,
        envp: &envp,
        fprogs: &fprogs,
    };
    let mut stack = vec![0u8; 256 * 1024];
    let mut cb = || -> isize { child_main(&ctx) };
    // SAFETY: the callback only makes async-signal-safe raw system calls on
    // data prepared above (see `child_main`), and the stack is large enough
    // for it; without CLONE_VM the child has its own copy of everything.
    let pid = unsafe {
        nix::sched::clone(
            Box::new(&mut cb),
            &mut stack,
            nix::sched::CloneFlags::from_bits_retain(NS_FLAGS),
            Some(libc::SIGCHLD),
        )
    }
    .map_err(io::Error::from)?;
    drop(go_r);
    drop(err_w);
    Ok(Child {
        pid: pid.as_raw(),
        go: Some(go_w),
        err: err_r,
    })
}

impl Child {
    /// Lets the child proceed, then waits until it has exec'd the agent (the
    /// error pipe closes) or failed (a `(step, errno)` pair arrives).
    pub fn release(&mut self) -> Result<(), (usize, i32)> {
        let go = self.go.take().expect("release is called once");
        // SAFETY: writing one byte from a valid buffer to an owned fd.
        let n = unsafe { libc::write(go.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        drop(go);
        if n != 1 {
            return Err((0, io::Error::last_os_error().raw_os_error().unwrap_or(0)));
        }
        let mut buf = [0u8; 8];
        let mut got = 0;
        while got < 8 {
            // SAFETY: reading into the unfilled tail of a valid buffer.
            let n = unsafe {
                libc::read(
                    self.err.as_raw_fd(),
                    buf[got..].as_mut_ptr().cast(),
                    8 - got,
                )
            };
            if n == 0 {
                break;
            }
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            got += n as usize;
        }
        if got == 0 {
            return Ok(());
        }
        let step = u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
        let errno = i32::from_ne_bytes(buf[4..].try_into().expect("4 bytes"));
        Err((step, errno))
    }
}

#[derive(Clone, Copy)]
struct ChildCtx<'a> {
    plan: &'a Plan,
    fds: &'a ChildFds,
    go_r: RawFd,
    go_w: RawFd,
    err_r: RawFd,
    err_w: RawFd,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    fprogs: &'a [libc::sock_fprog],
}

fn errno() -> i32 {
    // SAFETY: __errno_location always returns a valid thread-local pointer.
    unsafe { *libc::__errno_location() }
}

/// Reports `(step, errno)` to the parent and exits. Never returns.
fn fail(ctx: &ChildCtx, step: usize) -> isize {
    let e = errno();
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&(step as u32).to_ne_bytes());
    buf[4..].copy_from_slice(&e.to_ne_bytes());
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid.
    unsafe {
        libc::write(ctx.err_w, buf.as_ptr().cast(), 8);
        libc::_exit(127)
    }
}

fn opt_ptr(c: &Option<CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// Moves `fd` to `target` and makes it survive exec.
///
/// SAFETY (for callers): only raw fcntl/dup2 calls.
fn place_fd(fd: RawFd, target: RawFd) -> bool {
    // SAFETY: fcntl/dup2 on fds owned by this process.
    unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0) == 0
        } else {
            libc::dup2(fd, target) == target
        }
    }
}

/// The child, between clone and exec.
fn child_main(ctx: &ChildCtx) -> isize {
    // SAFETY: (the whole function) only raw, async-signal-safe system calls
    // on C strings and structures prepared by the parent before clone; no
    // allocation, no locks, no unwinding (failures `_exit`).
    unsafe {
        libc::close(ctx.go_w);
        libc::close(ctx.err_r);
        let mut b = 0u8;
        if libc::read(ctx.go_r, (&mut b as *mut u8).cast(), 1) != 1 {
            libc::_exit(1);
        }
        libc::close(ctx.go_r);
        // Raw system calls, not glibc's wrappers: those broadcast the id
        // change to every thread under glibc's stack-list lock, which a
        // parent thread may have held at the moment of clone (thread
        // creation takes it), deadlocking the child for ever.
        if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0 {
            return fail(ctx, 1);
        }
        if libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0 {
            return fail(ctx, 2);
        }
        if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0 {
            return fail(ctx, 3);
        }
        if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
            return fail(ctx, 4);
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return fail(ctx, 5);
        }
        for (i, step) in ctx.plan.steps.iter().enumerate() {
            let ok = match step {
                Step::Mount {
                    src,
                    dst,
                    fstype,
                    flags,
                    data,
                } => {
                    libc::mount(
                        opt_ptr(src),
                        dst.as_ptr(),
                        opt_ptr(fstype),
                        *flags,
                        opt_ptr(data).cast(),
                    ) == 0
                }
                Step::Attach { mount, dst } => {
                    libc::syscall(
                        libc::SYS_move_mount,
                        *mount,
                        c"".as_ptr(),
                        libc::AT_FDCWD,
                        dst.as_ptr(),
                        MOVE_MOUNT_F_EMPTY_PATH,
                    ) == 0
                }
                Step::PivotInto { root } => {
                    libc::chdir(root.as_ptr()) == 0
                        && libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0
                        && libc::umount2(c".".as_ptr(), libc::MNT_DETACH) == 0
                        && libc::chdir(c"/".as_ptr()) == 0
                }
            };
            if !ok {
                return fail(ctx, FIXED_PREFIX + i);
            }
        }
        let base = FIXED_PREFIX + ctx.plan.steps.len();
        let h = ctx.plan.hostname.as_bytes();
        if libc::sethostname(h.as_ptr().cast(), h.len()) != 0 {
            return fail(ctx, base);
        }
        for &(res, v) in &ctx.plan.rlimits {
            let lim = libc::rlimit {
                rlim_cur: v,
                rlim_max: v,
            };
            if libc::setrlimit(res, &lim) != 0 {
                return fail(ctx, base + 1);
            }
        }
        // Move every fd we need above the range we are about to fill.
        let null = libc::open(ctx.plan.dev_null.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        let hi = |fd: RawFd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 16);
        let (exe, ctl, log, err) = (
            hi(ctx.fds.agent_exe),
            hi(ctx.fds.control),
            hi(ctx.fds.log),
            hi(ctx.err_w),
        );
        if null < 0 || exe < 0 || ctl < 0 || log < 0 || err < 0 {
            return fail(ctx, base + 2);
        }
        let ctx = ChildCtx { err_w: err, ..*ctx };
        if !(place_fd(null, 0) && place_fd(log, 1) && place_fd(log, 2) && place_fd(ctl, 3)) {
            return fail(&ctx, base + 2);
        }
        for cap in 0..64u32 {
            if ctx.plan.keep_caps & (1 << cap) == 0 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let keep = ctx.plan.keep_caps;
        let data = [
            CapData {
                effective: keep as u32,
                permitted: keep as u32,
                inheritable: 0,
            },
            CapData {
                effective: (keep >> 32) as u32,
                permitted: (keep >> 32) as u32,
                inheritable: 0,
            },
        ];
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
            return fail(&ctx, base + 3);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return fail(&ctx, base + 4);
        }
        for prog in ctx.fprogs {
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                prog as *const libc::sock_fprog,
                0,
                0,
            ) != 0
            {
                return fail(&ctx, base + 5);
            }
        }
        libc::syscall(
            libc::SYS_execveat,
            exe,
            c"".as_ptr(),
            ctx.argv.as_ptr(),
            ctx.envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
        fail(&ctx, base + 6)
    }
}

/// `_LINUX_CAPABILITY_VERSION_3` from linux/capability.h.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

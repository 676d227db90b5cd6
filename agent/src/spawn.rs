//! Starting a job process (or a warm interpreter, which is a job process
//! that has not been told its job yet, or a zygote, which forks them).
//! Everything the child needs is prepared before fork by
//! `std::process::Command`; the code that runs between fork and exec
//! ([`child_setup`]) makes only async-signal-safe system calls.
//!
//! A job process gets: its own session and process group (so that the agent
//! can signal everything it started with one `kill(-pgid)`), the job's
//! uid/gid with no supplementary groups, SIGKILL when the agent dies, no core
//! dumps, an empty signal mask and default signal dispositions (the agent
//! blocks signals for its signalfd and std ignores SIGPIPE: neither may leak
//! into the job), the work directory as cwd, three pipes as stdio, and for
//! warm interpreters the read end of the control pipe as fd 3. Every other
//! agent descriptor is close-on-exec.
//!
//! In a sandbox with rooms ([`Place::Room`]) the process also joins the
//! room's namespaces (its pid namespace through the agent, which forks it
//! with its own children pointed there), loses every capability from its
//! bounding set, offers itself first to the OOM killer, and installs the
//! job's seccomp filters as its last step: in room mode the agent's own
//! filter lets it make rooms, which jobs must not.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::room::{self, Room, ENTER_NAMESPACES};
use crate::sys;

/// Who a job runs as, and where.
#[derive(Debug, Clone)]
pub struct JobIdentity {
    pub uid: u32,
    pub gid: u32,
    pub cwd: String,
}

/// A started process and the agent's ends of its pipes (non-blocking).
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Write end of the warm-start control pipe (fd 3 in the child).
    pub control: Option<OwnedFd>,
}

/// The descriptor number a warm interpreter reads its job from.
const CONTROL_FD: RawFd = 3;

/// The job's seccomp programs, decoded once from `Hello`.
#[derive(Debug, Default)]
pub struct JobFilters {
    raw: Vec<Vec<u8>>,
    programs: Vec<kiln_sys::seccomp::Program>,
}

impl JobFilters {
    /// Decodes programs in `kiln_sys::seccomp`'s wire format.
    pub fn decode(raw: &[Vec<u8>]) -> Result<Self, kiln_sys::seccomp::WireError> {
        let programs = raw
            .iter()
            .map(|p| kiln_sys::seccomp::decode(p))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            raw: raw.to_vec(),
            programs,
        })
    }

    /// The programs as received, for a zygote to install in its forks.
    pub fn raw(&self) -> &[Vec<u8>] {
        &self.raw
    }

    fn fprogs(&self) -> Vec<libc::sock_fprog> {
        self.programs.iter().map(|p| p.fprog()).collect()
    }
}

/// Where a process starts.
#[derive(Clone, Copy)]
pub enum Place<'a> {
    /// In the agent's own namespaces (a microVM guest without rooms).
    Here,
    /// In `room`, confined by `filters`; `own_pid_ns` brings the agent's
    /// children back to its own pid namespace afterwards.
    Room {
        room: &'a Room,
        own_pid_ns: &'a OwnedFd,
        filters: &'a JobFilters,
    },
}

/// Starts `argv` with exactly `env`, as `who`, at `place`, with a control
/// pipe on fd 3 if `warm`.
pub fn spawn(
    argv: &[String],
    env: &BTreeMap<String, String>,
    who: &JobIdentity,
    warm: bool,
    place: Place<'_>,
) -> io::Result<Spawned> {
    let control = if warm { Some(sys::pipe()?) } else { None };
    let control_rd = control.as_ref().map_or(-1, |(r, _)| r.as_raw_fd());
    let mut cmd = command(argv, env)?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let setup = Setup::new(who, control_rd, place)?;
    let mut child = start(cmd, setup, place)?;
    let pid = child.id() as i32;
    let take = |fd: Option<OwnedFd>| -> io::Result<OwnedFd> {
        let fd = fd.ok_or_else(|| io::Error::other("child pipe missing"))?;
        sys::set_nonblocking(fd.as_fd())?;
        Ok(fd)
    };
    let stdin = take(child.stdin.take().map(OwnedFd::from))?;
    let stdout = take(child.stdout.take().map(OwnedFd::from))?;
    let stderr = take(child.stderr.take().map(OwnedFd::from))?;
    // The agent reaps the child itself (wait4 on SIGCHLD); dropping `Child`
    // neither waits nor kills.
    drop(child);
    let control = match control {
        Some((_read, write)) => {
            sys::set_nonblocking(write.as_fd())?;
            Some(write)
        }
        None => None,
    };
    Ok(Spawned {
        pid,
        stdin,
        stdout,
        stderr,
        control,
    })
}

/// Starts a zygote: `argv` as the agent's own user (root of the sandbox,
/// with the agent's capabilities, which it needs to enter rooms), in the
/// agent's namespaces, with `sock` as fd 3, stdin and stdout on /dev/null
/// and stderr shared with the agent's log. Returns its pid.
pub fn spawn_zygote(
    argv: &[String],
    env: &BTreeMap<String, String>,
    sock: &OwnedFd,
) -> io::Result<i32> {
    let mut cmd = command(argv, env)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let who = JobIdentity {
        // SAFETY: getuid has no preconditions.
        uid: unsafe { libc::getuid() },
        // SAFETY: getgid has no preconditions.
        gid: unsafe { libc::getgid() },
        cwd: "/".into(),
    };
    let setup = Setup::new(&who, sock.as_raw_fd(), Place::Here)?;
    let child = start(cmd, setup, Place::Here)?;
    Ok(child.id() as i32)
}

fn command(argv: &[String], env: &BTreeMap<String, String>) -> io::Result<Command> {
    let Some((program, args)) = argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
    };
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear().envs(env);
    Ok(cmd)
}

/// Forks and execs `cmd` with `setup` run in the child; with its pid
/// namespace pointed into the room for the fork when `place` is a room.
fn start(mut cmd: Command, setup: Setup, place: Place<'_>) -> io::Result<std::process::Child> {
    // SAFETY: the closure only calls async-signal-safe functions on values
    // prepared before fork (see `child_setup`).
    unsafe {
        cmd.pre_exec(move || child_setup(&setup));
    }
    match place {
        Place::Here => cmd.spawn(),
        Place::Room {
            room, own_pid_ns, ..
        } => {
            let _in_room = room::enter_for_children(room, own_pid_ns)?;
            cmd.spawn()
        }
    }
}

/// What the child does between fork and exec, prepared before fork.
struct Setup {
    uid: u32,
    gid: u32,
    cwd: CString,
    fd3: RawFd,
    /// The room's pidfd, for `setns(ENTER_NAMESPACES)`.
    room: RawFd,
    /// The job's filters (pointers into the agent's `JobFilters`, which
    /// outlives every fork).
    fprogs: Vec<libc::sock_fprog>,
}

// SAFETY: the raw pointers in `fprogs` point into `JobFilters` owned by the
// agent's setup, alive for the whole spawn; the closure holding `Setup` runs
// only in the forked child.
unsafe impl Send for Setup {}
// SAFETY: as for Send: the pointed-to filters are never written.
unsafe impl Sync for Setup {}

impl Setup {
    fn new(who: &JobIdentity, fd3: RawFd, place: Place<'_>) -> io::Result<Self> {
        let cwd = CString::new(who.cwd.as_str())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in workdir"))?;
        let (room, fprogs) = match place {
            Place::Here => (-1, Vec::new()),
            Place::Room { room, filters, .. } => (room.pidfd().as_raw_fd(), filters.fprogs()),
        };
        Ok(Self {
            uid: who.uid,
            gid: who.gid,
            cwd,
            fd3,
            room,
            fprogs,
        })
    }
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Runs in the forked child before exec: async-signal-safe calls only, no
/// allocation.
fn child_setup(s: &Setup) -> io::Result<()> {
    // SAFETY: each call below is async-signal-safe and takes either plain
    // integers or pointers to memory prepared before fork.
    unsafe {
        if s.room >= 0 {
            sys::setns(s.room, ENTER_NAMESPACES)?;
        }
        check(libc::setsid())?;
        if s.room >= 0 {
            // Past the last capability the kernel answers EINVAL.
            for cap in 0..64 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) == -1 {
                    break;
                }
            }
            // Before the uid change: it makes the process non-dumpable
            // until exec, and /proc/self unwritable.
            prefer_for_oom()?;
        }
        // A user namespace whose setgroups is denied keeps the (already
        // empty or unmapped) groups it was created with.
        if libc::setgroups(0, std::ptr::null()) == -1 && *libc::__errno_location() != libc::EPERM {
            return Err(io::Error::last_os_error());
        }
        check(libc::setresgid(s.gid, s.gid, s.gid))?;
        check(libc::setresuid(s.uid, s.uid, s.uid))?;
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        check(libc::setrlimit(libc::RLIMIT_CORE, &no_core))?;
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        check(libc::sigprocmask(
            libc::SIG_SETMASK,
            &empty,
            std::ptr::null_mut(),
        ))?;
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                // Fails harmlessly for the libc-reserved real-time signals.
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        check(libc::chdir(s.cwd.as_ptr()))?;
        if s.fd3 >= 0 {
            if s.fd3 == CONTROL_FD {
                check(libc::fcntl(CONTROL_FD, libc::F_SETFD, 0))?;
            } else {
                // dup2 clears close-on-exec on the new descriptor.
                check(libc::dup2(s.fd3, CONTROL_FD))?;
            }
        }
        if s.room >= 0 {
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            for prog in &s.fprogs {
                check(libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                    prog as *const libc::sock_fprog,
                    0,
                    0,
                ))?;
            }
        }
    }
    Ok(())
}

/// Makes the calling process the OOM killer's first choice in its cgroup
/// (`oom_score_adj` 1000; raising it needs no privilege), so that a job
/// short of memory never takes the agent, the holder or a zygote with it.
///
/// # Safety
///
/// Raw open/write/close; callable between fork and exec.
unsafe fn prefer_for_oom() -> io::Result<()> {
    let fd = libc::open(
        c"/proc/self/oom_score_adj".as_ptr(),
        libc::O_WRONLY | libc::O_CLOEXEC,
    );
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = libc::write(fd, b"1000".as_ptr().cast(), 4);
    libc::close(fd);
    if n != 4 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

//! Starting a job process (or a warm interpreter, which is a job process
//! that has not been told its job yet). Everything the child needs is
//! prepared before fork by `std::process::Command`; the code that runs
//! between fork and exec ([`child_setup`]) makes only async-signal-safe
//! system calls.
//!
//! The child gets: its own session and process group (so that the agent can
//! signal everything it started with one `kill(-pgid)`), the job's uid/gid
//! with no supplementary groups, SIGKILL when the agent dies, no core dumps,
//! an empty signal mask and default signal dispositions (the agent blocks
//! signals for its signalfd and std ignores SIGPIPE: neither may leak into
//! the job), the work directory as cwd, three pipes as stdio, and for warm
//! interpreters the read end of the control pipe as fd 3. Every other agent
//! descriptor is close-on-exec.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

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

/// Starts `argv` with exactly `env`, as `who`, with a control pipe on fd 3
/// if `warm`.
pub fn spawn(
    argv: &[String],
    env: &BTreeMap<String, String>,
    who: &JobIdentity,
    warm: bool,
) -> io::Result<Spawned> {
    let Some((program, args)) = argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
    };
    let cwd = CString::new(who.cwd.as_str())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in workdir"))?;
    let control = if warm { Some(sys::pipe()?) } else { None };
    let control_rd = control.as_ref().map_or(-1, |(r, _)| r.as_raw_fd());
    let (uid, gid) = (who.uid, who.gid);

    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure only calls async-signal-safe functions on values
    // prepared before fork (see `child_setup`).
    unsafe {
        cmd.pre_exec(move || child_setup(uid, gid, &cwd, control_rd));
    }
    let mut child = cmd.spawn()?;
    let pid = child.id() as i32;
    let take = |fd: Option<OwnedFd>| -> io::Result<OwnedFd> {
        let fd = fd.ok_or_else(|| io::Error::other("child pipe missing"))?;
        sys::set_nonblocking(fd.as_raw_fd())?;
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
            sys::set_nonblocking(write.as_raw_fd())?;
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

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Runs in the forked child before exec: async-signal-safe calls only, no
/// allocation.
fn child_setup(uid: u32, gid: u32, cwd: &CString, control_rd: RawFd) -> io::Result<()> {
    // SAFETY: each call below is async-signal-safe and takes either plain
    // integers or pointers to memory prepared before fork.
    unsafe {
        check(libc::setsid())?;
        // A user namespace whose setgroups is denied keeps the (already
        // empty or unmapped) groups it was created with.
        if libc::setgroups(0, std::ptr::null()) == -1 && *libc::__errno_location() != libc::EPERM {
            return Err(io::Error::last_os_error());
        }
        check(libc::setresgid(gid, gid, gid))?;
        check(libc::setresuid(uid, uid, uid))?;
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
        check(libc::chdir(cwd.as_ptr()))?;
        if control_rd >= 0 {
            if control_rd == CONTROL_FD {
                check(libc::fcntl(CONTROL_FD, libc::F_SETFD, 0))?;
            } else {
                // dup2 clears close-on-exec on the new descriptor.
                check(libc::dup2(control_rd, CONTROL_FD))?;
            }
        }
    }
    Ok(())
}

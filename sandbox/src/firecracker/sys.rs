//! The few system calls the Firecracker layer makes itself, each wrapped
//! once: pidfds (a handle on the VMM that a recycled pid cannot fool, to
//! signal it and to wait for its end) and the network-namespace unshare done
//! in the jailer's child before `exec`. Kiln's other crates carry similar
//! wrappers; they are meant to meet in one low-level crate.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A pidfd for `pid` (`pidfd_open(2)`, Linux 5.3).
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `signal` to the process behind `pidfd` (`pidfd_send_signal(2)`).
/// `ESRCH` (already gone) counts as success.
pub(crate) fn pidfd_kill(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: a plain system call; the null siginfo asks for the default.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// Waits until the process behind `pidfd` has exited (its pidfd becomes
/// readable, zombie or reaped) or `within` passes; returns whether it
/// exited. Blocks the calling thread.
pub(crate) fn pidfd_wait_exit(pidfd: &OwnedFd, within: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, for the length given.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return true;
        }
        if n == 0 || left.is_zero() {
            return false;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Reaps the process behind `pidfd` if it is our child and has exited;
/// a no-op (`ECHILD`) for anyone else's.
pub(crate) fn pidfd_reap(pidfd: &OwnedFd) {
    // SAFETY: `info` is a valid out-parameter; WNOHANG never blocks.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        );
    }
}

/// Moves the calling process into a new network namespace with only a
/// loopback interface. Called between `fork` and `exec` of the jailer, so
/// that the VMM has a network of its own and nothing needs cleaning up
/// afterwards (the namespace ends with its last process).
pub(crate) fn unshare_network() -> io::Result<()> {
    // SAFETY: unshare takes flags only; async-signal-safe.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes this process the reaper of its orphaned descendants
/// (`PR_SET_CHILD_SUBREAPER`).
pub(crate) fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfd_sees_its_process_killed_and_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let fd = pidfd_open(child.id()).expect("pidfd");
        assert!(!pidfd_wait_exit(&fd, Duration::from_millis(10)));
        pidfd_kill(&fd, libc::SIGKILL).expect("kill");
        assert!(pidfd_wait_exit(&fd, Duration::from_secs(10)));
        pidfd_reap(&fd);
        // Reaped already: nothing is left for `wait`.
        let e = child.wait().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECHILD));
        // Killing what is gone is not an error.
        pidfd_kill(&fd, libc::SIGKILL).expect("kill after exit");
    }
}

//! The system calls of the Firecracker layer that `kiln-sys` does not
//! offer: signalling and reaping a VMM through its pidfd (opened and
//! polled with `kiln_sys`), the network-namespace unshare done in the
//! jailer's child before `exec`, and the subreaper flag. Candidates for
//! `kiln-sys` once another crate needs them.

use std::io;
use std::os::fd::{AsFd as _, AsRawFd, OwnedFd};
use std::time::Duration;

/// A pidfd for `pid` (`pidfd_open(2)`).
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    kiln_sys::pidfd::pidfd_open(pid as i32)
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
    kiln_sys::poll::wait_readable(pidfd.as_fd(), within).unwrap_or(false)
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

//! pidfds: a handle on one process that cannot be confused with a later
//! process of the same pid, and that polls readable when the process exits.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Opens a close-on-exec pidfd for `pid` (Linux 5.3).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain system call with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::time::Duration;

    #[test]
    fn a_pidfd_polls_readable_once_its_process_exits() {
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let fd = pidfd_open(child.id() as i32).unwrap();
        assert!(!crate::poll::wait_readable(fd.as_fd(), Duration::from_millis(1)).unwrap());
        assert!(crate::poll::wait_readable(fd.as_fd(), Duration::from_secs(10)).unwrap());
        child.wait().unwrap();
        assert!(pidfd_open(-5).is_err());
    }
}

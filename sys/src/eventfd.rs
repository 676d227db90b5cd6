//! eventfds: a counter a thread can make readable to wake another thread's
//! poll loop (shutdown, mostly).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::cvt;

/// A non-blocking, close-on-exec eventfd starting at zero.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain system call with integer flags.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: a fresh descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to the counter: every poller of `fd` sees it readable.
pub fn signal(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::time::Duration;

    #[test]
    fn a_signalled_eventfd_is_readable() {
        let e = eventfd().unwrap();
        assert!(!crate::poll::wait_readable(e.as_fd(), Duration::ZERO).unwrap());
        signal(e.as_fd()).unwrap();
        assert!(crate::poll::wait_readable(e.as_fd(), Duration::ZERO).unwrap());
    }
}

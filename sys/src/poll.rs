//! `poll(2)`: waiting on several descriptors at once, with a timeout.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

fn timeout_ms(timeout: Option<Duration>) -> libc::c_int {
    match timeout {
        None => -1,
        // Rounded up, so that a short wait never becomes a busy loop.
        Some(d) => d.as_micros().div_ceil(1000).min(libc::c_int::MAX as u128) as libc::c_int,
    }
}

/// Polls `fds` for up to `timeout` (`None`: forever); returns how many have
/// events. EINTR counts as "nothing ready" (0), so signal-driven callers
/// simply loop.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    // SAFETY: `fds` is a live array of `len` pollfd structs that the kernel
    // fills in.
    let n = unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout_ms(timeout),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

/// Polls `(descriptor, events)` pairs and returns each one's `revents`.
pub fn poll_borrowed(
    fds: &[(BorrowedFd<'_>, libc::c_short)],
    timeout: Option<Duration>,
) -> io::Result<Vec<libc::c_short>> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|(fd, events)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: *events,
            revents: 0,
        })
        .collect();
    poll(&mut pollfds, timeout)?;
    Ok(pollfds.iter().map(|p| p.revents).collect())
}

/// Waits until `fd` is readable (or hung up) for at most `timeout`; `false`
/// when the time ran out.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let end = std::time::Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        let r = poll_borrowed(&[(fd, libc::POLLIN)], Some(left))?;
        if r[0] != 0 {
            return Ok(true);
        }
        if left.is_zero() {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_pipe_becomes_readable_once_written_and_a_wait_times_out_before() {
        let (r, w) = crate::fd::pipe().unwrap();
        assert!(!wait_readable(r.as_fd(), Duration::from_millis(10)).unwrap());
        // SAFETY: writes one byte from a live buffer to our own pipe.
        let written = unsafe { libc::write(w.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        assert_eq!(written, 1);
        assert!(wait_readable(r.as_fd(), Duration::from_secs(5)).unwrap());
        let ev = poll_borrowed(
            &[(r.as_fd(), libc::POLLIN), (w.as_fd(), libc::POLLOUT)],
            None,
        )
        .unwrap();
        assert_eq!(ev, vec![libc::POLLIN, libc::POLLOUT]);
    }

    #[test]
    fn sub_millisecond_timeouts_round_up() {
        assert_eq!(timeout_ms(Some(Duration::from_micros(1))), 1);
        assert_eq!(timeout_ms(None), -1);
        assert_eq!(
            timeout_ms(Some(Duration::from_secs(u64::MAX))),
            libc::c_int::MAX
        );
    }
}

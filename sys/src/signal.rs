//! Signals as events: blocking a set and reading it from a signalfd (the
//! agent's poll loop), or waiting for it with `sigwait` (a thread that
//! only waits for termination).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::cvt;

fn set_of(signals: &[libc::c_int]) -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set before sigaddset reads it;
    // signal numbers out of range are refused by sigaddset, not UB.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for &s in signals {
            libc::sigaddset(set.as_mut_ptr(), s);
        }
        set.assume_init()
    }
}

/// Blocks `signals` in the calling thread (and in threads it starts
/// afterwards).
pub fn block(signals: &[libc::c_int]) -> io::Result<()> {
    let set = set_of(signals);
    // SAFETY: `set` is an initialised sigset.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Blocks `signals` and returns a non-blocking, close-on-exec signalfd
/// that reports them. Children must unblock them again before they exec.
pub fn block_into_signalfd(signals: &[libc::c_int]) -> io::Result<OwnedFd> {
    block(signals)?;
    let set = set_of(signals);
    // SAFETY: `set` is initialised; -1 asks for a new descriptor.
    let fd = cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) })?;
    // SAFETY: a fresh descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads every pending signal from a non-blocking signalfd.
pub fn read_signalfd(fd: BorrowedFd<'_>) -> Vec<libc::c_int> {
    let mut out = Vec::new();
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    loop {
        let mut info = MaybeUninit::<libc::signalfd_siginfo>::zeroed();
        // SAFETY: the buffer is exactly one signalfd_siginfo.
        let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
        if n != size as isize {
            return out;
        }
        // SAFETY: the kernel filled the whole structure.
        out.push(unsafe { info.assume_init() }.ssi_signo as libc::c_int);
    }
}

/// Waits for one of `signals` (blocked beforehand) and returns it.
pub fn wait(signals: &[libc::c_int]) -> io::Result<libc::c_int> {
    let set = set_of(signals);
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised, `sig` is a valid out pointer.
    let r = unsafe { libc::sigwait(&set, &mut sig) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(sig)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_blocked_signal_arrives_on_the_signalfd() {
        // In a thread of its own: the mask is per thread, and the test
        // harness's other threads must keep theirs.
        std::thread::spawn(|| {
            let fd = block_into_signalfd(&[libc::SIGUSR2]).unwrap();
            // SAFETY: signals this very thread; SIGUSR2 is blocked here.
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGUSR2) };
            assert_eq!(read_signalfd(fd.as_fd()), vec![libc::SIGUSR2]);
            assert!(read_signalfd(fd.as_fd()).is_empty());
        })
        .join()
        .unwrap();
    }
}

//! File descriptors: the `-1`-means-errno convention as `io::Result`,
//! retrying on EINTR, pipes, descriptor flags and duplication.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Turns a C return value into `io::Result`: negative means `errno`.
pub fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Calls `f` again for as long as it fails with EINTR.
pub fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// A pipe, both ends close-on-exec: `(read, write)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both are fresh descriptors owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn update_flag(fd: RawFd, get: libc::c_int, set: libc::c_int, flag: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl with integer arguments on a descriptor of the caller's.
    let flags = cvt(unsafe { libc::fcntl(fd, get) })?;
    if flags & flag == 0 {
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(fd, set, flags | flag) })?;
    }
    Ok(())
}

/// Sets `O_NONBLOCK`.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    update_flag(
        fd.as_raw_fd(),
        libc::F_GETFL,
        libc::F_SETFL,
        libc::O_NONBLOCK,
    )
}

/// Sets `FD_CLOEXEC` on a descriptor given by number (inherited ones, at
/// start-up, before anything owns them).
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    update_flag(fd, libc::F_GETFD, libc::F_SETFD, libc::FD_CLOEXEC)
}

/// A close-on-exec duplicate.
pub fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

/// Whether `fd` is an open descriptor of this process.
pub fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn a_pipe_carries_bytes_and_its_flags_can_be_set() {
        let (r, w) = pipe().unwrap();
        assert!(is_open(r.as_raw_fd()) && is_open(w.as_raw_fd()));
        set_nonblocking(r.as_fd()).unwrap();
        let mut rf = std::fs::File::from(r);
        let mut buf = [0u8; 4];
        assert_eq!(
            rf.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let mut wf = std::fs::File::from(dup(w.as_fd()).unwrap());
        wf.write_all(b"kiln").unwrap();
        rf.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"kiln");
        let raw = w.as_raw_fd();
        drop(w);
        drop(wf);
        assert!(!is_open(raw));
    }

    #[test]
    fn cvt_and_retry_report_errno() {
        assert_eq!(cvt(3).unwrap(), 3);
        let mut tries = 0;
        let r: io::Result<()> = retry_eintr(|| {
            tries += 1;
            if tries < 3 {
                Err(io::Error::from_raw_os_error(libc::EINTR))
            } else {
                Err(io::Error::from_raw_os_error(libc::EBADF))
            }
        });
        assert_eq!(tries, 3);
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
    }
}

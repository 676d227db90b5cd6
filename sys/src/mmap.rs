//! Memory mappings: anonymous memory owned by a value (a VMM's guest memory
//! in the page server's harness), and advice on ranges of a mapping.

use std::ffi::c_void;
use std::io;

use crate::cvt;

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf with a constant name has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size <= 0 {
        4096
    } else {
        size as usize
    }
}

/// `madvise(MADV_POPULATE_READ)`: faults `[addr, addr + len)` of a mapping
/// of the caller's in, reading a file with large requests; falls back to
/// `MADV_WILLNEED` (readahead only) on kernels before 5.14.
pub fn populate_read(addr: *const u8, len: usize) -> io::Result<()> {
    // SAFETY: advice only; POPULATE_READ never writes to the range, and
    // the kernel refuses a range outside the caller's mappings.
    let r = unsafe { libc::madvise(addr as *mut c_void, len, libc::MADV_POPULATE_READ) };
    if r == 0 {
        return Ok(());
    }
    // SAFETY: as above; WILLNEED only starts readahead.
    cvt(unsafe { libc::madvise(addr as *mut c_void, len, libc::MADV_WILLNEED) }).map(drop)
}

/// `madvise(MADV_DONTNEED)`: discards a range of an anonymous mapping (a
/// balloon's deflation, which a userfaultfd reports as a remove event).
///
/// # Safety
/// The range must be a mapping owned by the caller into whose contents
/// nothing holds references: they are discarded.
pub unsafe fn madvise_dontneed(addr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    cvt(unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTNEED) }).map(drop)
}

/// An anonymous private read-write mapping, not populated, unmapped on drop.
#[derive(Debug)]
pub struct AnonMapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; access goes through raw pointers
// whose synchronisation is the users' concern (the kernel serialises
// faults on it).
unsafe impl Send for AnonMapping {}
// SAFETY: as above.
unsafe impl Sync for AnonMapping {}

impl AnonMapping {
    /// Maps `len` bytes (a page multiple).
    pub fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: addr.cast(),
            len,
        })
    }

    /// First byte of the mapping.
    pub fn addr(&self) -> *mut u8 {
        self.addr
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never, for a successful `new`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_anonymous_mapping_is_zeroed_writable_and_can_be_discarded() {
        let page = page_size();
        assert!(page.is_power_of_two());
        let m = AnonMapping::new(4 * page).unwrap();
        assert_eq!(m.len(), 4 * page);
        // SAFETY: the first page lies inside the mapping we own.
        unsafe {
            assert_eq!(m.addr().read(), 0);
            m.addr().write(7);
            assert_eq!(m.addr().read(), 7);
            madvise_dontneed(m.addr(), page).unwrap();
            assert_eq!(m.addr().read(), 0, "a discarded page reads as zeros");
        }
        populate_read(m.addr(), 4 * page).unwrap();
    }
}

//! The VMM's side of the `Uffd` snapshot-load handshake, played exactly as
//! Firecracker plays it: map guest memory anonymously, create a non-blocking
//! userfaultfd with the remove event, register every region for missing
//! faults, connect to the page server and send the region table as JSON with
//! the uffd attached, in one `sendmsg`.
//!
//! It exists so that tests, benchmarks and backends without Firecracker can
//! drive the page server for real. Touching guest memory from the thread that
//! serves faults would deadlock: callers touch it from other threads or
//! processes.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::sys::{self, AnonMapping};

/// One guest region to map: its size and where it lives in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// Bytes (a page multiple).
    pub size: u64,
    /// Offset in the snapshot memory file.
    pub offset: u64,
}

/// Which JSON the handshake uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFormat {
    /// All five fields, as current Firecracker sends.
    Current,
    /// Only `base_host_virt_addr`, `size` and `offset`, as older senders do.
    ThreeField,
}

/// Why the VMM side of a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Mapping guest memory failed.
    #[error("mapping {size} bytes of guest memory failed: {source}")]
    Map {
        /// Bytes requested.
        size: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating or registering the userfaultfd failed.
    #[error(
        "setting up the userfaultfd failed (run as root or set vm.unprivileged_userfaultfd=1): {0}"
    )]
    Userfaultfd(#[source] io::Error),
    /// Connecting or sending to the page server failed.
    #[error("sending the handshake to the page server failed: {0}")]
    Send(#[source] io::Error),
    /// `madvise` failed.
    #[error("madvise failed: {0}")]
    Madvise(#[source] io::Error),
}

/// Guest memory restored through a page server.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<(AnonMapping, RegionSpec)>,
    uffd: OwnedFd,
    stream: UnixStream,
}

/// Creates a userfaultfd exactly as Firecracker does (non-blocking,
/// close-on-exec, `UFFD_FEATURE_EVENT_REMOVE`).
pub fn userfaultfd() -> Result<OwnedFd, GuestError> {
    sys::uffd_create_like_firecracker().map_err(GuestError::Userfaultfd)
}

/// Connects to `socket` and sends `payload` in one message, with `fd`
/// attached when given: the raw handshake, for probing the server with
/// arbitrary input.
pub fn send_handshake(
    socket: &Path,
    payload: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> Result<UnixStream, GuestError> {
    let stream = UnixStream::connect(socket).map_err(GuestError::Send)?;
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    sys::send_with_fds(stream.as_fd(), payload, &fds).map_err(GuestError::Send)?;
    Ok(stream)
}

impl GuestMemory {
    /// Maps and registers `regions`, then sends the handshake to `socket`.
    pub fn restore(
        socket: &Path,
        regions: &[RegionSpec],
        format: HandshakeFormat,
    ) -> Result<Self, GuestError> {
        let uffd = userfaultfd()?;
        let page = sys::page_size() as u64;
        let mut mapped = Vec::with_capacity(regions.len());
        let mut json = Vec::with_capacity(regions.len());
        for spec in regions {
            let map = AnonMapping::new(spec.size as usize).map_err(|source| GuestError::Map {
                size: spec.size,
                source,
            })?;
            sys::uffd_register(uffd.as_fd(), map.addr() as u64, spec.size)
                .map_err(GuestError::Userfaultfd)?;
            json.push(match format {
                HandshakeFormat::Current => serde_json::json!({
                    "base_host_virt_addr": map.addr() as u64,
                    "size": spec.size,
                    "offset": spec.offset,
                    "page_size": page,
                    "page_size_kib": page,
                }),
                HandshakeFormat::ThreeField => serde_json::json!({
                    "base_host_virt_addr": map.addr() as u64,
                    "size": spec.size,
                    "offset": spec.offset,
                }),
            });
            mapped.push((map, *spec));
        }
        let payload = serde_json::to_vec(&json).expect("JSON values always serialise");
        let stream = send_handshake(socket, &payload, Some(uffd.as_fd()))?;
        Ok(Self {
            regions: mapped,
            uffd,
            stream,
        })
    }

    /// Number of regions.
    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// The spec region `i` was created from.
    pub fn region_spec(&self, i: usize) -> RegionSpec {
        self.regions[i].1
    }

    /// Copies `out.len()` bytes of region `region` starting at `offset` into
    /// `out`, faulting the pages in (blocks until the page server serves them).
    pub fn read(&self, region: usize, offset: u64, out: &mut [u8]) {
        let (map, spec) = &self.regions[region];
        assert!(
            offset + out.len() as u64 <= spec.size,
            "read past the end of region {region}"
        );
        // SAFETY: the source range lies inside the live mapping (asserted);
        // `out` is a distinct, writable buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                map.addr().add(offset as usize),
                out.as_mut_ptr(),
                out.len(),
            )
        };
    }

    /// Reads one byte, faulting its page in.
    pub fn touch(&self, region: usize, offset: u64) -> u8 {
        let (map, spec) = &self.regions[region];
        assert!(offset < spec.size, "touch past the end of region {region}");
        // SAFETY: the address lies inside the live mapping (asserted).
        unsafe { std::ptr::read_volatile(map.addr().add(offset as usize)) }
    }

    /// Drops `[offset, offset + len)` of region `region` with
    /// `madvise(MADV_DONTNEED)`, as a balloon inflation does; the page server
    /// sees `UFFD_EVENT_REMOVE` and must serve zeros there afterwards.
    pub fn remove(&self, region: usize, offset: u64, len: u64) -> Result<(), GuestError> {
        let (map, spec) = &self.regions[region];
        assert!(
            offset + len <= spec.size,
            "remove past the end of region {region}"
        );
        // SAFETY: the range lies inside our mapping and no reference into it
        // is held (all access goes through copies).
        unsafe { sys::madvise_dontneed(map.addr().add(offset as usize), len as usize) }
            .map_err(GuestError::Madvise)
    }

    /// The VMM's copy of the userfaultfd.
    pub fn uffd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }

    /// The connection to the page server.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }
}

//! The one message a VMM sends the page server, parsed into a validated
//! [`RegionTable`].
//!
//! Firecracker's `Uffd` memory backend connects to the page server's socket
//! and sends, in a single `sendmsg`, a JSON array of `GuestRegionUffdMapping`
//! objects with the userfaultfd attached as SCM_RIGHTS. This module is the
//! edge where that untrusted input becomes a typed value: every later stage
//! relies on the table being sorted, non-overlapping, page aligned and inside
//! the memory file, so those facts are checked here, once, and the
//! descriptor is checked to be a userfaultfd.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::sys;

/// Upper bound on the number of regions in one handshake; Firecracker sends
/// one per guest memory slot (a handful).
pub const MAX_REGIONS: usize = 1024;
/// Largest handshake message accepted, in bytes of JSON.
pub const MAX_HANDSHAKE_BYTES: usize = 256 * 1024;

/// One guest memory region as Firecracker describes it (`GuestRegionUffdMapping`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct GuestRegionUffdMapping {
    /// Start of the region in the VMM's address space.
    pub base_host_virt_addr: u64,
    /// Length of the region in bytes.
    pub size: u64,
    /// Offset of the region's first byte in the snapshot memory file.
    pub offset: u64,
    /// Page size backing the region in bytes (absent in older senders).
    #[serde(default)]
    pub page_size: Option<u64>,
    /// Deprecated duplicate of `page_size`, despite its name also in bytes.
    #[serde(default)]
    pub page_size_kib: Option<u64>,
}

/// A validated guest memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Start of the region in the VMM's address space (page aligned).
    pub base: u64,
    /// Length in bytes (a page multiple).
    pub size: u64,
    /// Offset in the memory file (page aligned).
    pub offset: u64,
    /// Page size in bytes (a power of two, at least the system page size).
    pub page_size: u64,
}

impl Region {
    /// True when `addr` falls inside the region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.size
    }

    /// Number of pages in the region.
    pub fn pages(&self) -> u64 {
        self.size / self.page_size
    }
}

/// The regions of one restore, sorted by address, validated against the
/// memory file they index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionTable {
    regions: Vec<Region>,
}

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// `SO_PEERCRED` could not be read.
    #[error("cannot read the peer's credentials: {0}")]
    PeerCred(#[source] io::Error),
    /// Receiving the message failed.
    #[error("receiving the handshake failed: {0}")]
    Receive(#[source] io::Error),
    /// No file descriptor came with the message.
    #[error("the handshake carried no file descriptor; attach the userfaultfd with SCM_RIGHTS")]
    MissingFd,
    /// More than one file descriptor came with the message.
    #[error(
        "the handshake carried {0} file descriptors; exactly one (the userfaultfd) is expected"
    )]
    ExtraFds(usize),
    /// The descriptor is not a userfaultfd.
    #[error("the descriptor sent is not a userfaultfd")]
    NotUserfaultfd,
    /// The message exceeds [`MAX_HANDSHAKE_BYTES`].
    #[error("the handshake exceeds {MAX_HANDSHAKE_BYTES} bytes")]
    TooLarge,
    /// The message is not a JSON array of region objects.
    #[error("the region table is not valid JSON of the expected shape: {0}")]
    Json(#[source] serde_json::Error),
    /// The message ended before the JSON was complete.
    #[error("the region table JSON is truncated ({received} bytes received)")]
    Truncated {
        /// Bytes received before the connection ended or went quiet.
        received: usize,
    },
    /// The array is empty.
    #[error("the region table is empty; a restore needs at least one region")]
    Empty,
    /// More regions than [`MAX_REGIONS`].
    #[error("the region table has {0} regions; at most {MAX_REGIONS} are accepted")]
    TooManyRegions(usize),
    /// A region has a page size that is not a power of two of at least the system page.
    #[error("region {index} has page size {page_size}; expected a power of two >= {min}")]
    BadPageSize {
        /// Position of the region in the array.
        index: usize,
        /// The page size sent.
        page_size: u64,
        /// The system page size.
        min: u64,
    },
    /// A region's address, size or offset is not a multiple of its page size, or its size is 0.
    #[error("region {index} is not page aligned (base {base:#x}, size {size:#x}, offset {offset:#x}, page {page_size:#x}) or is empty")]
    Misaligned {
        /// Position of the region in the array.
        index: usize,
        /// Its base address.
        base: u64,
        /// Its size.
        size: u64,
        /// Its file offset.
        offset: u64,
        /// Its page size.
        page_size: u64,
    },
    /// A region wraps around the address space.
    #[error("region {index} wraps around the address space")]
    AddressOverflow {
        /// Position of the region in the array.
        index: usize,
    },
    /// A region reaches past the end of the memory file.
    #[error("region {index} covers file bytes [{offset:#x}, +{size:#x}) but the memory file has only {file_len:#x} bytes")]
    PastEndOfFile {
        /// Position of the region in the array.
        index: usize,
        /// Its file offset.
        offset: u64,
        /// Its size.
        size: u64,
        /// Length of the memory file.
        file_len: u64,
    },
    /// Two regions overlap in guest address space or in the memory file.
    #[error("regions {first} and {second} overlap in {space}")]
    Overlap {
        /// Index of one region.
        first: usize,
        /// Index of the other.
        second: usize,
        /// "address space" or "the memory file".
        space: &'static str,
    },
}

/// Receives the one handshake message on `stream` (possibly split across
/// reads, within `timeout`) and returns the userfaultfd, made non-blocking,
/// and the region table validated against a memory file of `file_len` bytes.
pub fn receive(
    stream: &UnixStream,
    file_len: u64,
    timeout: Duration,
) -> Result<(OwnedFd, RegionTable), HandshakeError> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0;
    let mut fds: Vec<OwnedFd> = Vec::new();
    let table = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(HandshakeError::Truncated { received });
        }
        stream
            .set_read_timeout(Some(remaining))
            .map_err(HandshakeError::Receive)?;
        if received == buf.len() {
            if buf.len() >= MAX_HANDSHAKE_BYTES {
                return Err(HandshakeError::TooLarge);
            }
            buf.resize(buf.len() * 2, 0);
        }
        let (n, more_fds) = match sys::recv_with_fds(stream.as_fd(), &mut buf[received..]) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HandshakeError::Truncated { received })
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HandshakeError::Receive(e)),
        };
        fds.extend(more_fds);
        if n == 0 {
            return Err(HandshakeError::Truncated { received });
        }
        received += n;
        match RegionTable::parse_partial(&buf[..received], file_len, sys::page_size() as u64)? {
            Parse::Complete(table) => break table,
            Parse::NeedMore => continue,
        }
    };
    if fds.len() > 1 {
        return Err(HandshakeError::ExtraFds(fds.len()));
    }
    let uffd = fds.pop().ok_or(HandshakeError::MissingFd)?;
    if !sys::is_userfaultfd(uffd.as_fd()) {
        return Err(HandshakeError::NotUserfaultfd);
    }
    sys::set_nonblocking(uffd.as_fd()).map_err(HandshakeError::Receive)?;
    Ok((uffd, table))
}

/// Result of trying to parse a possibly partial handshake message.
#[derive(Debug)]
pub enum Parse {
    /// The bytes so far are a complete, valid table.
    Complete(RegionTable),
    /// The bytes so far are a valid prefix; more may follow.
    NeedMore,
}

impl RegionTable {
    /// Parses the bytes received so far. Returns `NeedMore` while they are a
    /// valid JSON prefix, so a table split across reads is still accepted.
    pub fn parse_partial(
        bytes: &[u8],
        file_len: u64,
        system_page: u64,
    ) -> Result<Parse, HandshakeError> {
        match serde_json::from_slice::<Vec<GuestRegionUffdMapping>>(bytes) {
            Ok(raw) => Self::validate(&raw, file_len, system_page).map(Parse::Complete),
            Err(e) if e.is_eof() => Ok(Parse::NeedMore),
            Err(e) => Err(HandshakeError::Json(e)),
        }
    }

    /// Checks raw mappings against the memory file length and builds the table.
    pub fn validate(
        raw: &[GuestRegionUffdMapping],
        file_len: u64,
        system_page: u64,
    ) -> Result<Self, HandshakeError> {
        if raw.is_empty() {
            return Err(HandshakeError::Empty);
        }
        if raw.len() > MAX_REGIONS {
            return Err(HandshakeError::TooManyRegions(raw.len()));
        }
        let mut indexed = Vec::with_capacity(raw.len());
        for (index, m) in raw.iter().enumerate() {
            let page_size = m.page_size.or(m.page_size_kib).unwrap_or(system_page);
            if !page_size.is_power_of_two() || page_size < system_page {
                return Err(HandshakeError::BadPageSize {
                    index,
                    page_size,
                    min: system_page,
                });
            }
            let aligned = |v: u64| v.is_multiple_of(page_size);
            if m.size == 0
                || !aligned(m.base_host_virt_addr)
                || !aligned(m.size)
                || !aligned(m.offset)
            {
                return Err(HandshakeError::Misaligned {
                    index,
                    base: m.base_host_virt_addr,
                    size: m.size,
                    offset: m.offset,
                    page_size,
                });
            }
            if m.base_host_virt_addr.checked_add(m.size).is_none() {
                return Err(HandshakeError::AddressOverflow { index });
            }
            match m.offset.checked_add(m.size) {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(HandshakeError::PastEndOfFile {
                        index,
                        offset: m.offset,
                        size: m.size,
                        file_len,
                    })
                }
            }
            indexed.push((
                index,
                Region {
                    base: m.base_host_virt_addr,
                    size: m.size,
                    offset: m.offset,
                    page_size,
                },
            ));
        }
        indexed.sort_by_key(|(_, r)| r.base);
        for pair in indexed.windows(2) {
            let ((i, a), (j, b)) = (&pair[0], &pair[1]);
            if a.base + a.size > b.base {
                return Err(HandshakeError::Overlap {
                    first: *i,
                    second: *j,
                    space: "address space",
                });
            }
        }
        let mut by_offset = indexed.clone();
        by_offset.sort_by_key(|(_, r)| r.offset);
        for pair in by_offset.windows(2) {
            let ((i, a), (j, b)) = (&pair[0], &pair[1]);
            if a.offset + a.size > b.offset {
                return Err(HandshakeError::Overlap {
                    first: *i,
                    second: *j,
                    space: "the memory file",
                });
            }
        }
        Ok(Self {
            regions: indexed.into_iter().map(|(_, r)| r).collect(),
        })
    }

    /// The regions, sorted by base address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Index of the region containing `addr`, if any.
    pub fn find(&self, addr: u64) -> Option<usize> {
        let idx = self.regions.partition_point(|r| r.base <= addr);
        let candidate = idx.checked_sub(1)?;
        self.regions[candidate].contains(addr).then_some(candidate)
    }

    /// Total guest memory in bytes.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn parse(json: &str, file_len: u64) -> Result<Parse, HandshakeError> {
        RegionTable::parse_partial(json.as_bytes(), file_len, 4096)
    }

    #[test]
    fn accepts_the_current_five_field_format() {
        let json = r#"[{"base_host_virt_addr":1048576,"size":2097152,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
        let Parse::Complete(table) = parse(json, 4 * MIB).unwrap() else {
            panic!("expected a complete table")
        };
        assert_eq!(table.regions()[0].page_size, 4096);
        assert_eq!(table.find(MIB + 5000), Some(0));
        assert_eq!(table.find(MIB - 1), None);
        assert_eq!(table.find(3 * MIB), None);
    }

    #[test]
    fn accepts_the_old_three_field_format_with_the_system_page() {
        let json = r#"[{"base_host_virt_addr":8192,"size":8192,"offset":4096}]"#;
        let Parse::Complete(table) = parse(json, 3 * 4096).unwrap() else {
            panic!("expected a complete table")
        };
        assert_eq!(table.regions()[0].page_size, 4096);
    }

    #[test]
    fn a_json_prefix_asks_for_more_and_garbage_is_an_error() {
        assert!(matches!(
            parse(r#"[{"base_host_virt_addr":81"#, MIB),
            Ok(Parse::NeedMore)
        ));
        assert!(matches!(parse("hello", MIB), Err(HandshakeError::Json(_))));
        assert!(matches!(parse("[]", MIB), Err(HandshakeError::Empty)));
    }

    #[test]
    fn rejects_overlap_misalignment_and_regions_past_the_file() {
        let overlap = r#"[{"base_host_virt_addr":0,"size":8192,"offset":0},{"base_host_virt_addr":4096,"size":4096,"offset":8192}]"#;
        assert!(matches!(
            parse(overlap, MIB),
            Err(HandshakeError::Overlap {
                space: "address space",
                ..
            })
        ));
        let file_overlap = r#"[{"base_host_virt_addr":0,"size":8192,"offset":0},{"base_host_virt_addr":65536,"size":4096,"offset":4096}]"#;
        assert!(matches!(
            parse(file_overlap, MIB),
            Err(HandshakeError::Overlap {
                space: "the memory file",
                ..
            })
        ));
        let past = r#"[{"base_host_virt_addr":0,"size":8192,"offset":4096}]"#;
        assert!(matches!(
            parse(past, 8192),
            Err(HandshakeError::PastEndOfFile { .. })
        ));
        let misaligned = r#"[{"base_host_virt_addr":100,"size":4096,"offset":0}]"#;
        assert!(matches!(
            parse(misaligned, MIB),
            Err(HandshakeError::Misaligned { .. })
        ));
        let bad_page = r#"[{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":3000}]"#;
        assert!(matches!(
            parse(bad_page, MIB),
            Err(HandshakeError::BadPageSize { .. })
        ));
        let wraps = format!(
            r#"[{{"base_host_virt_addr":{},"size":8192,"offset":0}}]"#,
            u64::MAX - 4095
        );
        assert!(matches!(
            parse(&wraps, MIB),
            Err(HandshakeError::AddressOverflow { .. })
        ));
    }
}

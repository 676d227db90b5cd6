//! The REAP-style working set: the ordered list of memory-file pages a
//! recording restore faulted in, stored next to the snapshot so that later
//! restores can install all of them at once instead of one fault at a time.
//!
//! File format (little endian), written atomically (temp file + rename):
//!
//! ```text
//! magic "KILNWSET" | version u32 = 1 | page_size u32 | memory_len u64
//! | memory_digest [32] | count u64 | count x offset u64 | sha256 [32]
//! ```
//!
//! The header carries the memory file's [`MemoryIdentity`], so a working set
//! recorded against other bytes is refused rather than silently installed;
//! the trailing SHA-256 catches torn or corrupted files.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::memory::MemoryIdentity;

const MAGIC: &[u8; 8] = b"KILNWSET";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 32 + 8;

/// Why a working set could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// Reading or writing the file failed.
    #[error("working set {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is not a working set of a version we understand, or is corrupt.
    #[error("working set {path} is corrupt or of an unknown format: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: &'static str,
    },
    /// The working set was recorded against a different memory file.
    #[error("working set {path} was recorded for another memory file (length {recorded_len}, expected {expected_len}); record it again")]
    WrongMemoryFile {
        /// The file.
        path: PathBuf,
        /// Memory length in the working set header.
        recorded_len: u64,
        /// Length of the memory file being served.
        expected_len: u64,
    },
}

/// An ordered list of page-aligned memory-file offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    /// Page size the offsets are aligned to.
    pub page_size: u32,
    /// Identity of the memory file the offsets index.
    pub identity: MemoryIdentity,
    /// File offsets in first-touch order, each once.
    pub offsets: Vec<u64>,
}

/// The conventional working-set path for a memory file: `<memory>.ws`.
pub fn default_path(memory: &Path) -> PathBuf {
    let mut name = memory.as_os_str().to_owned();
    name.push(".ws");
    PathBuf::from(name)
}

impl WorkingSet {
    /// Encodes the working set into its file format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.offsets.len() * 8 + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.page_size.to_le_bytes());
        out.extend_from_slice(&self.identity.len.to_le_bytes());
        out.extend_from_slice(&self.identity.digest);
        out.extend_from_slice(&(self.offsets.len() as u64).to_le_bytes());
        for off in &self.offsets {
            out.extend_from_slice(&off.to_le_bytes());
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Decodes a file's bytes, checking format and checksum (not identity).
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Self, WorkingSetError> {
        let corrupt = |reason| WorkingSetError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        if bytes.len() < HEADER_LEN + 32 || &bytes[..8] != MAGIC {
            return Err(corrupt("missing KILNWSET header"));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            return Err(corrupt("checksum mismatch"));
        }
        let u32_at = |i: usize| u32::from_le_bytes(body[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        if u32_at(8) != VERSION {
            return Err(corrupt("unsupported version"));
        }
        let page_size = u32_at(12);
        if !page_size.is_power_of_two() {
            return Err(corrupt("page size is not a power of two"));
        }
        let len = u64_at(16);
        let digest: [u8; 32] = body[24..56].try_into().expect("32 bytes");
        let count = u64_at(56) as usize;
        if body.len() != HEADER_LEN + count.saturating_mul(8) {
            return Err(corrupt("page count does not match the file length"));
        }
        let offsets: Vec<u64> = (0..count).map(|i| u64_at(HEADER_LEN + i * 8)).collect();
        if offsets
            .iter()
            .any(|o| o % page_size as u64 != 0 || *o >= len)
        {
            return Err(corrupt("an offset is unaligned or past the memory file"));
        }
        Ok(Self {
            page_size,
            identity: MemoryIdentity { len, digest },
            offsets,
        })
    }

    /// Loads `path` and checks it belongs to the memory file `expected`.
    pub fn load(path: &Path, expected: MemoryIdentity) -> Result<Self, WorkingSetError> {
        let bytes = fs::read(path).map_err(|source| WorkingSetError::Io {
            path: path.to_owned(),
            source,
        })?;
        let ws = Self::decode(path, &bytes)?;
        if ws.identity != expected {
            return Err(WorkingSetError::WrongMemoryFile {
                path: path.to_owned(),
                recorded_len: ws.identity.len,
                expected_len: expected.len,
            });
        }
        Ok(ws)
    }

    /// Writes the working set to `path` atomically: a reader sees the old
    /// file or the new one, never a mix.
    pub fn write_atomic(&self, path: &Path) -> Result<(), WorkingSetError> {
        let io_err = |source| WorkingSetError::Io {
            path: path.to_owned(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp.{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&self.encode())?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io_err)
    }

    /// The pages as sorted, coalesced `(offset, len)` runs of the file, so
    /// that prefetch reads and copies them in as few large operations as
    /// possible.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let page = self.page_size as u64;
        let mut sorted = self.offsets.clone();
        sorted.sort_unstable();
        sorted.dedup();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for off in sorted {
            match runs.last_mut() {
                Some((start, len)) if *start + *len == off => *len += page,
                _ => runs.push((off, page)),
            }
        }
        runs
    }

    /// Total bytes covered.
    pub fn bytes(&self) -> u64 {
        self.runs().iter().map(|(_, len)| len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkingSet {
        WorkingSet {
            page_size: 4096,
            identity: MemoryIdentity {
                len: 1 << 20,
                digest: [7; 32],
            },
            offsets: vec![8192, 0, 4096, 65536, 12288, 61440],
        }
    }

    #[test]
    fn round_trips_through_the_file_format() {
        let ws = sample();
        let decoded = WorkingSet::decode(Path::new("x"), &ws.encode()).unwrap();
        assert_eq!(decoded, ws);
    }

    #[test]
    fn coalesces_pages_into_sorted_runs() {
        assert_eq!(sample().runs(), vec![(0, 16384), (61440, 8192)]);
        assert_eq!(sample().bytes(), 6 * 4096);
    }

    #[test]
    fn a_flipped_byte_or_other_memory_file_is_refused() {
        let ws = sample();
        let mut bytes = ws.encode();
        bytes[HEADER_LEN + 3] ^= 1;
        assert!(matches!(
            WorkingSet::decode(Path::new("x"), &bytes),
            Err(WorkingSetError::Corrupt {
                reason: "checksum mismatch",
                ..
            })
        ));
        let dir = std::env::temp_dir().join(format!("kiln-ws-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.ws");
        ws.write_atomic(&path).unwrap();
        let other = MemoryIdentity {
            len: 1 << 20,
            digest: [8; 32],
        };
        assert!(matches!(
            WorkingSet::load(&path, other),
            Err(WorkingSetError::WrongMemoryFile { .. })
        ));
        assert_eq!(WorkingSet::load(&path, ws.identity).unwrap(), ws);
        fs::remove_dir_all(&dir).unwrap();
    }
}

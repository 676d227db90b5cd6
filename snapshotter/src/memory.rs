//! The snapshot memory file, mapped once and shared by every restore of the
//! same snapshot.
//!
//! Faults are served with `UFFDIO_COPY` straight from this read-only shared
//! mapping, so the page cache holds one copy of the snapshot no matter how
//! many VMs are restored from it. The file's [`MemoryIdentity`] ties derived
//! artefacts (the working set) to exactly these bytes.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use sha2::{Digest, Sha256};

/// Who a memory file is: its length and a 32-byte digest. The digest is the
/// content SHA-256 when the snapshot store knows it, otherwise a digest of
/// the file's (device, inode, length, mtime) — cheap, and changed by any
/// rewrite of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryIdentity {
    /// Length of the file in bytes.
    pub len: u64,
    /// Content or metadata digest.
    pub digest: [u8; 32],
}

/// Why a memory file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Opening or inspecting the file failed.
    #[error("cannot open memory file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `mmap` failed.
    #[error("cannot map memory file {path}: {source}")]
    Map {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is empty; there is nothing to serve.
    #[error("memory file {0} is empty")]
    Empty(PathBuf),
    /// The identity given does not match the file's length.
    #[error("memory file {path} has {actual} bytes but its identity says {expected}")]
    LengthMismatch {
        /// The file.
        path: PathBuf,
        /// Length recorded in the identity.
        expected: u64,
        /// Length on disk.
        actual: u64,
    },
}

/// A read-only shared mapping of a snapshot memory file.
#[derive(Debug)]
pub struct MemoryFile {
    path: PathBuf,
    map: Mmap,
    identity: MemoryIdentity,
}

impl MemoryFile {
    /// Maps `path`, identifying it by its metadata.
    pub fn open(path: &Path) -> Result<Self, MemoryError> {
        Self::open_inner(path, None)
    }

    /// Maps `path`, identified by a known content digest (from a manifest).
    pub fn open_with_identity(path: &Path, identity: MemoryIdentity) -> Result<Self, MemoryError> {
        Self::open_inner(path, Some(identity))
    }

    fn open_inner(path: &Path, identity: Option<MemoryIdentity>) -> Result<Self, MemoryError> {
        let open_err = |source| MemoryError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if meta.len() == 0 {
            return Err(MemoryError::Empty(path.to_owned()));
        }
        let identity = match identity {
            Some(id) if id.len != meta.len() => {
                return Err(MemoryError::LengthMismatch {
                    path: path.to_owned(),
                    expected: id.len,
                    actual: meta.len(),
                })
            }
            Some(id) => id,
            None => {
                let mut h = Sha256::new();
                for v in [
                    meta.dev(),
                    meta.ino(),
                    meta.len(),
                    meta.mtime() as u64,
                    meta.mtime_nsec() as u64,
                ] {
                    h.update(v.to_le_bytes());
                }
                MemoryIdentity {
                    len: meta.len(),
                    digest: h.finalize().into(),
                }
            }
        };
        // SAFETY: snapshots are immutable once published (the store makes
        // them read-only); a concurrent truncation would be an operator error
        // that can at worst SIGBUS this process, which memmap2 documents.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| MemoryError::Map {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            map,
            identity,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Never true: empty files are refused at open.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Its identity.
    pub fn identity(&self) -> MemoryIdentity {
        self.identity
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Pointer to file offset `offset`; the caller keeps `offset + len <= self.len()`.
    pub fn ptr_at(&self, offset: u64) -> *const u8 {
        debug_assert!(offset < self.len());
        self.map[offset as usize..].as_ptr()
    }
}

//! Snapshots of a Firecracker VM and restores from them. A snapshot is
//! Firecracker's two files (the VM state and the guest memory, written
//! inside the VM's root by `PUT /snapshot/create` on a paused VM) moved out
//! to a directory of the caller's, made root-owned and read-only, plus what
//! a restore must know about the machine. A restore starts a fresh
//! Firecracker with the files made reachable in its root and calls
//! `PUT /snapshot/load` with one of two memory backends: `File` (the memory
//! file mapped privately) or `Uffd` (Kiln's page server on a unix socket
//! receives the userfaultfd and serves every page; see
//! `kiln_snapshotter::PageServer`). The vsock device's socket is moved to
//! the new VM's own with `vsock_override`.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use super::api::ApiError;
use super::process::LaunchError;

/// A snapshot on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Firecracker's VM state file.
    pub vmstate: PathBuf,
    /// The guest memory file.
    pub memory: PathBuf,
    /// The machine it was taken of.
    pub machine: MachineSummary,
    /// The host file of the machine's read-only root disk, if it had one:
    /// a restore makes it reachable where the snapshotted VM had it (in
    /// the chroot when jailed; unjailed, the same host path is reopened).
    pub root_drive: Option<PathBuf>,
}

/// What a restore needs to know of the snapshotted machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineSummary {
    pub vcpus: u8,
    pub memory_mib: u64,
    /// The guest CID when the machine has a vsock device.
    pub vsock_cid: Option<u32>,
}

/// Where a restored VM's memory comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryBackend {
    /// Map the snapshot's memory file (private, copy on write).
    File,
    /// Ask the page server listening on `socket` (a host path) to serve
    /// every page. A jailed VMM connects through a hard link in its chroot,
    /// so the socket must be on the chroot base's filesystem and its mode
    /// must let the VMM's uid connect.
    Uffd { socket: PathBuf },
}

/// How to restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSpec {
    pub snapshot: Snapshot,
    pub backend: MemoryBackend,
    /// Resume the vCPUs once loaded (else the VM stays paused).
    pub resume: bool,
    /// Host CPU quota of the restored VMM (jailed), thousandths of a CPU.
    pub cpu_millis: u64,
}

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// `PATCH /vm` to pause failed.
    #[error("pausing the VM for its snapshot failed: {0}")]
    Pause(#[source] ApiError),
    /// `PUT /snapshot/create` failed.
    #[error("Firecracker could not create the snapshot: {0}")]
    Create(#[source] ApiError),
    /// The files could not be moved to their destination.
    #[error("cannot move the snapshot file {from} to {to}: {source}")]
    Collect {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why a restore failed (the new VMM is gone again when this is returned).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The new Firecracker process did not come up.
    #[error("starting Firecracker for the restore failed: {0}")]
    Launch(#[from] LaunchError),
    /// `PUT /metrics` failed.
    #[error("configuring the restored VM's metrics failed: {0}")]
    Metrics(#[source] ApiError),
    /// `PUT /snapshot/load` failed.
    #[error("Firecracker could not load the snapshot {vmstate}: {source}")]
    Load {
        vmstate: PathBuf,
        #[source]
        source: ApiError,
    },
}

/// Moves a snapshot file out of the VM's root to `to`, root-owned and
/// read-only (restores of any uid read it; nobody changes it).
pub(crate) fn collect(from: &Path, to: &Path) -> Result<(), SnapshotError> {
    let err = |source| SnapshotError::Collect {
        from: from.to_owned(),
        to: to.to_owned(),
        source,
    };
    if let Err(e) = fs::rename(from, to) {
        if e.raw_os_error() != Some(libc::EXDEV) {
            return Err(err(e));
        }
        fs::copy(from, to).map_err(err)?;
        fs::remove_file(from).map_err(err)?;
    }
    std::os::unix::fs::chown(to, Some(0), Some(0)).map_err(err)?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o444)).map_err(err)
}

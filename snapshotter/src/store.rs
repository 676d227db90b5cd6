//! The snapshot store: one directory per published snapshot, described by a
//! manifest, never modified after publication, garbage-collected when no
//! template references it any more.
//!
//! Layout under the store root:
//!
//! ```text
//! snapshots/<id>/manifest.json   ids, sizes, SHA-256s, kernel/rootfs identity
//! snapshots/<id>/memory          guest memory (read-only)
//! snapshots/<id>/vmstate         VMM state (read-only)
//! snapshots/<id>/memory.ws       working set, written later by a recording restore
//! staging/                       publications in progress
//! trash/                         snapshots being deleted
//! ```
//!
//! Publication builds the whole directory in `staging/` (files fsynced,
//! manifest written last) and renames it into `snapshots/` in one step, so a
//! reader sees a complete snapshot or none. The memory and vmstate files are
//! made read-only. The working set is the one file that may appear after
//! publication: it is derived data, replaced atomically, and its header ties
//! it to the memory file's checksum, so it can never describe other bytes.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::memory::MemoryIdentity;
use crate::server::{ServeMode, SnapshotSource};

/// Version of the manifest format written by this crate.
pub const MANIFEST_FORMAT: u32 = 1;
const MANIFEST: &str = "manifest.json";
const MEMORY: &str = "memory";
const VMSTATE: &str = "vmstate";
const WORKING_SET: &str = "memory.ws";
/// Staging directories older than this are leftovers of a crashed publish.
const STALE_STAGING: Duration = Duration::from_secs(3600);

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A snapshot id contains characters other than `[A-Za-z0-9._-]`, or is empty or too long.
    #[error("invalid snapshot id {0:?}: use 1-128 characters from [A-Za-z0-9._-], not starting with '.'")]
    InvalidId(String),
    /// A snapshot with this id is already published (snapshots are immutable).
    #[error("snapshot {0} is already published; publish under a new id")]
    AlreadyPublished(SnapshotId),
    /// No snapshot with this id.
    #[error("snapshot {0} does not exist")]
    NotFound(SnapshotId),
    /// The manifest cannot be parsed or is of an unknown format.
    #[error("manifest {path} is invalid: {reason}")]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file's contents no longer match the manifest.
    #[error("{path} does not match its manifest checksum; the snapshot is corrupt")]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A snapshot's id: a safe directory name.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotId(String);

impl SnapshotId {
    /// Checks and wraps an id.
    pub fn new(id: impl Into<String>) -> Result<Self, StoreError> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= 128
            && !id.starts_with('.')
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(Self(id))
        } else {
            Err(StoreError::InvalidId(id))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SnapshotId {
    type Error = StoreError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<SnapshotId> for String {
    fn from(id: SnapshotId) -> Self {
        id.0
    }
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A file inside a snapshot directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileEntry {
    /// File name within the snapshot directory.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 of the contents.
    pub sha256: String,
}

/// The identity of an input the snapshot depends on (kernel, rootfs).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArtifactIdentity {
    /// A human name (usually the file name).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 of the contents.
    pub sha256: String,
}

impl ArtifactIdentity {
    /// Hashes a file to identify it.
    pub fn of_file(path: &Path) -> Result<Self, StoreError> {
        let (size, sha256) = hash_file(path, None)?;
        Ok(Self {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            size,
            sha256,
        })
    }
}

/// Everything known about a published snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`] at the time of writing.
    pub format: u32,
    /// The snapshot's id (its directory name).
    pub id: SnapshotId,
    /// The template it was taken from.
    pub template: String,
    /// Publication time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The guest memory file.
    pub memory: FileEntry,
    /// The VMM state file.
    pub vmstate: FileEntry,
    /// The guest kernel it was booted with.
    pub kernel: ArtifactIdentity,
    /// The root filesystem it was booted with.
    pub rootfs: ArtifactIdentity,
    /// File name of the working set (present once a recording restore ran).
    pub working_set: String,
    /// Everything else the snapshot was made from, by name (agent build,
    /// runtime table, VMM version, machine configuration, ...): a change
    /// in any of them makes another snapshot.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct SnapshotDraft<'a> {
    /// The id to publish under.
    pub id: SnapshotId,
    /// The template it belongs to.
    pub template: String,
    /// Guest memory file to copy in.
    pub memory: &'a Path,
    /// VMM state file to copy in.
    pub vmstate: &'a Path,
    /// Identity of the kernel.
    pub kernel: ArtifactIdentity,
    /// Identity of the rootfs.
    pub rootfs: ArtifactIdentity,
    /// Everything else it was made from (see [`Manifest::inputs`]).
    pub inputs: BTreeMap<String, String>,
}

/// A published snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    dir: PathBuf,
    manifest: Manifest,
}

impl Snapshot {
    /// Its manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the memory file.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.memory.file)
    }

    /// Path of the VMM state file.
    pub fn vmstate_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.vmstate.file)
    }

    /// Path of the working set (which may not exist yet).
    pub fn working_set_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.working_set)
    }

    /// The memory file's identity, from its manifest checksum.
    pub fn memory_identity(&self) -> MemoryIdentity {
        let mut digest = [0u8; 32];
        for (i, byte) in digest.iter_mut().enumerate() {
            *byte =
                u8::from_str_radix(&self.manifest.memory.sha256[2 * i..2 * i + 2], 16).unwrap_or(0);
        }
        MemoryIdentity {
            len: self.manifest.memory.size,
            digest,
        }
    }

    /// What a page server needs to serve this snapshot in `mode`.
    pub fn source(&self, mode: ServeMode) -> SnapshotSource {
        SnapshotSource {
            memory: self.memory_path(),
            identity: Some(self.memory_identity()),
            working_set: self.working_set_path(),
            mode,
        }
    }

    /// Re-reads the memory and vmstate files and checks them against the manifest.
    pub fn verify(&self) -> Result<(), StoreError> {
        for entry in [&self.manifest.memory, &self.manifest.vmstate] {
            let path = self.dir.join(&entry.file);
            let (size, sha) = hash_file(&path, None)?;
            if size != entry.size || sha != entry.sha256 {
                return Err(StoreError::ChecksumMismatch { path });
            }
        }
        Ok(())
    }
}

/// What a garbage collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Snapshots deleted.
    pub removed: Vec<SnapshotId>,
    /// Leftover staging directories deleted.
    pub stale_staging: usize,
}

/// A directory of immutable snapshots.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    root: PathBuf,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes `path`, copying it to `copy_to` on the way when given (one read
/// of the source for both). Returns `(size, hex sha256)`.
fn hash_file(path: &Path, copy_to: Option<&Path>) -> Result<(u64, String), StoreError> {
    let mut src = File::open(path).map_err(io_err("open", path))?;
    let mut dst = match copy_to {
        Some(p) => Some(File::create(p).map_err(io_err("create", p))?),
        None => None,
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        if let (Some(f), Some(p)) = (dst.as_mut(), copy_to) {
            f.write_all(&buf[..n]).map_err(io_err("write", p))?;
        }
    }
    if let (Some(f), Some(p)) = (dst, copy_to) {
        f.sync_all().map_err(io_err("fsync", p))?;
        fs::set_permissions(p, fs::Permissions::from_mode(0o444)).map_err(io_err("chmod", p))?;
    }
    Ok((size, hex(&hasher.finalize())))
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl SnapshotStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        for sub in ["snapshots", "staging", "trash"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        }
        Ok(Self { root })
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Copies the draft's files in, writes the manifest and publishes the
    /// snapshot atomically. Fails if the id is already published.
    pub fn publish(&self, draft: &SnapshotDraft<'_>) -> Result<Snapshot, StoreError> {
        let final_dir = self.snapshots_dir().join(draft.id.as_str());
        if final_dir.exists() {
            return Err(StoreError::AlreadyPublished(draft.id.clone()));
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let staging = self.root.join("staging").join(format!(
            "{}.{}.{}",
            draft.id,
            std::process::id(),
            nanos
        ));
        fs::create_dir(&staging).map_err(io_err("create", &staging))?;
        let result = self.publish_from(draft, &staging, &final_dir);
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    fn publish_from(
        &self,
        draft: &SnapshotDraft<'_>,
        staging: &Path,
        final_dir: &Path,
    ) -> Result<Snapshot, StoreError> {
        let (mem_size, mem_sha) = hash_file(draft.memory, Some(&staging.join(MEMORY)))?;
        let (vm_size, vm_sha) = hash_file(draft.vmstate, Some(&staging.join(VMSTATE)))?;
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            id: draft.id.clone(),
            template: draft.template.clone(),
            created_unix: now_unix(),
            memory: FileEntry {
                file: MEMORY.into(),
                size: mem_size,
                sha256: mem_sha,
            },
            vmstate: FileEntry {
                file: VMSTATE.into(),
                size: vm_size,
                sha256: vm_sha,
            },
            kernel: draft.kernel.clone(),
            rootfs: draft.rootfs.clone(),
            working_set: WORKING_SET.into(),
            inputs: draft.inputs.clone(),
        };
        let manifest_path = staging.join(MANIFEST);
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        let mut f = File::create(&manifest_path).map_err(io_err("create", &manifest_path))?;
        f.write_all(&json)
            .map_err(io_err("write", &manifest_path))?;
        f.sync_all().map_err(io_err("fsync", &manifest_path))?;
        fs::set_permissions(&manifest_path, fs::Permissions::from_mode(0o444))
            .map_err(io_err("chmod", &manifest_path))?;
        fsync_dir(staging)?;
        // rename(2) of a directory onto a non-empty one fails, and onto a
        // missing one is atomic: the first publisher of an id wins.
        match fs::rename(staging, final_dir) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
                return Err(StoreError::AlreadyPublished(draft.id.clone()))
            }
            Err(e) => return Err(io_err("rename", final_dir)(e)),
        }
        fsync_dir(&self.snapshots_dir())?;
        tracing::info!(id = %draft.id, memory_bytes = mem_size, "snapshot published");
        Ok(Snapshot {
            dir: final_dir.to_owned(),
            manifest,
        })
    }

    /// Reads a published snapshot.
    pub fn get(&self, id: &SnapshotId) -> Result<Snapshot, StoreError> {
        let dir = self.snapshots_dir().join(id.as_str());
        let path = dir.join(MANIFEST);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(id.clone()))
            }
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::BadManifest {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if manifest.format != MANIFEST_FORMAT
            || &manifest.id != id
            || manifest.memory.sha256.len() != 64
        {
            return Err(StoreError::BadManifest {
                path,
                reason: format!(
                    "format {} / id {} not understood for directory {id}",
                    manifest.format, manifest.id
                ),
            });
        }
        Ok(Snapshot { dir, manifest })
    }

    /// Every published snapshot, sorted by id (unreadable ones are skipped with a warning).
    pub fn list(&self) -> Result<Vec<Snapshot>, StoreError> {
        let dir = self.snapshots_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let Ok(id) = SnapshotId::new(entry.file_name().to_string_lossy().into_owned()) else {
                continue;
            };
            match self.get(&id) {
                Ok(s) => out.push(s),
                Err(e) => tracing::warn!(%id, error = %e, "skipping unreadable snapshot"),
            }
        }
        out.sort_by(|a, b| a.manifest.id.cmp(&b.manifest.id));
        Ok(out)
    }

    /// Deletes one snapshot: renamed into `trash/` first, so that it
    /// disappears atomically, then its files are removed. A VM restored
    /// from it keeps the files it has open.
    pub fn remove(&self, id: &SnapshotId) -> Result<(), StoreError> {
        let dir = self.snapshots_dir().join(id.as_str());
        if !dir.exists() {
            return Err(StoreError::NotFound(id.clone()));
        }
        let trash = self
            .root
            .join("trash")
            .join(format!("{id}.{}", std::process::id()));
        fs::rename(&dir, &trash).map_err(io_err("rename", &dir))?;
        fs::remove_dir_all(&trash).map_err(io_err("remove", &trash))?;
        tracing::info!(%id, "snapshot removed");
        Ok(())
    }

    /// Deletes every snapshot not in `keep`, and leftover staging directories
    /// older than an hour. Each snapshot is first renamed into `trash/`, so it
    /// disappears from `snapshots/` atomically before its files are removed.
    pub fn gc(&self, keep: &HashSet<SnapshotId>) -> Result<GcReport, StoreError> {
        let mut report = GcReport::default();
        let snapshots = self.snapshots_dir();
        for entry in fs::read_dir(&snapshots).map_err(io_err("list", &snapshots))? {
            let entry = entry.map_err(io_err("list", &snapshots))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(id) = SnapshotId::new(name.clone()) else {
                continue;
            };
            if keep.contains(&id) {
                continue;
            }
            let trash = self
                .root
                .join("trash")
                .join(format!("{name}.{}", std::process::id()));
            fs::rename(entry.path(), &trash).map_err(io_err("rename", &entry.path()))?;
            fs::remove_dir_all(&trash).map_err(io_err("remove", &trash))?;
            tracing::info!(%id, "snapshot garbage-collected");
            report.removed.push(id);
        }
        let staging = self.root.join("staging");
        for entry in fs::read_dir(&staging).map_err(io_err("list", &staging))? {
            let entry = entry.map_err(io_err("list", &staging))?;
            let age = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            if age > STALE_STAGING {
                fs::remove_dir_all(entry.path()).map_err(io_err("remove", &entry.path()))?;
                report.stale_staging += 1;
            }
        }
        report.removed.sort();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn setup(tag: &str) -> (Dir, SnapshotStore, PathBuf, PathBuf) {
        let root = std::env::temp_dir().join(format!("kiln-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let mem = root.join("mem.in");
        let vm = root.join("vm.in");
        fs::write(&mem, vec![7u8; 3 * 4096]).unwrap();
        fs::write(&vm, b"vmstate").unwrap();
        let store = SnapshotStore::open(root.join("store")).unwrap();
        (Dir(root), store, mem, vm)
    }

    fn draft<'a>(id: &str, mem: &'a Path, vm: &'a Path) -> SnapshotDraft<'a> {
        let ident = |name: &str| ArtifactIdentity {
            name: name.into(),
            size: 1,
            sha256: "00".repeat(32),
        };
        SnapshotDraft {
            id: SnapshotId::new(id).unwrap(),
            template: "python".into(),
            memory: mem,
            vmstate: vm,
            kernel: ident("vmlinux"),
            rootfs: ident("rootfs.ext4"),
            inputs: [("agent".to_string(), "0.1.0 abc".to_string())].into(),
        }
    }

    #[test]
    fn publishes_read_only_files_with_a_manifest_that_reads_back() {
        let (_dir, store, mem, vm) = setup("publish");
        let snap = store.publish(&draft("py-1", &mem, &vm)).unwrap();
        assert_eq!(store.get(&snap.manifest().id).unwrap(), snap);
        assert_eq!(snap.manifest().memory.size, 3 * 4096);
        assert_eq!(
            snap.manifest().memory.sha256,
            hex(&Sha256::digest(vec![7u8; 3 * 4096]))
        );
        assert_eq!(fs::read(snap.memory_path()).unwrap(), vec![7u8; 3 * 4096]);
        let mode = fs::metadata(snap.memory_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o222, 0, "published files are read-only");
        assert_eq!(
            snap.memory_identity().digest.to_vec(),
            Sha256::digest(vec![7u8; 3 * 4096]).to_vec()
        );
        snap.verify().unwrap();
        assert!(
            fs::read_dir(store.root.join("staging"))
                .unwrap()
                .next()
                .is_none(),
            "staging is empty"
        );
    }

    #[test]
    fn inputs_read_back_and_a_removed_snapshot_is_gone() {
        let (_dir, store, mem, vm) = setup("remove");
        let snap = store.publish(&draft("py-2", &mem, &vm)).unwrap();
        let id = snap.manifest().id.clone();
        assert_eq!(
            store.get(&id).unwrap().manifest().inputs["agent"],
            "0.1.0 abc"
        );
        store.remove(&id).unwrap();
        assert!(matches!(store.get(&id), Err(StoreError::NotFound(_))));
        assert!(matches!(store.remove(&id), Err(StoreError::NotFound(_))));
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn a_published_id_is_never_overwritten() {
        let (_dir, store, mem, vm) = setup("immutable");
        store.publish(&draft("py-1", &mem, &vm)).unwrap();
        fs::write(&mem, vec![9u8; 4096]).unwrap();
        assert!(matches!(
            store.publish(&draft("py-1", &mem, &vm)),
            Err(StoreError::AlreadyPublished(_))
        ));
        let snap = store.get(&SnapshotId::new("py-1").unwrap()).unwrap();
        assert_eq!(snap.manifest().memory.size, 3 * 4096);
        snap.verify().unwrap();
    }

    #[test]
    fn ids_that_could_escape_the_directory_are_refused() {
        for bad in ["", "..", "../x", "a/b", ".hidden", "sp ace"] {
            assert!(
                matches!(SnapshotId::new(bad), Err(StoreError::InvalidId(_))),
                "{bad:?}"
            );
        }
        assert!(serde_json::from_str::<SnapshotId>("\"../etc\"").is_err());
    }

    #[test]
    fn gc_removes_only_unreferenced_snapshots() {
        let (_dir, store, mem, vm) = setup("gc");
        for id in ["a", "b", "c"] {
            store.publish(&draft(id, &mem, &vm)).unwrap();
        }
        let keep: HashSet<_> = [SnapshotId::new("b").unwrap()].into();
        let report = store.gc(&keep).unwrap();
        assert_eq!(
            report.removed,
            vec![SnapshotId::new("a").unwrap(), SnapshotId::new("c").unwrap()]
        );
        let left: Vec<_> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|s| s.manifest().id.to_string())
            .collect();
        assert_eq!(left, vec!["b"]);
        assert!(fs::read_dir(store.root.join("trash"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn a_corrupted_memory_file_fails_verification() {
        let (_dir, store, mem, vm) = setup("verify");
        let snap = store.publish(&draft("v", &mem, &vm)).unwrap();
        fs::set_permissions(snap.memory_path(), fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(snap.memory_path(), vec![8u8; 3 * 4096]).unwrap();
        assert!(matches!(
            snap.verify(),
            Err(StoreError::ChecksumMismatch { .. })
        ));
    }
}

//! The image store: blobs kept once by digest, images by name, and the
//! roots unpacked from them.
//!
//! ```text
//! <dir>/blobs/sha256/<hex>   manifests, configs, layers; written to
//!                            blobs/tmp and renamed in only once their
//!                            sha256 matched the digest they were asked for
//! <dir>/images.json          name -> manifest digest, config, layers
//! <dir>/roots/<hex>          the image with that manifest digest, unpacked
//!                            (made in roots/tmp, renamed in when whole)
//! <dir>/disks/<hex>-<agent>.ext4
//!                            the image as a microVM's root disk (`disk`)
//! <dir>/lock                 flock'ed by every change (the daemon and the
//!                            CLI share a store)
//! ```
//!
//! A layer two images share is stored and hashed once. `rm` forgets a
//! name; [`ImageStore::gc`] removes every blob, root and disk no image
//! refers to.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use oci_spec::image::{ImageConfiguration, ImageManifest};
use serde::{Deserialize, Serialize};

use crate::digest::{Digest, Hasher};
use crate::unpack::{self, Limits, UnpackError};

/// An image the store holds: a name and what it is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// What it was imported or pulled as (`registry/repo:tag`, or a name
    /// given at import).
    pub name: String,
    /// Digest of its manifest: what identifies the image.
    pub digest: Digest,
    pub config: Digest,
    /// Layers, bottom first.
    pub layers: Vec<Digest>,
    /// Bytes of its blobs as stored (compressed layers).
    pub size_bytes: u64,
}

/// What a garbage collection removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub blobs_removed: u64,
    pub bytes_freed: u64,
    pub roots_removed: u64,
    /// Unreferenced roots kept because a sandbox still uses them (it holds
    /// a shared `flock` on the root); a later `gc` removes them.
    pub roots_in_use: u64,
    /// microVM root disks of images no longer stored (`disk`). A guest
    /// still running on one keeps its open file; the name goes at once.
    pub disks_removed: u64,
}

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No image by that name or digest.
    #[error("no image {0:?} in the store (see `kiln image ls`; `kiln image pull` or `kiln image import` it first)")]
    Unknown(String),
    /// A blob's bytes do not hash to the digest it was fetched as.
    #[error("blob {expected} is corrupt: its bytes hash to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    /// A manifest names a blob the store does not have.
    #[error("image {image}: blob {blob} is missing")]
    MissingBlob { image: String, blob: Digest },
    /// A manifest or config could not be parsed.
    #[error("{what} is not a valid OCI document: {source}")]
    Document {
        what: String,
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// A layer could not be unpacked.
    #[error("unpacking image {image}: {source}")]
    Unpack {
        image: String,
        #[source]
        source: UnpackError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

/// The directories every sandbox mounts something on; an image root gets
/// them (empty) if its layers did not make them.
pub const MOUNT_POINTS: [&str; 4] = ["proc", "dev", "tmp", "work"];

/// A store of images in one directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    limits: Limits,
    id_base: Option<u32>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    images: Vec<Image>,
}

/// The store's lock, held while it lives.
pub(crate) struct Locked(fs::File);

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// An exclusive `flock` on the file at `path` (made if missing), held
/// until the value is dropped.
/// The sha256 digest `d` names; `what` says whose descriptor it is in the
/// error.
pub(crate) fn descriptor_digest(
    d: &oci_spec::image::Descriptor,
    what: impl Into<String>,
) -> Result<Digest, StoreError> {
    Digest::from_hex(d.as_digest_sha256().unwrap_or_default())
        .map_err(|e| io_err(what)(io::Error::other(e)))
}

pub(crate) fn lock_file(path: &Path) -> Result<Locked, StoreError> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io_err("locking the image store")(io::Error::last_os_error()));
    }
    Ok(Locked(f))
}

/// A name for a temporary file or directory, unique in this host.
pub(crate) fn tmp_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl ImageStore {
    /// The store in `dir` (made if missing), unpacking with default limits
    /// and without shifting ownership.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        for sub in ["blobs/sha256", "blobs/tmp", "roots/tmp"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        Ok(Self {
            dir,
            limits: Limits::default(),
            id_base: None,
        })
    }

    /// Unpacked files owned by the sandbox id range from `id_base` (the
    /// jail's root is host uid `id_base`).
    pub fn with_id_base(mut self, id_base: u32) -> Self {
        self.id_base = Some(id_base);
        self
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> Result<Locked, StoreError> {
        lock_file(&self.dir.join("lock"))
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Where the blob with `digest` is (whether or not it is there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Stores the bytes of `reader` as the blob `expected`, if they hash to
    /// it; a blob already there is not written again. Returns its size.
    pub fn put_blob(&self, expected: &Digest, reader: impl Read) -> Result<u64, StoreError> {
        let (digest, size) = self.write_blob(Some(expected), reader)?;
        debug_assert_eq!(&digest, expected);
        Ok(size)
    }

    /// Stores the bytes of `reader` under whatever digest they have.
    pub fn put_blob_any(&self, reader: impl Read) -> Result<(Digest, u64), StoreError> {
        self.write_blob(None, reader)
    }

    fn write_blob(
        &self,
        expected: Option<&Digest>,
        mut reader: impl Read,
    ) -> Result<(Digest, u64), StoreError> {
        if let Some(d) = expected {
            if let Ok(m) = fs::metadata(self.blob_path(d)) {
                return Ok((d.clone(), m.len()));
            }
        }
        let tmp = self.dir.join("blobs/tmp").join(tmp_name());
        let result = (|| {
            let mut file =
                fs::File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
            let mut hasher = Hasher::default();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = reader.read(&mut buf).map_err(io_err("reading a blob"))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n])
                    .map_err(io_err(format!("writing {}", tmp.display())))?;
            }
            let size = hasher.len();
            let actual = hasher.finish();
            if let Some(expected) = expected {
                if *expected != actual {
                    return Err(StoreError::DigestMismatch {
                        expected: expected.clone(),
                        actual,
                    });
                }
            }
            let to = self.blob_path(&actual);
            fs::rename(&tmp, &to)
                .map_err(io_err(format!("renaming a blob to {}", to.display())))?;
            Ok((actual, size))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// A fresh path in the store's scratch space for a blob being fetched
    /// (then [`Self::adopt_blob`]); `gc` removes what is left there.
    pub fn scratch_blob_path(&self) -> PathBuf {
        self.dir.join("blobs/tmp").join(tmp_name())
    }

    /// Moves the file at `path` (in the store's scratch space) into the
    /// store as the blob `expected`, if its bytes hash to it; removes it
    /// either way. Returns its size.
    pub fn adopt_blob(&self, expected: &Digest, path: &Path) -> Result<u64, StoreError> {
        let result = (|| {
            let mut f =
                fs::File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
            let mut hasher = Hasher::default();
            io::copy(&mut f, &mut hasher).map_err(io_err(format!("reading {}", path.display())))?;
            let size = hasher.len();
            let actual = hasher.finish();
            if actual != *expected {
                return Err(StoreError::DigestMismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
            let to = self.blob_path(expected);
            fs::rename(path, &to)
                .map_err(io_err(format!("renaming a blob to {}", to.display())))?;
            Ok(size)
        })();
        if result.is_err() {
            let _ = fs::remove_file(path);
        }
        result
    }

    /// The bytes of a stored blob.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let p = self.blob_path(digest);
        fs::read(&p).map_err(io_err(format!("reading {}", p.display())))
    }

    fn read_index(&self) -> Result<Index, StoreError> {
        let p = self.dir.join("images.json");
        match fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io_err(format!("parsing {}", p.display()))(io::Error::other(e))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(io_err(format!("reading {}", p.display()))(e)),
        }
    }

    fn write_index(&self, index: &Index) -> Result<(), StoreError> {
        let p = self.dir.join("images.json");
        let tmp = self.dir.join(format!("images.json.{}", tmp_name()));
        let bytes = serde_json::to_vec_pretty(index).expect("the index serialises");
        fs::write(&tmp, bytes).map_err(io_err(format!("writing {}", tmp.display())))?;
        fs::rename(&tmp, &p).map_err(io_err(format!("renaming to {}", p.display())))
    }

    /// Records the image whose manifest is `manifest` (its bytes, stored as
    /// a blob too) under `name`, replacing what had that name. Its config
    /// and layers must already be stored.
    pub fn add(&self, name: &str, manifest: &[u8]) -> Result<Image, StoreError> {
        let parsed =
            ImageManifest::from_reader(manifest).map_err(|source| StoreError::Document {
                what: format!("the manifest of {name}"),
                source,
            })?;
        let digest_of =
            |d: &oci_spec::image::Descriptor| descriptor_digest(d, format!("image {name}"));
        let config = digest_of(parsed.config())?;
        let layers = parsed
            .layers()
            .iter()
            .map(digest_of)
            .collect::<Result<Vec<_>, _>>()?;
        let mut size_bytes = 0;
        for blob in std::iter::once(&config).chain(&layers) {
            match fs::metadata(self.blob_path(blob)) {
                Ok(m) => size_bytes += m.len(),
                Err(_) => {
                    return Err(StoreError::MissingBlob {
                        image: name.to_owned(),
                        blob: blob.clone(),
                    })
                }
            }
        }
        ImageConfiguration::from_reader(&self.read_blob(&config)?[..]).map_err(|source| {
            StoreError::Document {
                what: format!("the config of {name}"),
                source,
            }
        })?;
        let (digest, _) = self.put_blob_any(manifest)?;
        let image = Image {
            name: name.to_owned(),
            digest,
            config,
            layers,
            size_bytes,
        };
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        index.images.retain(|i| i.name != name);
        index.images.push(image.clone());
        index.images.sort_by(|a, b| a.name.cmp(&b.name));
        self.write_index(&index)?;
        Ok(image)
    }

    /// Every image, by name.
    pub fn list(&self) -> Result<Vec<Image>, StoreError> {
        Ok(self.read_index()?.images)
    }

    /// The image `reference` names: a stored name (`:latest` assumed when
    /// it has no tag), a manifest digest (`sha256:...`, or `name@sha256:...`).
    pub fn resolve(&self, reference: &str) -> Result<Image, StoreError> {
        let images = self.list()?;
        let by_digest = |d: &str| images.iter().find(|i| i.digest.as_str() == d).cloned();
        let found = if let Some((_, d)) = reference.split_once('@') {
            by_digest(d)
        } else if reference.starts_with("sha256:") {
            by_digest(reference)
        } else {
            let tagged = has_tag(reference).then(|| reference.to_owned());
            let with_latest = tagged.unwrap_or_else(|| format!("{reference}:latest"));
            images
                .iter()
                .find(|i| i.name == reference || i.name == with_latest)
                .cloned()
        };
        found.ok_or_else(|| StoreError::Unknown(reference.to_owned()))
    }

    /// Forgets the images `reference` names (a name: that name; a digest:
    /// every name of it). Their blobs stay until [`Self::gc`].
    pub fn remove(&self, reference: &str) -> Result<Vec<Image>, StoreError> {
        let target = self.resolve(reference)?;
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let by_digest = reference.contains("sha256:");
        let (gone, kept): (Vec<Image>, Vec<Image>) = index.images.into_iter().partition(|i| {
            if by_digest {
                i.digest == target.digest
            } else {
                i.name == target.name
            }
        });
        index.images = kept;
        self.write_index(&index)?;
        Ok(gone)
    }

    /// Removes every blob and unpacked root that no image refers to.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let _lock = self.lock()?;
        let index = self.read_index()?;
        let mut keep: HashSet<String> = HashSet::new();
        for i in &index.images {
            keep.insert(i.digest.hex().to_owned());
            keep.insert(i.config.hex().to_owned());
            keep.extend(i.layers.iter().map(|l| l.hex().to_owned()));
        }
        let mut report = GcReport::default();
        let blobs = self.dir.join("blobs/sha256");
        for e in fs::read_dir(&blobs).map_err(io_err(format!("listing {}", blobs.display())))? {
            let e = e.map_err(io_err("listing blobs"))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(e.path()).map_err(io_err(format!("removing blob {name}")))?;
                report.blobs_removed += 1;
                report.bytes_freed += len;
            }
        }
        let manifests: HashSet<&str> = index.images.iter().map(|i| i.digest.hex()).collect();
        let roots = self.dir.join("roots");
        for e in fs::read_dir(&roots).map_err(io_err(format!("listing {}", roots.display())))? {
            let e = e.map_err(io_err("listing roots"))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name != "tmp" && !manifests.contains(name.as_str()) {
                let Some(_held) = lock_unused(&e.path()) else {
                    report.roots_in_use += 1;
                    continue;
                };
                fs::remove_dir_all(e.path()).map_err(io_err(format!("removing root {name}")))?;
                report.roots_removed += 1;
            }
        }
        let disks = self.dir.join("disks");
        if let Ok(rd) = fs::read_dir(&disks) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some((hex, _)) = name.strip_suffix(".ext4").and_then(|n| n.split_once('-'))
                else {
                    continue;
                };
                if !manifests.contains(hex) {
                    fs::remove_file(e.path()).map_err(io_err(format!("removing disk {name}")))?;
                    report.disks_removed += 1;
                }
            }
        }
        // Leftovers of interrupted writes; those of disk builds only while
        // no build holds the disks' lock.
        let mut scratch = vec!["blobs/tmp", "roots/tmp"];
        let _no_disk_build = lock_unused(&disks.join("lock"));
        if _no_disk_build.is_some() {
            scratch.push("disks/tmp");
        }
        for sub in scratch {
            let d = self.dir.join(sub);
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    let _ = if e.path().is_dir() {
                        fs::remove_dir_all(e.path())
                    } else {
                        fs::remove_file(e.path())
                    };
                }
            }
        }
        Ok(report)
    }

    /// The image's config.
    pub fn config(&self, image: &Image) -> Result<ImageConfiguration, StoreError> {
        ImageConfiguration::from_reader(&self.read_blob(&image.config)?[..]).map_err(|source| {
            StoreError::Document {
                what: format!("the config of {}", image.name),
                source,
            }
        })
    }

    /// The image unpacked, made on first use: a directory to use read-only
    /// (every sandbox of the image shares it).
    pub fn root(&self, image: &Image) -> Result<PathBuf, StoreError> {
        let root = self.dir.join("roots").join(image.digest.hex());
        if root.is_dir() {
            return Ok(root);
        }
        let _lock = self.lock()?;
        if root.is_dir() {
            return Ok(root);
        }
        let tmp = self.dir.join("roots/tmp").join(tmp_name());
        let result = self.unpack_into(image, &tmp).and_then(|()| {
            fs::rename(&tmp, &root).map_err(io_err(format!("renaming to {}", root.display())))
        });
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result.map(|()| root)
    }

    fn unpack_into(&self, image: &Image, dir: &Path) -> Result<(), StoreError> {
        fs::create_dir(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        if let Some(base) = self.id_base {
            std::os::unix::fs::lchown(dir, Some(base), Some(base))
                .map_err(io_err(format!("chown {}", dir.display())))?;
        }
        for layer in &image.layers {
            let p = self.blob_path(layer);
            let f = fs::File::open(&p).map_err(io_err(format!("opening layer {}", p.display())))?;
            unpack::apply_layer(
                dir,
                layer.as_str(),
                io::BufReader::new(f),
                &self.limits,
                self.id_base,
            )
            .map_err(|source| StoreError::Unpack {
                image: image.name.clone(),
                source,
            })?;
        }
        for m in MOUNT_POINTS {
            let p = dir.join(m);
            match fs::symlink_metadata(&p) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(io_err(format!("image {}", image.name))(io::Error::other(
                        format!("/{m} is not a directory, and sandboxes mount on it"),
                    )))
                }
                Err(_) => {
                    fs::create_dir(&p).map_err(io_err(format!("creating {}", p.display())))?;
                    if let Some(base) = self.id_base {
                        std::os::unix::fs::lchown(&p, Some(base), Some(base))
                            .map_err(io_err(format!("chown {}", p.display())))?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// An exclusive `flock` on the root `dir`, if no sandbox holds a shared
/// one (a jail rooted in it does, for its life).
fn lock_unused(dir: &Path) -> Option<fs::File> {
    let f = fs::File::open(dir).ok()?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (r == 0).then_some(f)
}

/// Whether a reference without a digest names a tag: a `:` after the
/// last `/` (a registry's port comes before it).
fn has_tag(reference: &str) -> bool {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    last.contains(':')
}

/// Follows `path` inside `root` as the kernel would with `root` as `/`:
/// symlinks (absolute ones from `root`) are followed, `..` stops at
/// `root`. The host path of what it names, if that exists.
pub fn lookup(root: &Path, path: &str) -> Option<PathBuf> {
    let mut todo: Vec<std::ffi::OsString> = path
        .split('/')
        .rev()
        .filter(|c| !c.is_empty())
        .map(Into::into)
        .collect();
    let mut at: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        if c == "." {
            continue;
        }
        if c == ".." {
            at.pop();
            continue;
        }
        let here: PathBuf = root.join(at.iter().collect::<PathBuf>()).join(&c);
        let meta = fs::symlink_metadata(&here).ok()?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = fs::read_link(&here).ok()?;
            let t = target.to_string_lossy().into_owned();
            if t.starts_with('/') {
                at.clear();
            }
            todo.extend(t.split('/').rev().filter(|c| !c.is_empty()).map(Into::into));
        } else {
            at.push(c);
        }
    }
    Some(root.join(at.iter().collect::<PathBuf>()))
}

#[cfg(test)]
mod tests;

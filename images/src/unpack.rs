//! Applying an image's layers to a directory, refusing anything that
//! would write outside it.
//!
//! A layer is a tar archive, plain or compressed with gzip or zstd, whose
//! entries change the tree below it (OCI image spec, "Image Layer
//! Filesystem Changeset"):
//! files, directories, links, and whiteouts (`.wh.NAME` removes `NAME`,
//! `.wh..wh..opq` empties the directory of what lower layers put there).
//! Layers come from registries and tarballs nobody here vouches for, so
//! every entry is checked before it touches the disk:
//!
//! - its path must be relative and free of `..` (no `/etc/passwd`, no
//!   `../../x`);
//! - no directory on its way may be a symlink: a layer that plants
//!   `lib -> /` and then writes `lib/x` would otherwise write to the host;
//! - a relative symlink target may not climb above the root; an absolute
//!   one is kept, because inside the sandbox `/` *is* the image's root and
//!   the unpacker never follows links (every parent is `lstat`ed, files
//!   are created with `O_EXCL | O_NOFOLLOW`);
//! - a hard link must name a file already in the root, reached without
//!   links;
//! - sizes are bounded ([`Limits`]): one entry, the whole unpacked layer
//!   (which also bounds what the decompressor may produce, so a gzip bomb
//!   stops at the limit), and the number of entries. Sparse entries are
//!   refused outright.
//!
//! Device nodes and FIFOs are skipped: a sandbox gets its `/dev` from the
//! backend. Ownership is shifted into the sandbox's id range when the
//! caller gives one (the jail's root is host uid `id_base`), modes and
//! modification times are kept (Python checks `.pyc` files against their
//! source's mtime), extended attributes are not.
//!
//! The unpacker is the only writer of its directory while it runs (the
//! store unpacks into a private temporary directory and renames it into
//! place when every layer is in), so checking a path and then using it is
//! not a race.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Bounds on what one layer may unpack to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Entries (files, directories, links, whiteouts) in one layer.
    pub max_entries: u64,
    /// Bytes of one file.
    pub max_entry_bytes: u64,
    /// Bytes of the uncompressed layer (the tar stream itself).
    pub max_layer_bytes: u64,
}

impl Default for Limits {
    /// Generous for real images (the largest common base images are a few
    /// GiB unpacked), small enough that a bomb cannot fill a host disk.
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
            max_entry_bytes: 8 << 30,
            max_layer_bytes: 32 << 30,
        }
    }
}

/// Why a layer could not be applied. Each names the layer and, where there
/// is one, the entry.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry was refused: it would leave the root or break a limit.
    #[error("layer {layer}: entry {entry:?} refused: {reason}")]
    Refused {
        layer: String,
        entry: String,
        reason: Refusal,
    },
    /// Writing an entry failed.
    #[error("layer {layer}: entry {entry:?}: {source}")]
    Write {
        layer: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// The layer itself could not be read (corrupt gzip or tar, or the
    /// uncompressed size limit).
    #[error("layer {layer}: {reason}")]
    Archive { layer: String, reason: Refusal },
}

/// What was wrong with an entry or a layer.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("its path has a `..` component")]
    DotDot,
    #[error("its path is absolute")]
    Absolute,
    #[error("{0:?} on its way is a symlink, and files are never written through links")]
    BeneathSymlink(String),
    #[error("{0:?} on its way is not a directory")]
    ParentNotDirectory(String),
    #[error("its link target {0:?} points outside the root")]
    LinkOutside(String),
    #[error("its hard link target {0:?} is not a file in the root")]
    HardLinkTarget(String),
    #[error("it is {size} bytes, above the limit of {limit} bytes per file")]
    EntryTooLarge { size: u64, limit: u64 },
    #[error("the layer unpacks to more than {0} bytes (a decompression bomb?)")]
    LayerTooLarge(u64),
    #[error("the layer has more than {0} entries")]
    TooManyEntries(u64),
    #[error("sparse files are not supported")]
    Sparse,
    #[error("tar entry type {0:?} is not supported")]
    UnsupportedType(char),
    #[error("a whiteout must name a file")]
    BadWhiteout,
    #[error("reading the archive: {0}")]
    Read(#[source] io::Error),
}

/// What applying a layer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
    /// Device nodes and FIFOs left out.
    pub skipped: u64,
    /// Extended attributes set (see [`xattr_kept`]).
    pub xattrs: u64,
    /// Extended attributes left out: names outside what is kept, on
    /// symlinks, or refused by the filesystem.
    pub xattrs_skipped: u64,
}

/// Whether an extended attribute of a layer is applied: `user.*` (the
/// image's own data) and `security.capability` (file capabilities, as a
/// container runtime keeps them; a jail's image root is mounted `nosuid`,
/// which ignores them, while a microVM's guest honours them inside its
/// own kernel). Never `trusted.*`: the unpacked root is an overlay lower,
/// and `trusted.overlay.*` would steer overlayfs (opaque directories,
/// redirects) from inside an image; nor other `security.*` labels, which
/// belong to the host's policy.
pub fn xattr_kept(name: &[u8]) -> bool {
    name.starts_with(b"user.") && name.len() > 5 || name == b"security.capability"
}

/// A failure inside one entry, before it is given the layer's and
/// entry's names.
enum Fail {
    Refused(Refusal),
    Io(io::Error),
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Self {
        Fail::Io(e)
    }
}

impl From<Refusal> for Fail {
    fn from(r: Refusal) -> Self {
        Fail::Refused(r)
    }
}

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
/// The ids a sandbox maps (its user namespace maps 65536 from `id_base`).
const MAPPED_IDS: u64 = 65536;
/// Where ids outside the mapped range end up: the sandbox's `nobody`.
const NOBODY: u64 = 65534;

/// Applies one layer (`blob`: tar, gzip or plain) on top of `root`.
/// `layer` names it in errors (its digest). `id_base`: shift ownership
/// into a sandbox's id range starting there; `None` leaves files owned by
/// whoever unpacks.
pub fn apply_layer(
    root: &Path,
    layer: &str,
    blob: impl Read,
    limits: &Limits,
    id_base: Option<u32>,
) -> Result<LayerStats, UnpackError> {
    let archive_err = |reason| UnpackError::Archive {
        layer: layer.to_owned(),
        reason,
    };
    let mut buffered = BufReader::with_capacity(1 << 16, blob);
    let magic = buffered
        .fill_buf()
        .map_err(|e| archive_err(Refusal::Read(e)))?;
    let exceeded = std::cell::Cell::new(false);
    let stream: Box<dyn Read + '_> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(
            ruzstd::decoding::StreamingDecoder::new(buffered)
                .map_err(|e| archive_err(Refusal::Read(io::Error::other(e))))?,
        )
    } else {
        Box::new(buffered)
    };
    let bounded = Bounded {
        inner: stream,
        left: limits.max_layer_bytes,
        exceeded: &exceeded,
    };
    let mut archive = tar::Archive::new(bounded);
    let mut applier = Applier {
        root,
        id_base,
        limits,
        stats: LayerStats::default(),
        written: HashSet::new(),
        dirs: Vec::new(),
    };
    let read_err = |e: io::Error| {
        if exceeded.get() {
            archive_err(Refusal::LayerTooLarge(limits.max_layer_bytes))
        } else {
            archive_err(Refusal::Read(e))
        }
    };
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        applier.stats.entries += 1;
        if applier.stats.entries > limits.max_entries {
            return Err(archive_err(Refusal::TooManyEntries(limits.max_entries)));
        }
        match applier.entry(&raw, &mut entry) {
            Ok(()) => {}
            Err(Fail::Refused(reason)) => {
                return Err(UnpackError::Refused {
                    layer: layer.to_owned(),
                    entry: name,
                    reason,
                })
            }
            Err(Fail::Io(_)) if exceeded.get() => {
                return Err(archive_err(Refusal::LayerTooLarge(limits.max_layer_bytes)))
            }
            Err(Fail::Io(source)) => {
                return Err(UnpackError::Write {
                    layer: layer.to_owned(),
                    entry: name,
                    source,
                })
            }
        }
    }
    // Directory modes and times last: writing their children changed the
    // times, and a read-only mode would have stopped an unprivileged
    // unpacker.
    for (path, mode, mtime) in applier.dirs.iter().rev() {
        let done = fs::set_permissions(path, fs::Permissions::from_mode(*mode))
            .and_then(|()| set_mtime(path, *mtime));
        if let Err(source) = done {
            return Err(UnpackError::Write {
                layer: layer.to_owned(),
                entry: path
                    .strip_prefix(root)
                    .unwrap_or(path)
                    .display()
                    .to_string(),
                source,
            });
        }
    }
    Ok(applier.stats)
}

/// A reader that fails once more than `left` bytes have come through.
struct Bounded<'a, R> {
    inner: R,
    left: u64,
    exceeded: &'a std::cell::Cell<bool>,
}

impl<R: Read> Read for Bounded<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.exceeded.set(true);
            return Err(io::Error::other("uncompressed size limit reached"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

struct Applier<'a> {
    root: &'a Path,
    id_base: Option<u32>,
    limits: &'a Limits,
    stats: LayerStats,
    /// Paths (relative) this layer wrote: an opaque whiteout hides only
    /// what lower layers put in its directory.
    written: HashSet<PathBuf>,
    /// Directories this layer made or changed: path, mode, mtime.
    dirs: Vec<(PathBuf, u32, i64)>,
}

/// The components of an archive path: relative, no `..`; `.` and empty
/// components dropped.
fn components(raw: &[u8]) -> Result<Vec<&OsStr>, Refusal> {
    if raw.starts_with(b"/") {
        return Err(Refusal::Absolute);
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(Refusal::DotDot),
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    Ok(out)
}

fn rel_path(comps: &[&OsStr]) -> PathBuf {
    comps.iter().collect()
}

impl Applier<'_> {
    fn entry<R: Read>(&mut self, raw: &[u8], entry: &mut tar::Entry<'_, R>) -> Result<(), Fail> {
        let kind = entry.header().entry_type();
        if kind.is_gnu_sparse() {
            return Err(Refusal::Sparse.into());
        }
        // Extended attributes travel as PAX records `SCHILY.xattr.NAME`.
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions()? {
            for ext in pax {
                let ext = ext?;
                let key = ext.key_bytes();
                if key.starts_with(b"GNU.sparse.") {
                    return Err(Refusal::Sparse.into());
                }
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    match CString::new(name) {
                        Ok(n) if xattr_kept(name) => xattrs.push((n, ext.value_bytes().to_vec())),
                        _ => self.stats.xattrs_skipped += 1,
                    }
                }
            }
        }
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let comps = components(raw)?;
        let Some((last, parents)) = comps.split_last() else {
            // The root itself ("./"): it stays as the store made it.
            return Ok(());
        };
        let dir = self.parents(parents)?;
        let name = last.as_bytes();
        if name == OPAQUE {
            return self.opaque(&dir, parents);
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden == b"/" {
                return Err(Refusal::BadWhiteout.into());
            }
            let rel = rel_path(parents).join(OsStr::from_bytes(hidden));
            if !self.written.contains(&rel) {
                remove_any(&self.root.join(&rel))?;
            }
            return Ok(());
        }
        let rel = rel_path(&comps);
        let path = self.root.join(&rel);
        let header = entry.header();
        let mode = header.mode()? & 0o7777;
        let mtime = header.mtime().unwrap_or(0) as i64;
        // Archivers leave ids empty now and then; that is root's.
        let (uid, gid) = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));
        if kind.is_dir() {
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    remove_any(&path)?;
                    fs::create_dir(&path)?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&path)?,
                Err(e) => return Err(e.into()),
            }
            self.chown(&path, uid, gid)?;
            self.set_xattrs(&path, &xattrs)?;
            self.dirs.push((path, mode, mtime));
            self.written.insert(rel);
            return Ok(());
        }
        if kind.is_block_special() || kind.is_character_special() || kind.is_fifo() {
            self.stats.skipped += 1;
            return Ok(());
        }
        if kind.is_hard_link() {
            let target_raw = entry.link_name_bytes().unwrap_or_default().into_owned();
            let target = self.hard_link_target(&target_raw)?;
            remove_any(&path)?;
            fs::hard_link(&target, &path)?;
            self.written.insert(rel);
            return Ok(());
        }
        if kind.is_symlink() {
            let target = entry.link_name_bytes().unwrap_or_default().into_owned();
            check_symlink(parents.len(), &target)?;
            remove_any(&path)?;
            std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)?;
            self.chown(&path, uid, gid)?;
            // Linux keeps no user attributes on symlinks.
            self.stats.xattrs_skipped += xattrs.len() as u64;
            set_mtime(&path, mtime)?;
            self.written.insert(rel);
            return Ok(());
        }
        if !(kind.is_file() || kind.is_contiguous()) {
            return Err(Refusal::UnsupportedType(kind.as_byte() as char).into());
        }
        let size = entry.size();
        if size > self.limits.max_entry_bytes {
            return Err(Refusal::EntryTooLarge {
                size,
                limit: self.limits.max_entry_bytes,
            }
            .into());
        }
        let mut file = replace_with_file(&path, 0o600)?;
        self.stats.bytes += io::copy(entry, &mut file)?;
        drop(file);
        self.chown(&path, uid, gid)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        // After the chown, which clears file capabilities.
        self.set_xattrs(&path, &xattrs)?;
        set_mtime(&path, mtime)?;
        self.written.insert(rel);
        Ok(())
    }

    /// Sets the kept extended attributes on `path` (never following a
    /// link); those the filesystem does not take are counted as skipped.
    fn set_xattrs(&mut self, path: &Path, xattrs: &[(CString, Vec<u8>)]) -> io::Result<()> {
        if xattrs.is_empty() {
            return Ok(());
        }
        let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
        for (name, value) in xattrs {
            // SAFETY: `c` and `name` are NUL-terminated strings and
            // `value` a buffer of `value.len()` bytes, all outliving the
            // call, as lsetxattr(2) requires.
            let r = unsafe {
                libc::lsetxattr(
                    c.as_ptr(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            if r == 0 {
                self.stats.xattrs += 1;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // Not supported here, not permitted, or too large for the
                // filesystem: "where the filesystem allows".
                Some(libc::EOPNOTSUPP | libc::EPERM | libc::E2BIG | libc::EINVAL) => {
                    self.stats.xattrs_skipped += 1
                }
                _ => return Err(e),
            }
        }
        Ok(())
    }

    /// Makes sure every parent of an entry is a real directory (made if
    /// missing), never a link; returns the innermost.
    fn parents(&mut self, parents: &[&OsStr]) -> Result<PathBuf, Fail> {
        let mut path = self.root.to_path_buf();
        for (i, c) in parents.iter().enumerate() {
            path.push(c);
            let shown = || rel_path(&parents[..=i]).display().to_string();
            match fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(Refusal::BeneathSymlink(shown()).into())
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(Refusal::ParentNotDirectory(shown()).into()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&path)?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
                    self.chown(&path, 0, 0)?;
                    self.written.insert(rel_path(&parents[..=i]));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(path)
    }

    /// `.wh..wh..opq` in `dir`: removes what lower layers put there.
    fn opaque(&mut self, dir: &Path, parents: &[&OsStr]) -> Result<(), Fail> {
        let base = rel_path(parents);
        for child in fs::read_dir(dir)? {
            let child = child?;
            if !self.written.contains(&base.join(child.file_name())) {
                remove_any(&child.path())?;
            }
        }
        Ok(())
    }

    /// The path of a hard link's target: inside the root, reached without
    /// links, an existing non-directory.
    fn hard_link_target(&mut self, raw: &[u8]) -> Result<PathBuf, Fail> {
        let shown = || String::from_utf8_lossy(raw).into_owned();
        let comps = components(raw).map_err(|_| Refusal::LinkOutside(shown()))?;
        let Some((_, parents)) = comps.split_last() else {
            return Err(Refusal::HardLinkTarget(shown()).into());
        };
        let mut path = self.root.to_path_buf();
        for c in parents {
            path.push(c);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                _ => return Err(Refusal::HardLinkTarget(shown()).into()),
            }
        }
        let path = self.root.join(rel_path(&comps));
        match fs::symlink_metadata(&path) {
            Ok(m) if !m.is_dir() => Ok(path),
            _ => Err(Refusal::HardLinkTarget(shown()).into()),
        }
    }

    fn chown(&self, path: &Path, uid: u64, gid: u64) -> io::Result<()> {
        let Some(base) = self.id_base else {
            return Ok(());
        };
        let shift = |id: u64| base + if id < MAPPED_IDS { id } else { NOBODY } as u32;
        std::os::unix::fs::lchown(path, Some(shift(uid)), Some(shift(gid)))
    }
}

/// A symlink at depth `depth` (its directory's components) may point
/// anywhere absolute (that is the image's root, in the sandbox), or
/// relatively anywhere that stays below the root.
fn check_symlink(depth: usize, target: &[u8]) -> Result<(), Refusal> {
    let shown = || String::from_utf8_lossy(target).into_owned();
    if target.is_empty() {
        return Err(Refusal::LinkOutside(shown()));
    }
    if target.starts_with(b"/") {
        return Ok(());
    }
    let mut depth = depth as i64;
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(Refusal::LinkOutside(shown()));
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

/// A new file at `path` with `mode`, open for writing, whatever was there
/// removed first; never through a link (`O_NOFOLLOW` on a name just
/// made free, `create_new`).
pub(crate) fn replace_with_file(path: &Path, mode: u32) -> io::Result<fs::File> {
    remove_any(path)?;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Removes whatever is at `path` (a directory with its contents), never
/// following a link; nothing there is fine.
pub(crate) fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sets the modification (and access) time of `path`, not following a
/// link.
fn set_mtime(path: &Path, secs: i64) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let t = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: `c` is a NUL-terminated path that outlives the call and
    // `times` is an array of two timespecs, as utimensat(2) requires.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests;

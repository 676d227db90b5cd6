//! Root disks for microVM guests: an image's layers as an ext4 file
//! system, with `kiln-agent` as the guest's `/sbin/init`.
//!
//! A microVM cannot share a host directory the way a jail does; its root is
//! a block device. The disk of an image is made once and shared read-only
//! by every guest of the image (the agent, as PID 1, lays a tmpfs overlay
//! over it, so each guest writes to its own copy):
//!
//! ```text
//! <store>/disks/<manifest hex>-<agent key>.ext4   read-only, 0444
//! <store>/disks/tmp/<build>/                      a build in progress
//! <store>/disks/lock                              flock'ed by every build
//! ```
//!
//! The agent key is the first 16 hex digits of the agent binary's SHA-256:
//! a new agent makes new disks, and a disk never holds an agent that speaks
//! another protocol than its host's.
//!
//! A build unpacks the layers with the same checks as a jail's root
//! (`unpack`), but with ownership *not* shifted: in the guest, uid 0 of the
//! image is uid 0 of the kernel that mounts the disk. It needs root for
//! that (`lchown` to the image's ids), as the daemon already is for jails.
//! Then the mount points the agent uses (and `/etc`) are made where the
//! image lacks them, `/etc/resolv.conf` becomes an empty file, the agent is written into the image's `/sbin` (followed inside the
//! root, never out of it, when `/sbin` is a link as in merged-`/usr`
//! images) with `init` a link to it, and `mkfs.ext4 -d` (e2fsprogs >=
//! 1.43; no loop mount, no mount at all) copies the tree into a new file
//! system sized from the tree. The tree is removed afterwards; the disk is
//! renamed into place only when whole. [`ImageStore::gc`] removes the disks
//! of images no longer stored.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::digest::Digest;
use crate::store::{io_err, lock_file, lookup, tmp_name, Image, ImageStore, StoreError};
use crate::unpack::{self, remove_any};

/// The directories the guest agent mounts on or creates under a read-only
/// root (agent/src/guest.rs): it cannot make them itself. `etc` holds the
/// `resolv.conf` it writes in a guest with a network.
pub const GUEST_DIRS: [&str; 8] = ["proc", "sys", "dev", "overlay", "tmp", "run", "work", "etc"];

/// The name server file the agent writes in a networked guest: a plain
/// empty file in every disk, as in Kiln's guest image. An image's own may
/// be a link into `/run` (systemd-resolved), which the agent's write would
/// follow to a directory that does not exist in the guest.
const RESOLV_CONF: &str = "etc/resolv.conf";

/// Where the guest's init lives, as the kernel command line names it
/// (`init=/sbin/init`, like Kiln's own guest image).
const SBIN: &str = "sbin";
const AGENT_NAME: &str = "kiln-agent";

/// Slack on top of the tree for the file system's own metadata (block
/// group descriptors, bitmaps, the root directory's blocks, reserved
/// blocks), as deploy/guest/build-rootfs.sh sizes Kiln's own image.
const SLACK_BYTES: u64 = 32 << 20;
/// Bytes of an ext4 inode (mke2fs' default `inode_size`).
const INODE_BYTES: u64 = 256;

/// A statically linked `kiln-agent` to put into disks, and its key.
#[derive(Debug, Clone)]
pub struct GuestAgent {
    bytes: std::sync::Arc<Vec<u8>>,
    key: String,
}

impl GuestAgent {
    /// The agent binary `bytes` (a static executable: the image's
    /// libraries are not the ones it was linked against).
    pub fn new(bytes: Vec<u8>) -> Self {
        let key = Digest::of(&bytes).hex()[..16].to_owned();
        Self {
            bytes: std::sync::Arc::new(bytes),
            key,
        }
    }

    /// 16 hex digits of the binary's SHA-256: part of every disk's name.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl ImageStore {
    /// Where the disk of `image` with `agent` is, whether or not it exists.
    pub fn disk_path(&self, image: &Image, agent: &GuestAgent) -> PathBuf {
        self.dir()
            .join("disks")
            .join(format!("{}-{}.ext4", image.digest.hex(), agent.key))
    }

    /// The disk of `image` with `agent` as its init, built now if it does
    /// not exist yet (blocking: seconds for a small image). Builds are
    /// serialised by a lock of their own, so a build does not hold up pulls
    /// and imports.
    pub fn disk(&self, image: &Image, agent: &GuestAgent) -> Result<PathBuf, StoreError> {
        let path = self.disk_path(image, agent);
        if path.is_file() {
            return Ok(path);
        }
        let disks = self.dir().join("disks");
        let tmp_dir = disks.join("tmp");
        fs::create_dir_all(&tmp_dir).map_err(io_err(format!("creating {}", tmp_dir.display())))?;
        let _lock = lock_file(&disks.join("lock"))?;
        if path.is_file() {
            return Ok(path);
        }
        let work = tmp_dir.join(tmp_name());
        let built = self.build_disk(image, agent, &work).and_then(|disk| {
            fs::rename(&disk, &path).map_err(io_err(format!("renaming to {}", path.display())))
        });
        let _ = fs::remove_dir_all(&work);
        built.map(|()| path)
    }

    fn build_disk(
        &self,
        image: &Image,
        agent: &GuestAgent,
        work: &Path,
    ) -> Result<PathBuf, StoreError> {
        let root = work.join("root");
        fs::create_dir_all(&root).map_err(io_err(format!("creating {}", root.display())))?;
        for layer in &image.layers {
            let p = self.blob_path(layer);
            let f = fs::File::open(&p).map_err(io_err(format!("opening layer {}", p.display())))?;
            // Id base 0: the image's own ids, as the guest kernel sees them.
            unpack::apply_layer(
                &root,
                layer.as_str(),
                io::BufReader::new(f),
                self.limits(),
                Some(0),
            )
            .map_err(|source| StoreError::Unpack {
                image: image.name.clone(),
                source,
            })?;
        }
        let in_image = |e: io::Error| io_err(format!("image {}", image.name))(e);
        for m in GUEST_DIRS {
            mount_point(&root, m).map_err(in_image)?;
        }
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))
            .map_err(in_image)?;
        let resolv = root.join(RESOLV_CONF);
        remove_any(&resolv)
            .and_then(|()| fs::write(&resolv, b""))
            .and_then(|()| fs::set_permissions(&resolv, fs::Permissions::from_mode(0o644)))
            .map_err(in_image)?;
        install_init(&root, &agent.bytes).map_err(in_image)?;
        let disk = work.join("disk.ext4");
        mkfs(&root, &disk)?;
        fs::set_permissions(&disk, fs::Permissions::from_mode(0o444))
            .map_err(io_err(format!("chmod {}", disk.display())))?;
        Ok(disk)
    }
}

/// Makes `root/name` an empty directory owned by root where the image has
/// nothing there; anything else than a directory there is refused (the
/// agent mounts on it).
fn mount_point(root: &Path, name: &str) -> io::Result<()> {
    let p = root.join(name);
    match fs::symlink_metadata(&p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::other(format!(
            "/{name} is not a directory, and the guest agent needs one there"
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir(&p)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
            std::os::unix::fs::lchown(&p, Some(0), Some(0))
        }
        Err(e) => Err(e),
    }
}

/// Writes the agent as `/sbin/kiln-agent` with `/sbin/init` a link to it.
/// `/sbin` is followed inside the root (merged-`/usr` images link it to
/// `usr/sbin`); where it leads nowhere, or to something else than a
/// directory, it is replaced by a directory.
fn install_init(root: &Path, agent: &[u8]) -> io::Result<()> {
    let sbin = match lookup(root, &format!("/{SBIN}")) {
        Some(p) if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) => p,
        _ => {
            let p = root.join(SBIN);
            remove_any(&p)?;
            fs::create_dir(&p)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
            std::os::unix::fs::lchown(&p, Some(0), Some(0))?;
            p
        }
    };
    let bin = sbin.join(AGENT_NAME);
    let mut f = unpack::replace_with_file(&bin, 0o755)?;
    f.write_all(agent)?;
    drop(f);
    std::os::unix::fs::lchown(&bin, Some(0), Some(0))?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
    let init = sbin.join("init");
    remove_any(&init)?;
    std::os::unix::fs::symlink(AGENT_NAME, &init)?;
    std::os::unix::fs::lchown(&init, Some(0), Some(0))
}

/// What a tree needs of a file system: bytes of blocks and inodes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct TreeSize {
    bytes: u64,
    inodes: u64,
}

/// Sums the tree under `dir` (not following links): each file's data in
/// 4 KiB blocks, one inode per entry (hard links count twice: a little
/// room to spare).
fn tree_size(dir: &Path) -> io::Result<TreeSize> {
    let mut size = TreeSize::default();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            size.inodes += 1;
            size.bytes += m.size().next_multiple_of(4096);
            if m.is_dir() {
                todo.push(e.path());
            }
        }
    }
    Ok(size)
}

/// `mkfs.ext4 -d root` into a new file `disk`, sized from the tree: its
/// blocks plus a fifth, the inode table, and [`SLACK_BYTES`]. No journal:
/// the guest mounts it read-only.
fn mkfs(root: &Path, disk: &Path) -> Result<(), StoreError> {
    let size = tree_size(root).map_err(io_err(format!("measuring {}", root.display())))?;
    let inodes = size.inodes + size.inodes / 5 + 1024;
    let bytes = size.bytes + size.bytes / 5 + inodes * INODE_BYTES + SLACK_BYTES;
    let kib = bytes.div_ceil(1024);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "kiln-root", "-O", "^has_journal"])
        .args(["-E", "root_owner=0:0", "-m", "0"])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-d")
        .arg(root)
        .arg(disk)
        .arg(format!("{kib}k"))
        .env("LC_ALL", "C")
        .output()
        .map_err(io_err(
            "running mkfs.ext4 (install e2fsprogs 1.43 or newer) to make a guest disk",
        ))?;
    if !out.status.success() {
        return Err(io_err(format!("mkfs.ext4 -d {}", root.display()))(
            io::Error::other(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            )),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;

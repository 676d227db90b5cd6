//! A jail's root filesystem: overlays that the host mounts for each jail.
//!
//! Watches (inotify) and locks (`flock`, POSIX and OFD locks) belong to an
//! inode. When every jail bind-mounted the host's `/usr`, `/etc` and device
//! nodes, every jail and the host shared those inodes: a watch in one jail
//! saw which files another opened (its imports, the `/etc` files it read),
//! and an exclusive lock on a read-only file in one jail made the same lock
//! fail in every other jail and on the host. An overlayfs superblock has
//! inodes of its own, so each jail gets its own overlay of every tree it
//! shows. Measured on this kernel (6.18, `tests/tests/jail_shared_inodes.rs`
//! and docs/security.md): a watch on one overlay's file sees no open or read
//! through another overlay of the same lower, nor of the lower file itself;
//! locks on one overlay's inode never meet locks on another's or the lower's.
//! Reads and mappings still go to the lower file, so the page cache (a
//! shared library's pages) is shared as before.
//!
//! A tree is an [`Overlay`]: read-only lower directories, top first, with
//! an optional writable [`Upper`] (a per-sandbox layer for roots that are
//! images: lowers shared by every sandbox of an image, an upper of its
//! own). A jail's root is a list of overlays and where each goes, `/` first
//! ([`RootLayout`]).
//!
//! The host mounts them, detached (`fsopen`/`fsconfig`/`fsmount`), and the
//! jail's init attaches them where they go (`move_mount`, see `spawn`). Two
//! reasons: the kernel refuses to open device nodes on a filesystem mounted
//! from any user namespace but the host's (`SB_I_NODEV`), and the host
//! resolves the lowers, so the jail's ids need not be able to reach them.
//! Overlayfs checks a caller's permission against the overlay inode (the
//! lower's owner and mode, as before) and only then reads the lower with the
//! mounter's credentials, so host-mounted overlays give a jail no access its
//! own ids would not have. An overlay without an upper is read-only at the
//! superblock: not even the jail's root can write to it, whatever it does
//! to the mount's flags.
//!
//! The agent's binary is a file of that kind too: every jail used to exec
//! the same sealed memfd, one inode, so a jail's agent (were a job to take
//! it over) could watch every other jail start (each start opens it) and
//! lock it. Each jail now execs it from an overlay of its own, which is
//! never attached anywhere: the jail still cannot see it, or change it.
//!
//! What the overlays are made of that the host does not have (the skeleton
//! of a root of host directories, the device nodes, the agent's binary and
//! an empty directory) lives in a small tmpfs the backend makes at start-up
//! ([`Base`]): detached, read-only once filled, reachable only through the
//! backend's descriptor. The agent's bytes are copied there once, so every
//! jail execs the same bytes whatever happens to the file on disk.

use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use super::RootFs;

/// `fsopen`, `fsconfig` and `fsmount` flags and commands (linux/mount.h).
const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;

/// Mount attributes of the host's directories and of a template root.
const READ_ONLY_TREE: u64 =
    libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
/// Mount attributes of `/dev`: device nodes must open, nothing runs.
const DEVICES: u64 = libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NOEXEC;

/// Where the agent's binary is in the base filesystem, and its name in
/// the agent's own overlay.
const AGENT_DIR: &str = "agent";
const AGENT_FILE: &CStr = c"kiln-agent";

/// The device nodes of a jail's `/dev`, made like the host's.
pub const DEVICE_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Where the base keeps what a networked jail sees above its root: a tree
/// with only `etc/resolv.conf`, naming an address that routes out of the
/// sandbox (see [`resolv_conf`]).
const NET_ROOT: &str = "net";

/// The `/etc/resolv.conf` of a networked jail. Every DNS packet a
/// networked sandbox sends, to whatever address, is redirected to Kiln's
/// resolver (`crate::network`), so any address that leaves the sandbox
/// serves; what must not be there is a loopback name server (a host
/// running systemd-resolved or dnsmasq has `127.0.0.53` or `127.0.0.1` in
/// its own file, and an image may have anything or nothing), which would
/// stay inside the sandbox's namespace and fail every lookup.
pub fn resolv_conf(nameserver: std::net::Ipv4Addr) -> String {
    format!(
        "# Written by Kiln: every DNS query of this sandbox goes to Kiln's resolver.\n\
         nameserver {nameserver}\n\
         options timeout:2 attempts:2\n"
    )
}

/// Directories a root must have for the jail's and its rooms' own mounts.
pub const MOUNT_POINTS: [&str; 4] = ["proc", "dev", "tmp", "work"];

/// Host directories that make up a root of the host's system directories,
/// where they exist.
const HOST_DIRS: [&str; 8] = [
    "usr", "etc", "bin", "sbin", "lib", "lib64", "lib32", "libx32",
];

/// Why a jail's root could not be prepared or mounted.
#[derive(Debug, thiserror::Error)]
pub enum RootFsError {
    /// The backend's base filesystem could not be made.
    #[error("making the jails' base filesystem: {what}: {source}")]
    Base {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A host directory or device a root is made of could not be read.
    #[error("reading {path} for the jails' root: {source}")]
    Host {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An overlay could not be mounted.
    #[error("mounting an overlay of {lowers} ({step}): {source}")]
    Overlay {
        lowers: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A writable layer on top of an overlay's lowers, and the work directory
/// overlayfs needs beside it (on the same filesystem, empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upper {
    pub dir: PathBuf,
    pub work: PathBuf,
}

/// A tree made of read-only directories, top first, with an optional
/// writable upper layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    lowers: Vec<PathBuf>,
    upper: Option<Upper>,
    /// `MOUNT_ATTR_*` of the mount.
    attrs: u64,
}

impl Overlay {
    /// An overlay of `lowers` (top first; at least one) with mount
    /// attributes `attrs`.
    pub fn new(lowers: Vec<PathBuf>, attrs: u64) -> Self {
        assert!(!lowers.is_empty(), "an overlay needs a lower layer");
        Self {
            lowers,
            upper: None,
            attrs,
        }
    }

    /// The same overlay with a writable upper layer.
    pub fn with_upper(mut self, upper: Upper) -> Self {
        self.upper = Some(upper);
        self
    }

    /// The lowers as overlayfs's `lowerdir` option: `:` separates layers,
    /// so `:` and `\` in a path are escaped with `\`.
    fn lowerdir(&self) -> String {
        let mut s = String::new();
        for (i, l) in self.lowers.iter().enumerate() {
            if i > 0 {
                s.push(':');
            }
            for c in l.to_string_lossy().chars() {
                if c == ':' || c == '\\' {
                    s.push('\\');
                }
                s.push(c);
            }
        }
        s
    }

    /// Mounts the overlay as a new superblock, detached: a descriptor of
    /// its root that is attached nowhere until someone `move_mount`s it.
    pub fn mount(&self) -> Result<OwnedFd, RootFsError> {
        let fail = |step| {
            let lowers = self.lowerdir();
            move |source| RootFsError::Overlay {
                lowers,
                step,
                source,
            }
        };
        let mut options = vec![(c"lowerdir", cstring(self.lowerdir()))];
        if let Some(u) = &self.upper {
            options.push((c"upperdir", path_cstring(&u.dir)));
            options.push((c"workdir", path_cstring(&u.work)));
        }
        let fs = FsContext::open(c"overlay").map_err(fail("fsopen"))?;
        for (key, value) in &options {
            fs.set(key, value).map_err(fail("fsconfig"))?;
        }
        fs.mount(self.attrs).map_err(fail("fsmount"))
    }
}

/// A mounted overlay and where in the jail's root it goes.
pub struct Mounted {
    /// Relative to the jail's root; empty for the root itself.
    pub at: &'static str,
    pub mount: OwnedFd,
}

/// Everything mounted for one jail.
pub struct MountedRoot {
    /// The layers of its root, the root first.
    pub layers: Vec<Mounted>,
    /// The agent's binary on an overlay of the jail's own (`O_PATH`), to
    /// exec by descriptor.
    pub agent: OwnedFd,
}

/// What every jail's root is made of: the overlays and where each goes,
/// the root first, and the overlay the agent's binary is exec'd from.
pub struct RootLayout {
    /// Keeps the base filesystem the overlays' lowers are paths into.
    base: Base,
    layers: Vec<(&'static str, Overlay)>,
    agent: Overlay,
    /// Whether the base holds the `/etc` of networked jails ([`NET_ROOT`]).
    net_etc: bool,
    /// The jail's root on the host, owner of an image root's upper.
    id_base: u32,
}

impl RootLayout {
    /// Prepares the roots of `rootfs` and the agent's binary (`agent`, its
    /// bytes): checks the host's side and makes the base filesystem, with
    /// the jail's root (`id_base` on the host) as the owner of the
    /// directories it makes.
    /// `nameserver`: the address networked jails' `/etc/resolv.conf`
    /// names (`None`: no networking, no such file).
    pub fn new(
        rootfs: &RootFs,
        id_base: u32,
        agent: &[u8],
        nameserver: Option<std::net::Ipv4Addr>,
    ) -> Result<Self, RootFsError> {
        let host = match rootfs {
            RootFs::Host => host_entries()?,
            RootFs::Dir(_) => Vec::new(),
        };
        let resolv = nameserver.map(resolv_conf);
        let base = Base::new(&host, id_base, agent, resolv.as_deref())?;
        let read_only = |lower: PathBuf, attrs| {
            // Overlayfs wants two lowers when there is no upper; an empty
            // directory at the bottom changes nothing of the tree.
            Overlay::new(vec![lower, base.path("empty")], attrs)
        };
        let mut layers = Vec::new();
        match rootfs {
            RootFs::Host => {
                layers.push(("", read_only(base.path("root"), READ_ONLY_TREE)));
                for e in &host {
                    if let HostEntry::Dir(name) = e {
                        layers.push((*name, read_only(Path::new("/").join(name), READ_ONLY_TREE)));
                    }
                }
            }
            RootFs::Dir(d) => layers.push(("", read_only(d.clone(), READ_ONLY_TREE))),
        }
        layers.push(("dev", read_only(base.path("dev"), DEVICES)));
        let lowers: Vec<&Path> = layers
            .iter()
            .filter(|(at, _)| *at != "dev")
            .map(|(_, o)| o.lowers[0].as_path())
            .collect();
        warn_about_hidden_mounts(&lowers);
        let agent = read_only(
            base.path(AGENT_DIR),
            libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
        );
        Ok(Self {
            base,
            layers,
            agent,
            id_base,
            net_etc: nameserver.is_some(),
        })
    }

    /// `o` with the networked jail's `/etc` files on top, where `o` is the
    /// overlay at `at` that shows `/etc` (the host's `/etc`, or a root
    /// that holds one) and the jail is `networked`.
    fn for_net(&self, at: &str, o: &Overlay, networked: bool) -> Overlay {
        if !(networked && self.net_etc) {
            return o.clone();
        }
        let top = match at {
            "etc" => self.base.path(&format!("{NET_ROOT}/etc")),
            "" if !self.layers.iter().any(|(a, _)| *a == "etc") => self.base.path(NET_ROOT),
            _ => return o.clone(),
        };
        let mut o = o.clone();
        o.lowers.insert(0, top);
        o
    }

    /// Mounts every overlay of one jail, detached; a `networked` jail sees
    /// Kiln's `/etc/resolv.conf` ([`resolv_conf`]).
    pub fn mount(&self, networked: bool) -> Result<MountedRoot, RootFsError> {
        let layers = self
            .layers
            .iter()
            .map(|(at, o)| {
                Ok(Mounted {
                    at,
                    mount: self.for_net(at, o, networked).mount()?,
                })
            })
            .collect::<Result<_, RootFsError>>()?;
        Ok(MountedRoot {
            layers,
            agent: self.mount_agent()?,
        })
    }

    /// Mounts one jail's root made of an image instead: the image's
    /// unpacked directory (`image`) as the read-only lower every sandbox of
    /// the image shares, and as the upper a tmpfs of `disk_mb` MiB of the
    /// jail's own, detached, so that it goes with the jail's last mount
    /// and a full root is the jail's problem alone. `/dev` and the agent
    /// as for every jail.
    /// A `networked` jail sees Kiln's `/etc/resolv.conf` above the
    /// image's ([`resolv_conf`]); its writes go to its upper as usual.
    pub fn mount_image(
        &self,
        image: &Path,
        disk_mb: u64,
        networked: bool,
    ) -> Result<MountedRoot, RootFsError> {
        let upper = upper_tmpfs(disk_mb, self.id_base)?;
        let at = |rel: &str| PathBuf::from(format!("/proc/self/fd/{}/{rel}", upper.as_raw_fd()));
        let mut lowers = vec![image.to_path_buf()];
        if networked && self.net_etc {
            lowers.insert(0, self.base.path(NET_ROOT));
        }
        let root = Overlay::new(lowers, libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV)
            .with_upper(Upper {
                dir: at("upper"),
                work: at("work"),
            });
        let mut layers = vec![Mounted {
            at: "",
            mount: root.mount()?,
        }];
        for (at, o) in self.layers.iter().filter(|(at, _)| *at == "dev") {
            layers.push(Mounted {
                at,
                mount: o.mount()?,
            });
        }
        Ok(MountedRoot {
            layers,
            agent: self.mount_agent()?,
        })
    }

    fn mount_agent(&self) -> Result<OwnedFd, RootFsError> {
        let mount = self.agent.mount()?;
        // The open file keeps its mount; nothing else needs it.
        openat_path(mount.as_raw_fd(), AGENT_FILE).map_err(|source| RootFsError::Overlay {
            lowers: self.agent.lowerdir(),
            step: "opening the agent's binary",
            source,
        })
    }
}

/// Whether `elf` (an executable's bytes) runs without a dynamic loader:
/// it has no `PT_INTERP` program header (ELF64, little-endian; anything
/// else counts as dynamic).
pub fn is_static_elf(elf: &[u8]) -> bool {
    /// `PT_INTERP` (elf.h): the program header naming the loader.
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // ELF magic, 64-bit class (2), little-endian (1).
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).all(|i| {
        let at = phoff as usize + i * phentsize;
        u32_at(at).is_some_and(|t| t != PT_INTERP)
    })
}

/// A detached tmpfs of `disk_mb` MiB with an empty `upper` (owned by the
/// jail's root, `id_base`) and `work` directory for an overlay.
fn upper_tmpfs(disk_mb: u64, id_base: u32) -> Result<OwnedFd, RootFsError> {
    let fail = |what: &str| {
        let what = format!("the writable layer of an image root: {what}");
        move |source| RootFsError::Base { what, source }
    };
    let fs = FsContext::open(c"tmpfs").map_err(fail("fsopen tmpfs"))?;
    let size = cstring(format!("{}m", disk_mb.max(1)));
    for (k, v) in [(c"mode", c"0755"), (c"size", size.as_c_str())] {
        fs.set(k, v).map_err(fail("fsconfig tmpfs"))?;
    }
    let mount = fs
        .mount(libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV)
        .map_err(fail("fsmount tmpfs"))?;
    mkdirat(mount.as_raw_fd(), c"upper", 0o755).map_err(fail("mkdir upper"))?;
    chown_nofollow(mount.as_raw_fd(), c"upper", id_base).map_err(fail("chown upper"))?;
    mkdirat(mount.as_raw_fd(), c"work", 0o700).map_err(fail("mkdir work"))?;
    Ok(mount)
}

/// A host system directory as it appears in a jail's root.
#[derive(Debug, Clone)]
enum HostEntry {
    /// An overlay of the host's directory of that name.
    Dir(&'static str),
    /// The same symlink as the host's (merged-/usr systems).
    Link(&'static str, PathBuf),
}

fn host_entries() -> Result<Vec<HostEntry>, RootFsError> {
    let mut out = Vec::new();
    for name in HOST_DIRS {
        let p = Path::new("/").join(name);
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&p).map_err(|source| RootFsError::Host {
                path: p.clone(),
                source,
            })?;
            out.push(HostEntry::Link(name, target));
        } else if meta.is_dir() {
            out.push(HostEntry::Dir(name));
        }
    }
    Ok(out)
}

/// Warns about mounts below a lower directory: an overlay shows the lower
/// directory's own filesystem, not what is mounted inside it (a bind mount
/// used to carry those along).
fn warn_about_hidden_mounts(lowers: &[&Path]) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    for (point, lower) in hidden_mounts(&info, lowers) {
        tracing::warn!(
            "{} is mounted inside {}, and jails do not see it: a jail's root is an overlay of {}'s own filesystem",
            point.display(),
            lower.display(),
            lower.display()
        );
    }
}

/// The mount points of `mountinfo` (its text) strictly inside one of
/// `lowers`, each with that lower.
fn hidden_mounts(mountinfo: &str, lowers: &[&Path]) -> Vec<(PathBuf, PathBuf)> {
    let lowers: Vec<PathBuf> = lowers
        .iter()
        .filter_map(|l| std::path::absolute(l).ok())
        .collect();
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // Field 5 is the mount point, with spaces and the like as \ooo.
        let Some(point) = line.split(' ').nth(4) else {
            continue;
        };
        let point = Path::new(point);
        for lower in &lowers {
            if point != lower && point.starts_with(lower) {
                out.push((point.to_path_buf(), lower.clone()));
            }
        }
    }
    out
}

/// The backend's own small tmpfs: an empty directory, the `/dev` of every
/// jail (device nodes made like the host's, `/proc/self/fd` links, the
/// `shm` mount point), the agent's binary and, for a root of host
/// directories, the skeleton of that root (mount points, and the host's
/// merged-/usr links). Overlays name its directories by
/// `/proc/self/fd/<fd>/...`.
struct Base {
    mount: OwnedFd,
}

impl Base {
    fn new(
        host: &[HostEntry],
        id_base: u32,
        agent: &[u8],
        resolv: Option<&str>,
    ) -> Result<Self, RootFsError> {
        let fail = |what: &str| {
            let what = what.to_owned();
            move |source| RootFsError::Base { what, source }
        };
        let fs = FsContext::open(c"tmpfs").map_err(fail("fsopen tmpfs"))?;
        // Room for the agent and a few pages of directories and links.
        let size = cstring((agent.len() + (256 << 10)).to_string());
        for (k, v) in [(c"mode", c"0755"), (c"size", size.as_c_str())] {
            fs.set(k, v).map_err(fail("fsconfig tmpfs"))?;
        }
        let mount = fs
            .mount(libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV)
            .map_err(fail("fsmount tmpfs"))?;
        let base = Self { mount };
        let at = |rel: &str| CString::new(rel).expect("no NUL in base paths");
        let owned_by_jail = |rel: &str| {
            chown_nofollow(base.fd(), &at(rel), id_base).map_err(fail(&format!("chown {rel}")))
        };
        let dir = |rel: &str, mode| {
            mkdirat(base.fd(), &at(rel), mode).map_err(fail(&format!("mkdir {rel}")))?;
            owned_by_jail(rel)
        };
        let link = |rel: &str, target: &Path| {
            symlinkat(&path_cstring(target), base.fd(), &at(rel))
                .map_err(fail(&format!("symlink {rel}")))?;
            owned_by_jail(rel)
        };
        dir("empty", 0o755)?;
        dir("dev", 0o755)?;
        for name in DEVICE_NODES {
            let host = Path::new("/dev").join(name);
            let meta = fs::metadata(&host).map_err(|source| RootFsError::Host {
                path: host.clone(),
                source,
            })?;
            if !meta.file_type().is_char_device() {
                return Err(RootFsError::Host {
                    path: host,
                    source: io::Error::other("not a character device"),
                });
            }
            let rel = format!("dev/{name}");
            mknodat(
                base.fd(),
                &at(&rel),
                libc::S_IFCHR | (meta.mode() & 0o7777),
                meta.rdev(),
            )
            .map_err(fail(&format!("mknod {rel}")))?;
        }
        for (name, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            link(&format!("dev/{name}"), Path::new(target))?;
        }
        // A mount point only: every room mounts its own tmpfs on it.
        dir("dev/shm", 0o1777)?;
        if !host.is_empty() {
            dir("root", 0o755)?;
            for e in host {
                match e {
                    HostEntry::Dir(name) => dir(&format!("root/{name}"), 0o755)?,
                    HostEntry::Link(name, target) => link(&format!("root/{name}"), target)?,
                }
            }
            for name in MOUNT_POINTS {
                dir(&format!("root/{name}"), 0o755)?;
            }
        }
        if let Some(resolv) = resolv {
            dir(NET_ROOT, 0o755)?;
            dir(&format!("{NET_ROOT}/etc"), 0o755)?;
            let rel = format!("{NET_ROOT}/etc/resolv.conf");
            write_file(base.fd(), &at(&rel), resolv.as_bytes(), 0o444)
                .map_err(fail(&format!("writing {rel}")))?;
        }
        dir(AGENT_DIR, 0o755)?;
        let agent_at = format!("{AGENT_DIR}/{}", AGENT_FILE.to_string_lossy());
        write_file(base.fd(), &at(&agent_at), agent, 0o555)
            .map_err(fail(&format!("writing {agent_at}")))?;
        set_read_only(base.fd()).map_err(fail("making it read-only"))?;
        Ok(base)
    }

    fn fd(&self) -> RawFd {
        self.mount.as_raw_fd()
    }

    /// `rel` inside the base, as a path the kernel resolves in this process.
    fn path(&self, rel: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{rel}", self.fd()))
    }
}

fn cstring(s: String) -> CString {
    CString::new(s).expect("paths and options built here have no NUL")
}

fn path_cstring(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths built here have no NUL")
}

fn cvt(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A filesystem being configured (`fsopen`), to be mounted detached.
struct FsContext(OwnedFd);

impl FsContext {
    fn open(fstype: &CStr) -> io::Result<Self> {
        // SAFETY: fsopen takes a NUL-terminated name and returns a new fd.
        let fd = cvt(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) })?;
        // SAFETY: fsopen returned a fresh descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
    }

    fn set(&self, key: &CStr, value: &CStr) -> io::Result<()> {
        // SAFETY: key and value are NUL-terminated strings that outlive the call.
        cvt(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.0.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        })
        .map(drop)
    }

    /// Creates the superblock and mounts it detached with `attrs`.
    fn mount(self, attrs: u64) -> io::Result<OwnedFd> {
        // SAFETY: no memory arguments.
        cvt(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.0.as_raw_fd(),
                FSCONFIG_CMD_CREATE,
                std::ptr::null::<libc::c_char>(),
                std::ptr::null::<libc::c_char>(),
                0,
            )
        })?;
        // SAFETY: no memory arguments; returns a new fd.
        let fd = cvt(unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                self.0.as_raw_fd(),
                FSMOUNT_CLOEXEC,
                attrs,
            )
        })?;
        // SAFETY: fsmount returned a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }
}

/// Creates the file `path` under `dir` with `bytes` and then `mode`.
///
/// The writable descriptor lives in a thread with a descriptor table of its
/// own (`unshare(CLONE_FILES)`), never in the process's: a jail's init
/// cloned by another thread meanwhile would inherit it and hold it until
/// its exec, and a writer on the base makes it impossible to make it
/// read-only (EBUSY) or to exec the agent from it (ETXTBSY). Measured: of
/// 40 backends made while three tasks made and destroyed jails, 23 failed
/// with EBUSY when the file was written from the shared table, none since.
fn write_file(dir: RawFd, path: &CStr, bytes: &[u8], mode: libc::mode_t) -> io::Result<()> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: no memory arguments; affects this thread only.
            cvt(unsafe { libc::unshare(libc::CLONE_FILES) }.into())?;
            // SAFETY: a NUL-terminated path relative to a directory that
            // is open in the copied table too.
            let fd = cvt(unsafe {
                libc::openat(
                    dir,
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                    0o600,
                )
            }
            .into())?;
            // SAFETY: openat returned a fresh descriptor that nothing else owns.
            let mut file = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
            io::Write::write_all(&mut file, bytes)?;
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the writing thread panicked")))
    })
}

/// An `O_PATH` descriptor of `path` under `dir` (enough to exec it).
fn openat_path(dir: RawFd, path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated path relative to an open directory.
    let fd =
        cvt(unsafe { libc::openat(dir, path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) }.into())?;
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn mkdirat(dir: RawFd, path: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: a NUL-terminated path relative to an open directory.
    cvt(unsafe { libc::mkdirat(dir, path.as_ptr(), mode) }.into())?;
    // The umask may have taken bits away.
    fchmodat(dir, path, mode)
}

fn fchmodat(dir: RawFd, path: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: a NUL-terminated path relative to an open directory.
    cvt(unsafe { libc::fchmodat(dir, path.as_ptr(), mode, 0) }.into()).map(drop)
}

fn symlinkat(target: &CStr, dir: RawFd, path: &CStr) -> io::Result<()> {
    // SAFETY: NUL-terminated strings; a path relative to an open directory.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, path.as_ptr()) }.into()).map(drop)
}

fn mknodat(dir: RawFd, path: &CStr, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    // SAFETY: a NUL-terminated path relative to an open directory.
    cvt(unsafe { libc::mknodat(dir, path.as_ptr(), mode, dev) }.into())?;
    // The umask may have taken bits away (0666 would become 0644, and the
    // jail could not write to /dev/null).
    fchmodat(dir, path, mode & 0o7777)
}

fn chown_nofollow(dir: RawFd, path: &CStr, id: u32) -> io::Result<()> {
    // SAFETY: a NUL-terminated path relative to an open directory.
    cvt(unsafe { libc::fchownat(dir, path.as_ptr(), id, id, libc::AT_SYMLINK_NOFOLLOW) }.into())
        .map(drop)
}

/// Makes the detached mount behind `mount` read-only.
fn set_read_only(mount: RawFd) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: an empty path with AT_EMPTY_PATH names the fd itself; the
    // attribute struct is valid for the size passed.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    })
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory for one test, removed by the caller.
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-rootfs-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// `rel` inside the detached mount `m`, as a path.
    fn inside(m: &OwnedFd, rel: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{rel}", m.as_raw_fd()))
    }

    fn inotify_watch(path: &Path) -> OwnedFd {
        // SAFETY: inotify_init1 has no memory arguments; the fd is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: inotify_init1 returned a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let p = path_cstring(path);
        // SAFETY: a NUL-terminated path.
        let wd = unsafe {
            libc::inotify_add_watch(fd.as_raw_fd(), p.as_ptr(), libc::IN_OPEN | libc::IN_ACCESS)
        };
        assert!(
            wd >= 0,
            "watching {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
        fd
    }

    /// Whether events are waiting on the inotify descriptor (and drains them).
    fn saw_events(fd: &OwnedFd) -> bool {
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a valid buffer.
        unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) > 0 }
    }

    fn try_lock(path: &Path) -> (fs::File, bool) {
        let f = fs::File::open(path).unwrap();
        // SAFETY: flock on a descriptor we own.
        let ok = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        (f, ok)
    }

    /// The property the jails rely on, on the running kernel: two overlays
    /// of one lower, and the lower itself, have separate inodes for
    /// watches and locks, while each overlay's own opens and locks work.
    #[test]
    fn each_overlay_has_inodes_of_its_own_for_watches_and_locks() {
        let d = scratch("inodes");
        fs::create_dir_all(d.join("lower")).unwrap();
        fs::create_dir_all(d.join("empty")).unwrap();
        fs::write(d.join("lower/file"), "x").unwrap();
        let overlay = Overlay::new(vec![d.join("lower"), d.join("empty")], READ_ONLY_TREE);
        let (one, two) = (overlay.mount().unwrap(), overlay.mount().unwrap());
        let (file1, file2, host) = (
            inside(&one, "file"),
            inside(&two, "file"),
            d.join("lower/file"),
        );

        let watch = inotify_watch(&file1);
        fs::read(&file2).unwrap();
        fs::read(&host).unwrap();
        assert!(
            !saw_events(&watch),
            "a watch on one overlay saw another's or the host's open"
        );
        fs::read(&file1).unwrap();
        assert!(
            saw_events(&watch),
            "a watch on an overlay missed its own open"
        );

        let (_held, ok) = try_lock(&file1);
        assert!(ok);
        assert!(
            try_lock(&file2).1,
            "a lock on one overlay blocked another's"
        );
        assert!(try_lock(&host).1, "a lock on an overlay blocked the host's");
        assert!(
            !try_lock(&file1).1,
            "a lock on an overlay did not hold on that overlay"
        );
        drop((one, two));
        fs::remove_dir_all(&d).unwrap();
    }

    /// With an upper layer, writes land in the upper and the lowers stay
    /// as they were (a copy-up for a changed lower file).
    #[test]
    fn an_upper_takes_the_writes_and_the_lowers_stay_as_they_were() {
        let d = scratch("upper");
        for sub in ["lower", "upper", "work"] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        fs::write(d.join("lower/old"), "lower").unwrap();
        let m = Overlay::new(
            vec![d.join("lower")],
            READ_ONLY_TREE & !libc::MOUNT_ATTR_RDONLY,
        )
        .with_upper(Upper {
            dir: d.join("upper"),
            work: d.join("work"),
        })
        .mount()
        .unwrap();
        fs::write(inside(&m, "new"), "new").unwrap();
        fs::write(inside(&m, "old"), "changed").unwrap();
        assert_eq!(fs::read_to_string(inside(&m, "old")).unwrap(), "changed");
        assert_eq!(fs::read_to_string(d.join("upper/new")).unwrap(), "new");
        assert_eq!(fs::read_to_string(d.join("upper/old")).unwrap(), "changed");
        assert_eq!(fs::read_to_string(d.join("lower/old")).unwrap(), "lower");
        assert!(!d.join("lower/new").exists());
        drop(m);
        fs::remove_dir_all(&d).unwrap();
    }

    /// Without an upper, nothing can be written, not even by root.
    #[test]
    fn an_overlay_without_an_upper_refuses_every_write() {
        let d = scratch("readonly");
        fs::create_dir_all(d.join("lower")).unwrap();
        fs::create_dir_all(d.join("empty")).unwrap();
        let m = Overlay::new(vec![d.join("lower"), d.join("empty")], 0)
            .mount()
            .unwrap();
        let e = fs::write(inside(&m, "new"), "x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        drop(m);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn lower_paths_are_escaped_for_the_lowerdir_option() {
        let o = Overlay::new(vec!["/a:b".into(), r"/c\d".into(), "/e".into()], 0);
        assert_eq!(o.lowerdir(), r"/a\:b:/c\\d:/e");
    }

    /// A host root: the host's directories and links, the mount points,
    /// and a `/dev` of device nodes like the host's, each layer a new
    /// overlay.
    #[test]
    fn a_host_root_has_the_host_directories_mount_points_and_devices() {
        let layout = RootLayout::new(&RootFs::Host, 1_000_000_000, b"agent", None).unwrap();
        let mounts = layout.mount(false).unwrap().layers;
        let ats: Vec<&str> = mounts.iter().map(|m| m.at).collect();
        assert_eq!(ats.first(), Some(&""), "the root comes first");
        assert!(
            ats.contains(&"usr") && ats.contains(&"etc") && ats.contains(&"dev"),
            "{ats:?}"
        );
        let root = &mounts[0].mount;
        for p in MOUNT_POINTS.iter().chain(&["usr", "etc"]) {
            let meta = fs::metadata(inside(root, p)).unwrap();
            assert!(meta.is_dir(), "{p}");
            assert_eq!(meta.uid(), 1_000_000_000, "{p} belongs to the jail's root");
        }
        if let Ok(target) = fs::read_link("/bin") {
            assert_eq!(fs::read_link(inside(root, "bin")).unwrap(), target);
        }
        let usr = &mounts.iter().find(|m| m.at == "usr").unwrap().mount;
        assert!(
            inside(usr, "bin/sh").exists(),
            "the host's /usr shows through"
        );
        let dev = &mounts.iter().find(|m| m.at == "dev").unwrap().mount;
        for name in DEVICE_NODES {
            let (ours, host) = (
                fs::metadata(inside(dev, name)).unwrap(),
                fs::metadata(Path::new("/dev").join(name)).unwrap(),
            );
            assert!(ours.file_type().is_char_device(), "{name}");
            assert_eq!(
                (ours.rdev(), ours.mode()),
                (host.rdev(), host.mode()),
                "{name}"
            );
        }
        assert_eq!(
            fs::read_link(inside(dev, "stdout")).unwrap(),
            Path::new("/proc/self/fd/1")
        );
        let shm = fs::metadata(inside(dev, "shm")).unwrap();
        assert_eq!(shm.mode() & 0o7777, 0o1777);
    }

    /// A networked jail's `/etc/resolv.conf` is Kiln's, above the host's
    /// `/etc` (whose other files still show) or above an image's; a jail
    /// without a network sees the host's file.
    #[test]
    fn networked_jails_see_kilns_resolv_conf() {
        let ns = std::net::Ipv4Addr::new(10, 9, 0, 1);
        let layout = RootLayout::new(&RootFs::Host, 1_000_000_000, b"agent", Some(ns)).unwrap();
        let etc_of = |networked| {
            let mounts = layout.mount(networked).unwrap().layers;
            let etc = mounts.into_iter().find(|m| m.at == "etc").unwrap().mount;
            (
                fs::read_to_string(inside(&etc, "resolv.conf")).ok(),
                inside(&etc, "passwd").exists(),
            )
        };
        let (resolv, passwd) = etc_of(true);
        assert_eq!(resolv.as_deref(), Some(resolv_conf(ns).as_str()));
        assert!(passwd, "the host's other /etc files still show");
        let (resolv, _) = etc_of(false);
        assert_eq!(resolv, fs::read_to_string("/etc/resolv.conf").ok());

        let image = scratch("net-image");
        fs::create_dir_all(image.join("etc")).unwrap();
        fs::write(image.join("etc/resolv.conf"), "nameserver 127.0.0.53\n").unwrap();
        fs::write(image.join("etc/os-release"), "ID=test\n").unwrap();
        let root = layout.mount_image(&image, 8, true).unwrap().layers;
        let root = &root[0].mount;
        assert_eq!(
            fs::read_to_string(inside(root, "etc/resolv.conf")).unwrap(),
            resolv_conf(ns)
        );
        assert!(inside(root, "etc/os-release").exists());
        let root = layout.mount_image(&image, 8, false).unwrap().layers;
        assert_eq!(
            fs::read_to_string(inside(&root[0].mount, "etc/resolv.conf")).unwrap(),
            "nameserver 127.0.0.53\n"
        );
        fs::remove_dir_all(&image).unwrap();
    }

    /// The agent's copy cannot be changed, not even by root: neither
    /// through a jail's overlay nor in the base (read-only once filled);
    /// and each jail's exec sees the bytes given at start-up.
    #[test]
    fn static_executables_are_told_from_dynamic_ones() {
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static_elf(&me), "test binaries load libc dynamically");
        // Debian's ldconfig is linked statically.
        let ldconfig = fs::read("/sbin/ldconfig").unwrap();
        assert!(is_static_elf(&ldconfig));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
    }

    #[test]
    fn the_agent_copy_cannot_be_changed() {
        let layout = RootLayout::new(&RootFs::Host, 1_000_000_000, b"#!/bin/true\n", None).unwrap();
        let agent = layout.mount(false).unwrap().agent;
        let through_jail = PathBuf::from(format!("/proc/self/fd/{}", agent.as_raw_fd()));
        assert_eq!(fs::read(&through_jail).unwrap(), b"#!/bin/true\n");
        let e = fs::OpenOptions::new()
            .write(true)
            .open(&through_jail)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        let in_base = layout.base.path("agent/kiln-agent");
        let e = fs::OpenOptions::new()
            .write(true)
            .open(&in_base)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        assert_eq!(fs::metadata(&through_jail).unwrap().mode() & 0o7777, 0o555);
    }

    #[test]
    fn mounts_inside_a_lower_are_found() {
        let info = "27 1 254:0 / / rw - ext4 /dev/vda rw\n\
                    61 27 0:40 / /etc/hosts rw - ext4 /dev/vda rw\n\
                    62 27 0:41 / /etcetera rw - tmpfs t rw\n\
                    63 27 0:42 / /srv/tpl/opt rw - tmpfs t rw\n\
                    64 27 0:43 / /usr rw - ext4 /dev/vdb rw\n";
        let found = hidden_mounts(
            info,
            &[Path::new("/etc"), Path::new("/usr"), Path::new("/srv/tpl")],
        );
        assert_eq!(
            found,
            vec![
                ("/etc/hosts".into(), "/etc".into()),
                ("/srv/tpl/opt".into(), "/srv/tpl".into()),
            ]
        );
    }
}

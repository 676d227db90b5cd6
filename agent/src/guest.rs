//! Guest mode (`--guest-init`): the agent as PID 1 of a microVM guest. The
//! kernel mounts the guest's ext4 root read-only and starts the agent with
//! nothing else set up, so before serving the host over AF_VSOCK the agent
//! builds the little a job needs:
//!
//! - `/proc`, then the settings the host put on the kernel command line
//!   (`kiln.*`, see [`GuestConfig::parse`]): only what every sandbox of a
//!   template shares, since a snapshot freezes the command line;
//! - an overlay on `/` whose upper layer is a tmpfs (the image stays
//!   read-only and shared by every guest; writes vanish with the guest),
//!   switched to as the root the way `switch_root` does (move + chroot:
//!   `pivot_root` is not needed and would fail on an initramfs root);
//! - fresh `/proc`, `/sys`, `/dev` (devtmpfs, with `/dev/fd`, `/dev/shm`),
//!   tmpfs `/tmp`, `/work` and `/run`;
//! - `/proc/cmdline` and the kernel log out of jobs' reach, and the
//!   loopback interface up;
//! - once it listens on vsock, a `ready` note to the host ([`announce`]);
//!   or, with `kiln.vport=NAME` (a VM that will be snapshotted), the host
//!   served on that virtio-serial port instead (`port`), with no note: the
//!   host's `Hello` is the first byte on it.
//!
//! What is unique to a sandbox comes later, over the protocol, on every
//! connection ([`apply_setup`], `Frame::Setup`): entropy for the random
//! pool and a reseed of the kernel's generator, the wall clock, the
//! hostname, the sandbox's id, the size of the tmpfs directories and of
//! the root's writable layer (the sandbox's disk size), the cap on tasks
//! (`kernel.threads-max`), and, for a networked sandbox, the address,
//! default route and name server of its one network interface (`eth0`,
//! set with the same ioctls `ifconfig` and `route` use: no guest tools).
//! A VM restored from a snapshot gets its own before it runs anything; a
//! template never had any.
//!
//! Any failure is fatal: PID 1 exits, the kernel panics and, with
//! `panic=-1 reboot=t` and QEMU's `-no-reboot` (or Firecracker's reboot
//! handling), the VM stops, which the host sees as a dead sandbox.

use std::ffi::{CStr, CString};
use std::io;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

/// The vsock port the agent listens on unless `kiln.port=` says otherwise.
pub const DEFAULT_PORT: u32 = 1024;

/// Size of the tmpfs mounts until the host's setup sizes them.
const BOOT_DISK_MB: u64 = 64;

/// The tmpfs directories a setup sizes (the job's disk).
const SIZED_TMPFS: [&str; 3] = ["/work", "/tmp", "/dev/shm"];

/// The tmpfs holding the overlay's upper layer (what jobs write anywhere
/// in `/` outside the directories above): no path reaches it once the
/// root is switched, so it is kept open (close-on-exec), and a setup sizes
/// it through `/proc/self/fd` like the others. -1 until the guest is set up.
static UPPER_FD: AtomicI32 = AtomicI32::new(-1);

/// What the host tells the guest on the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// `kiln.port=P`: the vsock port to listen on.
    pub port: u32,
    /// `kiln.log=LEVEL`: the agent's log level (as `KILN_AGENT_LOG`).
    pub log: Option<String>,
    /// `kiln.dns=IPV4`: the name server for `/etc/resolv.conf` (a guest
    /// with a network device only).
    pub dns: Option<std::net::Ipv4Addr>,
    /// `kiln.ready=PORT`: once listening, connect to the host (CID 2) on
    /// this vsock port and say `ready\n`.
    pub ready_port: Option<u32>,
    /// `kiln.vport=NAME`: serve the host on the virtio-serial port of that
    /// name instead of vsock (a VM that is snapshotted; see `port`).
    pub vport: Option<String>,
}

impl GuestConfig {
    /// Parses `/proc/cmdline`; words that are not `kiln.*` are the kernel's.
    pub fn parse(cmdline: &str) -> Result<Self, String> {
        let mut cfg = Self {
            port: DEFAULT_PORT,
            log: None,
            dns: None,
            ready_port: None,
            vport: None,
        };
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "kiln.port" => {
                    cfg.port = value
                        .parse()
                        .ok()
                        .filter(|p| *p != u32::MAX)
                        .ok_or_else(|| format!("kiln.port={value:?} is not a vsock port"))?
                }
                "kiln.log" => cfg.log = Some(value.into()),
                "kiln.ready" => {
                    cfg.ready_port = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|p| *p != u32::MAX)
                            .ok_or_else(|| format!("kiln.ready={value:?} is not a vsock port"))?,
                    )
                }
                "kiln.vport" => {
                    if !crate::port::valid_name(value) {
                        return Err(format!(
                            "kiln.vport={value:?} is not a port name (1 to 64 of A-Z a-z 0-9 . - _)"
                        ));
                    }
                    cfg.vport = Some(value.into());
                }
                "kiln.dns" => {
                    cfg.dns = Some(
                        value
                            .parse()
                            .map_err(|_| format!("kiln.dns={value:?} is not an IPv4 address"))?,
                    )
                }
                _ => {}
            }
        }
        Ok(cfg)
    }
}

/// Where the new root is assembled before it replaces `/`.
const STAGE: &str = "/overlay";

/// Sets the guest up (see the module documentation) and returns what the
/// host asked for. Must run as PID 1, before anything else.
pub fn setup() -> Result<GuestConfig, String> {
    // Elsewhere these mounts would land on the host's own /proc and /.
    if crate::sys::getpid() != 1 {
        return Err("--guest-init only runs as PID 1 of a microVM guest".into());
    }
    let step = |what: &'static str| move |e: io::Error| format!("guest init: {what}: {e}");
    sys::mount(c"proc", c"/proc", c"proc", NOSUID_NODEV_NOEXEC, None)
        .map_err(step("mount /proc"))?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(step("read /proc/cmdline"))?;
    let cfg = GuestConfig::parse(&cmdline).map_err(|e| format!("guest init: {e}"))?;
    if let Some(level) = &cfg.log {
        // Still single-threaded: nothing else reads the environment.
        std::env::set_var("KILN_AGENT_LOG", level);
        crate::log::init_from_env();
    }
    let size = |mode: &str| cstring(format!("mode={mode},size={BOOT_DISK_MB}m"));

    // The overlay: read-only image below, tmpfs above.
    sys::mount(
        c"tmpfs",
        c"/overlay",
        c"tmpfs",
        NOSUID_NODEV,
        Some(&size("0755")),
    )
    .map_err(step("mount the overlay's tmpfs"))?;
    let upper = std::fs::File::open(STAGE).map_err(step("open the overlay's tmpfs"))?;
    UPPER_FD.store(
        std::os::fd::IntoRawFd::into_raw_fd(upper),
        Ordering::Relaxed,
    );
    for d in ["upper", "work", "root"] {
        std::fs::create_dir(format!("{STAGE}/{d}")).map_err(step("create the overlay dirs"))?;
    }
    let opts = cstring(format!(
        "lowerdir=/,upperdir={STAGE}/upper,workdir={STAGE}/work"
    ));
    sys::mount(c"overlay", c"/overlay/root", c"overlay", 0, Some(&opts))
        .map_err(step("mount the overlay root"))?;

    // The system mounts, inside the new root.
    let under = |p: &str| cstring(format!("{STAGE}/root{p}"));
    sys::mount(c"proc", &under("/proc"), c"proc", NOSUID_NODEV_NOEXEC, None)
        .map_err(step("mount /proc"))?;
    sys::mount(
        c"sysfs",
        &under("/sys"),
        c"sysfs",
        NOSUID_NODEV_NOEXEC,
        None,
    )
    .map_err(step("mount /sys"))?;
    sys::mount(
        c"devtmpfs",
        &under("/dev"),
        c"devtmpfs",
        libc::MS_NOSUID,
        None,
    )
    .map_err(step("mount /dev"))?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let link = format!("{STAGE}/root/dev/{name}");
        match std::os::unix::fs::symlink(target, &link) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(step("create /dev links")(e))
            }
            _ => {}
        }
    }
    for d in ["/dev/shm", "/tmp", "/work", "/run"] {
        let _ = std::fs::create_dir(format!("{STAGE}/root{d}"));
    }
    for (d, mode) in [
        ("/dev/shm", "1777"),
        ("/tmp", "1777"),
        ("/work", "0755"),
        ("/run", "0755"),
    ] {
        sys::mount(
            c"tmpfs",
            &under(d),
            c"tmpfs",
            NOSUID_NODEV,
            Some(&size(mode)),
        )
        .map_err(step("mount the tmpfs directories"))?;
    }

    // Switch roots; the old /proc stays underneath, out of reach.
    let _ = sys::umount_detach(c"/proc");
    sys::switch_root(&under("")).map_err(step("switch to the overlay root"))?;

    // Jobs have no business with the host's settings or the kernel's
    // boot messages.
    sys::mount(c"/dev/null", c"/proc/cmdline", c"", libc::MS_BIND, None)
        .map_err(step("hide /proc/cmdline"))?;
    std::fs::write("/proc/sys/kernel/dmesg_restrict", "1")
        .map_err(step("restrict the kernel log"))?;
    if let Some(dns) = cfg.dns {
        std::fs::write("/etc/resolv.conf", format!("nameserver {dns}\n"))
            .map_err(step("write /etc/resolv.conf"))?;
    }
    sys::sethostname("kiln").map_err(step("set the hostname"))?;
    sys::loopback_up().map_err(step("bring lo up"))?;
    Ok(cfg)
}

/// Applies the host's per-sandbox setup (see the module documentation):
/// entropy credited and the kernel's generator reseeded from it, the wall
/// clock, the hostname, the size of the tmpfs directories, the cap on
/// tasks. Runs on every connection: a restored snapshot arrives with the
/// template's state of all of these.
pub fn apply_setup(s: &kiln_protocol::GuestSetup) -> Result<(), String> {
    let step = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
    if s.entropy.len() < 32 {
        return Err(format!(
            "{} bytes of entropy; the host must send at least 32",
            s.entropy.len()
        ));
    }
    sys::add_entropy(&s.entropy).map_err(step("seed the random pool"))?;
    sys::reseed_crng().map_err(step("reseed the kernel's generator"))?;
    sys::set_realtime(s.clock_unix_ns).map_err(step("set the clock"))?;
    check_hostname(&s.hostname)?;
    sys::sethostname(&s.hostname).map_err(step("set the hostname"))?;
    if s.disk_mb == 0 {
        return Err("a disk size of 0 MiB".into());
    }
    // Already that size (the boot's, or the last setup's): nothing to do,
    // which spares a restored guest three remounts before its first job.
    if TMPFS_MB.load(Ordering::Relaxed) != s.disk_mb {
        resize_tmpfs(s.disk_mb)?;
    }
    limit_tasks(s.pids).map_err(step("limit the number of tasks"))?;
    if let Some(n) = &s.network {
        configure_network(n)?;
    }
    Ok(())
}

/// The netmask of a prefix length (0 to 32).
fn netmask(prefix_len: u8) -> Result<std::net::Ipv4Addr, String> {
    if prefix_len > 32 {
        return Err(format!("a prefix length of {prefix_len}"));
    }
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    Ok(std::net::Ipv4Addr::from(mask))
}

/// The guest's interface for its network: `eth0` gets `n`'s address and
/// comes up, the default route goes through the host's end, and
/// `/etc/resolv.conf` names the host's resolver.
fn configure_network(n: &kiln_protocol::GuestNetwork) -> Result<(), String> {
    let step = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
    let mask = netmask(n.prefix_len)?;
    sys::configure_interface(c"eth0", n.address, mask, n.gateway).map_err(step("set up eth0"))?;
    std::fs::write("/etc/resolv.conf", format!("nameserver {}\n", n.dns))
        .map_err(step("write /etc/resolv.conf"))
}

/// The size of the [`SIZED_TMPFS`] directories (and of the overlay's
/// upper layer) now, in MiB.
static TMPFS_MB: AtomicU64 = AtomicU64::new(BOOT_DISK_MB);

fn resize_tmpfs(disk_mb: u64) -> Result<(), String> {
    // Unknown until every remount succeeded.
    TMPFS_MB.store(0, Ordering::Relaxed);
    let upper = match UPPER_FD.load(Ordering::Relaxed) {
        -1 => None,
        fd => Some(format!("/proc/self/fd/{fd}")),
    };
    for dir in SIZED_TMPFS.iter().copied().chain(upper.as_deref()) {
        let data = cstring(format!("size={disk_mb}m"));
        sys::mount(
            c"tmpfs",
            &cstring(dir.into()),
            c"",
            libc::MS_REMOUNT | NOSUID_NODEV,
            Some(&data),
        )
        .map_err(|e| format!("resize {dir} to {disk_mb} MiB: {e}"))?;
    }
    TMPFS_MB.store(disk_mb, Ordering::Relaxed);
    Ok(())
}

/// A host name the kernel and resolvers take: 1 to 64 letters, digits,
/// `-` and `.`.
fn check_hostname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a host name"))
    }
}

/// Caps the guest's tasks at those running now (kernel threads, the agent)
/// plus `pids`, through `kernel.threads-max`.
fn limit_tasks(pids: u64) -> io::Result<()> {
    // /proc/loadavg: "0.00 0.00 0.00 running/total last_pid".
    let loadavg = std::fs::read_to_string("/proc/loadavg")?;
    let now: u64 = loadavg
        .split_whitespace()
        .nth(3)
        .and_then(|f| f.split_once('/'))
        .and_then(|(_, total)| total.parse().ok())
        .ok_or_else(|| io::Error::other(format!("unexpected /proc/loadavg {loadavg:?}")))?;
    // The kernel refuses less than 20 (MIN_THREADS in kernel/fork.c).
    let max = (now + pids).max(20);
    std::fs::write("/proc/sys/kernel/threads-max", max.to_string())
}

/// Tells the host that the agent listens (`kiln.ready=`): one connection
/// to the host, `ready\n`, closed. The host waits for it instead of
/// polling the agent's port while the guest boots, which costs CPU and, with
/// vhost-device-vsock, can wedge the device when a connection request
/// arrives while the guest driver is still setting up its queues.
pub fn announce(cfg: &GuestConfig) {
    let Some(port) = cfg.ready_port else { return };
    match sys::vsock_connect(libc::VMADDR_CID_HOST, port) {
        Ok(sock) => {
            let mut f = std::fs::File::from(sock);
            if let Err(e) = std::io::Write::write_all(&mut f, b"ready\n") {
                crate::log_warn!("announcing readiness on host vsock port {port}: {e}");
            }
        }
        Err(e) => {
            crate::log_warn!("connecting to host vsock port {port} to announce readiness: {e}")
        }
    }
}

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;
const NOSUID_NODEV_NOEXEC: libc::c_ulong = NOSUID_NODEV | libc::MS_NOEXEC;

fn cstring(s: String) -> CString {
    CString::new(s).expect("built here without NUL")
}

/// The system calls of guest set-up.
mod sys {
    use super::*;

    fn cvt(r: libc::c_int) -> io::Result<()> {
        if r == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn mount(
        src: &CStr,
        dst: &CStr,
        fstype: &CStr,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> io::Result<()> {
        let fstype = if fstype.is_empty() {
            std::ptr::null()
        } else {
            fstype.as_ptr()
        };
        let data = data.map_or(std::ptr::null(), |d| d.as_ptr().cast());
        // SAFETY: every pointer is a valid C string or null, as mount(2) allows.
        cvt(unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fstype, flags, data) })
    }

    pub fn umount_detach(path: &CStr) -> io::Result<()> {
        // SAFETY: a valid C path.
        cvt(unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) })
    }

    /// Makes `new_root` the root: move its mount onto `/`, then chroot.
    pub fn switch_root(new_root: &CStr) -> io::Result<()> {
        // SAFETY: valid C strings; chdir/mount/chroot have no other
        // preconditions.
        unsafe {
            cvt(libc::chdir(new_root.as_ptr()))?;
            cvt(libc::mount(
                c".".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            ))?;
            cvt(libc::chroot(c".".as_ptr()))?;
            cvt(libc::chdir(c"/".as_ptr()))
        }
    }

    /// `RNDADDENTROPY` (linux/random.h): `_IOW('R', 0x03, int[2])`.
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

    /// `RNDRESEEDCRNG` (linux/random.h): `_IO('R', 0x07)`.
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

    /// Makes the kernel's generator take a new key from the input pool now.
    /// Once the generator is initialised, new entropy waits in the pool
    /// until the next scheduled reseed (up to a minute), and every clone of
    /// a snapshot would produce the same bytes until then.
    pub fn reseed_crng() -> io::Result<()> {
        let urandom = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")?;
        // SAFETY: RNDRESEEDCRNG takes no argument.
        cvt(unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&urandom),
                RNDRESEEDCRNG as _,
            )
        })
    }

    /// Sets the wall clock to `unix_ns` nanoseconds since the epoch.
    pub fn set_realtime(unix_ns: u64) -> io::Result<()> {
        let ts = libc::timespec {
            tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: a valid timespec.
        cvt(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })
    }

    /// Mixes `seed` into the kernel's pool and credits it in full.
    pub fn add_entropy(seed: &[u8]) -> io::Result<()> {
        let urandom = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")?;
        // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
        let mut info = Vec::with_capacity(8 + seed.len());
        info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
        info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
        info.extend_from_slice(seed);
        info.resize(info.len().next_multiple_of(4), 0);
        // SAFETY: `info` is a rand_pool_info of the length it declares.
        cvt(unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&urandom),
                RNDADDENTROPY as _,
                info.as_ptr(),
            )
        })
    }

    /// A connected AF_VSOCK stream socket to `cid:port` (blocking).
    pub fn vsock_connect(cid: u32, port: u32) -> io::Result<std::os::fd::OwnedFd> {
        // SAFETY: plain socket creation.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_vm is valid.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = cid;
        addr.svm_port = port;
        // SAFETY: `addr` is a valid sockaddr_vm of the size passed.
        cvt(unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        Ok(sock)
    }

    pub fn sethostname(name: &str) -> io::Result<()> {
        // SAFETY: the pointer and length describe `name`.
        cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
    }

    fn sockaddr(a: std::net::Ipv4Addr) -> libc::sockaddr {
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(a).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes)
        // and any bytes are a valid sockaddr.
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
    }

    /// Gives interface `name` an address and netmask, brings it up and
    /// adds a default route through `gateway` (already there: fine).
    pub fn configure_interface(
        name: &CStr,
        address: std::net::Ipv4Addr,
        netmask: std::net::Ipv4Addr,
        gateway: std::net::Ipv4Addr,
    ) -> io::Result<()> {
        // SAFETY: plain socket creation; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        // SAFETY: an all-zero ifreq is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        let bytes = name.to_bytes_with_nul();
        if bytes.len() > req.ifr_name.len() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        // SAFETY: each ioctl reads (and SIOCGIFFLAGS writes) the ifreq
        // passed, whose union member is the one the request uses.
        unsafe {
            req.ifr_ifru.ifru_addr = sockaddr(address);
            cvt(libc::ioctl(fd, libc::SIOCSIFADDR as _, &req))?;
            req.ifr_ifru.ifru_netmask = sockaddr(netmask);
            cvt(libc::ioctl(fd, libc::SIOCSIFNETMASK as _, &req))?;
            cvt(libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req))?;
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            cvt(libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req))?;
        }
        // SAFETY: an all-zero rtentry is valid (no device, no metric).
        let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
        route.rt_dst = sockaddr(std::net::Ipv4Addr::UNSPECIFIED);
        route.rt_genmask = sockaddr(std::net::Ipv4Addr::UNSPECIFIED);
        route.rt_gateway = sockaddr(gateway);
        route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        // SAFETY: SIOCADDRT reads the rtentry passed; it names no device
        // (the kernel finds the one that reaches the gateway).
        match cvt(unsafe { libc::ioctl(fd, libc::SIOCADDRT as _, &route) }) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r,
        }
    }

    pub fn loopback_up() -> io::Result<()> {
        // SAFETY: plain socket creation; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: an all-zero ifreq is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq passed.
        unsafe {
            cvt(libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req))?;
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            cvt(libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kiln_settings_and_ignores_the_kernels() {
        let c = GuestConfig::parse(
            "console=ttyS0 reboot=t kiln.port=52 kiln.log=info kiln.dns=10.0.2.3 kiln.ready=1023 -- --guest-init",
        )
        .unwrap();
        assert_eq!(c.port, 52);
        assert_eq!(c.log.as_deref(), Some("info"));
        assert_eq!(c.ready_port, Some(1023));
        assert_eq!(c.dns, Some(std::net::Ipv4Addr::new(10, 0, 2, 3)));
        let d = GuestConfig::parse("console=ttyS0").unwrap();
        assert_eq!(d.port, DEFAULT_PORT);
        assert_eq!(d.ready_port, None);
        assert_eq!(d.vport, None);
        let v = GuestConfig::parse("console=ttyS0 kiln.vport=kiln.agent").unwrap();
        assert_eq!(v.vport.as_deref(), Some("kiln.agent"));
    }

    #[test]
    fn refuses_bad_settings_naming_them() {
        assert!(GuestConfig::parse("kiln.port=x")
            .unwrap_err()
            .contains("kiln.port"));
        assert!(GuestConfig::parse("kiln.port=4294967295").is_err());
        assert!(GuestConfig::parse("kiln.dns=example.org")
            .unwrap_err()
            .contains("kiln.dns"));
        assert!(GuestConfig::parse("kiln.vport=a/b")
            .unwrap_err()
            .contains("kiln.vport"));
    }

    #[test]
    fn netmasks_follow_the_prefix_length() {
        assert_eq!(
            netmask(30).unwrap(),
            std::net::Ipv4Addr::new(255, 255, 255, 252)
        );
        assert_eq!(netmask(32).unwrap(), std::net::Ipv4Addr::BROADCAST);
        assert_eq!(netmask(0).unwrap(), std::net::Ipv4Addr::UNSPECIFIED);
        assert!(netmask(33).unwrap_err().contains("33"));
    }

    #[test]
    fn host_names_are_checked_before_they_reach_the_kernel() {
        assert!(check_hostname("kiln-0123456789abcdef").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(
                check_hostname(bad).unwrap_err().contains("host name"),
                "{bad:?}"
            );
        }
    }
}

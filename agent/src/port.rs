//! The agent's channel in a microVM that is snapshotted: a virtio-serial
//! port (`kiln.vport=NAME` on the kernel command line) instead of AF_VSOCK.
//! QEMU 7.2 refuses to migrate a VM with a vhost-user vsock device, while a
//! `virtserialport` on a unix-socket chardev migrates; so a qemu template
//! and the VMs restored from it talk to the agent over such a port.
//!
//! A port is one byte stream whose host end comes and goes: the host
//! connects to QEMU's chardev socket, and the guest kernel learns of it
//! from a control message (`VIRTIO_CONSOLE_PORT_OPEN`). What the agent
//! sees (drivers/char/virtio_console.c, 6.1):
//!
//! - with no host connected, `read` returns 0 at once (after any bytes
//!   still buffered) and `poll` reports `POLLHUP`; writes would block;
//! - a host that connects or leaves raises `SIGIO` on an open port in
//!   `O_ASYNC` mode (`send_sigio_to_port`), which is how the agent waits
//!   for one without spinning ([`wait_for_host`]);
//! - closing the port (the last descriptor) discards whatever the guest had
//!   not read, and QEMU stops reading the chardev until it is open again.
//!
//! So the agent serves one host connection per opening of the port, as the
//! vsock path serves one accepted socket at a time: open, wait until a host
//! is connected, serve until `read` says the host left, close, open again.
//! A snapshot is taken while the agent waits with no host connected (the
//! template's host disconnects and waits for the agent to reopen the port,
//! which QEMU reports as `VSERPORT_CHANGE` events), so a restored guest
//! starts from that wait and serves the restore's host from its first byte:
//! nothing of the template's connection can leak into a clone's. Taken
//! with a host connected, it could: QEMU saves whether a host was
//! connected and, once the restored guest runs, tells it only if that
//! changed (`virtio_serial_post_load_timer_cb`), so a restore's host that
//! connected before that check would meet an agent still serving the
//! template's connection, mid-protocol.
//!
//! The agent writes nothing before the host's `Hello`: the host sends it
//! and waits for `HelloAck`, and QEMU holds the host's bytes until the
//! guest opens the port.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::agent::Agent;

/// How long the guest kernel gets to announce the port after the agent
/// starts: the driver adds ports when QEMU's control messages arrive,
/// which can be after init runs.
const FIND_WITHIN: Duration = Duration::from_secs(20);

/// Where the virtio console driver lists its ports (`<dev>/name`).
const PORTS: &str = "/sys/class/virtio-ports";

/// Whether `name` can be a port name on the kernel command line.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Serves host connections on the virtio-serial port `name`, one after
/// another, for ever.
pub fn serve(agent: &mut Agent, name: &str) -> Result<(), String> {
    let dev = find(Path::new(PORTS), Path::new("/dev"), name, FIND_WITHIN)?;
    let sigio = sys::sigio_signalfd().map_err(|e| format!("blocking SIGIO: {e}"))?;
    crate::log_info!("serving the host on virtio port {name} ({})", dev.display());
    loop {
        let port = sys::open_port(&dev).map_err(|e| format!("opening {}: {e}", dev.display()))?;
        wait_for_host(agent, &port, &sigio)
            .map_err(|e| format!("waiting for the host on {}: {e}", dev.display()))?;
        crate::log_info!("host connected on virtio port {name}");
        // Closing the port at the end discards what the host left unread.
        if let Err(e) = agent.serve(port) {
            crate::log_warn!("connection on virtio port {name} failed: {e}");
        }
    }
}

/// The device node of the port named `name`, waiting up to `within` for the
/// driver to add it.
fn find(ports: &Path, dev: &Path, name: &str, within: Duration) -> Result<PathBuf, String> {
    let deadline = Instant::now() + within;
    loop {
        for entry in std::fs::read_dir(ports).into_iter().flatten().flatten() {
            let named = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
            if named.trim_end() == name {
                let node = dev.join(entry.file_name());
                if node.exists() {
                    return Ok(node);
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no virtio port named {name} appeared in {} within {within:?} (does the VM have a virtserialport with name={name}?)",
                ports.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Returns once a host is connected to `port`. SIGIO wakes the wait; the
/// agent reaps its children meanwhile.
fn wait_for_host(agent: &mut Agent, port: &OwnedFd, sigio: &OwnedFd) -> io::Result<()> {
    sys::set_async(port.as_raw_fd(), true)?;
    let connected = loop {
        sys::drain(sigio);
        // Checked after O_ASYNC is on: a host that connects from here on
        // raises SIGIO, so none is missed.
        match sys::host_connected(port.as_raw_fd()) {
            Ok(true) => break Ok(()),
            Ok(false) => {}
            Err(e) => break Err(e),
        }
        if let Err(e) = agent.wait_readable(sigio.as_raw_fd()) {
            break Err(e);
        }
    };
    // Off again before serving, so that incoming data raises no more
    // signals; a SIGIO already queued is drained by the next wait.
    sys::set_async(port.as_raw_fd(), false)?;
    sys::drain(sigio);
    connected
}

/// The system calls of the port.
mod sys {
    use super::*;
    use kiln_sys::cvt;
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::OpenOptionsExt as _;

    /// The port, non-blocking (the agent's loop polls it).
    pub fn open_port(dev: &Path) -> io::Result<OwnedFd> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(dev)?;
        Ok(f.into())
    }

    /// Turns SIGIO on `fd` (to this process) on or off.
    pub fn set_async(fd: RawFd, on: bool) -> io::Result<()> {
        // SAFETY: fcntl with integer arguments only.
        unsafe {
            if on {
                cvt(libc::fcntl(fd, libc::F_SETOWN, libc::getpid()))?;
            }
            let fl = cvt(libc::fcntl(fd, libc::F_GETFL))?;
            let fl = if on {
                fl | libc::O_ASYNC
            } else {
                fl & !libc::O_ASYNC
            };
            cvt(libc::fcntl(fd, libc::F_SETFL, fl))?;
        }
        Ok(())
    }

    /// Whether a host is connected: the driver reports `POLLHUP` while none
    /// is.
    pub fn host_connected(fd: RawFd) -> io::Result<bool> {
        let mut p = [libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        // No EINTR to tell apart from "no event": the agent has no signal
        // handlers (its signals are blocked and read from signalfds).
        kiln_sys::poll::poll(&mut p, Some(std::time::Duration::ZERO))?;
        Ok(p[0].revents & libc::POLLHUP == 0)
    }

    /// Blocks SIGIO and returns a non-blocking signalfd for it. Jobs start
    /// with an empty signal mask (`spawn`), so they never inherit the block.
    pub fn sigio_signalfd() -> io::Result<OwnedFd> {
        kiln_sys::signal::block_into_signalfd(&[libc::SIGIO])
    }

    /// Discards every queued signal of a non-blocking signalfd.
    pub fn drain(fd: &OwnedFd) {
        kiln_sys::signal::read_signalfd(fd.as_fd());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names_are_checked() {
        assert!(valid_name("kiln.agent"));
        assert!(valid_name("org.kiln-agent_2"));
        for bad in ["", "a b", "a/b", "a=b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_port_is_found_by_name_and_a_missing_one_is_named() {
        let root = std::env::temp_dir().join(format!("kiln-port-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (ports, dev) = (root.join("ports"), root.join("dev"));
        for (p, name) in [("vport0p0", "other"), ("vport0p1", "kiln.agent")] {
            std::fs::create_dir_all(ports.join(p)).unwrap();
            std::fs::write(ports.join(p).join("name"), format!("{name}\n")).unwrap();
        }
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("vport0p1"), b"").unwrap();
        assert_eq!(
            find(&ports, &dev, "kiln.agent", Duration::ZERO).unwrap(),
            dev.join("vport0p1")
        );
        let e = find(&ports, &dev, "nope", Duration::from_millis(20)).unwrap_err();
        assert!(e.contains("nope") && e.contains("virtserialport"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}

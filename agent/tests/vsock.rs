//! `--vsock-port`: the agent listens on AF_VSOCK. A full exchange needs a
//! vsock transport that loops back (`vsock_loopback`) or a VM; where neither
//! exists the test still proves the agent binds and keeps listening, and
//! says that the exchange was skipped.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_protocol::limits::MAX_FRAME_BYTES;
use kiln_protocol::{read_frame, Frame};

/// Connects to `cid:port` over AF_VSOCK, as the host side would.
fn vsock_connect(cid: u32, port: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_vm is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: `addr` is a valid sockaddr_vm of the size passed.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sock)
}

#[test]
fn vsock_mode_listens_and_serves_pings_when_loopback_exists() {
    if !std::path::Path::new("/dev/vsock").exists() {
        eprintln!("SKIPPED: no /dev/vsock on this machine");
        return;
    }
    let port = 40_000 + std::process::id() % 20_000;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(["--vsock-port", &port.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent could not listen on vsock port {port}"
    );
    match vsock_connect(libc::VMADDR_CID_LOCAL, port) {
        Ok(fd) => {
            let mut s = UnixStream::from(fd); // any stream fd reads and writes alike
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&Frame::Ping(9).encode()).unwrap();
            assert_eq!(read_frame(&mut s, MAX_FRAME_BYTES).unwrap(), Frame::Pong(9));
        }
        Err(e) => eprintln!("SKIPPED the exchange: no vsock loopback transport here ({e})"),
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

//! The host's end of a hybrid vsock: the unix socket that Firecracker and
//! `vhost-device-vsock` expose for the guest's virtio-vsock device. The host
//! connects, writes `CONNECT <port>\n`, and reads `OK <host port>\n`; from
//! then on the stream is a connection to the guest's `port`. Connections
//! that the guest opens to the host (CID 2) arrive on `<uds>_<port>`
//! sockets that the host listens on ([`guest_listener_path`]).
//!
//! The same bytes for every microVM backend (QEMU with vhost-device-vsock,
//! Firecracker).

use std::io;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

/// Longest acknowledgement line accepted (`OK 4294967295\n` is 14 bytes).
const MAX_ACK_BYTES: usize = 32;

/// Why a hybrid-vsock connection failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The unix socket could not be reached or written.
    #[error("hybrid vsock socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The device closed the connection instead of acknowledging: nothing
    /// listens on the port in the guest (yet).
    #[error("nothing listens on guest vsock port {0}")]
    Refused(u32),
    /// The device answered something other than `OK <n>`.
    #[error("unexpected answer to CONNECT {port}: {answer:?}")]
    BadAnswer { port: u32, answer: String },
}

/// Connects to guest `port` through the hybrid vsock socket at `uds`.
pub async fn connect(uds: &Path, port: u32) -> Result<UnixStream, VsockError> {
    let sock = |source| VsockError::Socket {
        path: uds.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(uds).await.map_err(sock)?;
    // A device whose guest driver is not up yet hangs up at once.
    match stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
    {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) =>
        {
            return Err(VsockError::Refused(port))
        }
        Err(e) => return Err(sock(e)),
    }
    // Byte by byte: whatever follows the line already belongs to the guest.
    let mut line = Vec::with_capacity(MAX_ACK_BYTES);
    loop {
        let mut b = [0u8; 1];
        match stream.read(&mut b).await {
            Ok(0) => return Err(VsockError::Refused(port)),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < MAX_ACK_BYTES => line.push(b[0]),
            Ok(_) => {
                return Err(VsockError::BadAnswer {
                    port,
                    answer: String::from_utf8_lossy(&line).into_owned(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(VsockError::Refused(port))
            }
            Err(e) => return Err(sock(e)),
        }
    }
    let answer = String::from_utf8_lossy(&line).into_owned();
    match answer.strip_prefix("OK ").map(str::parse::<u32>) {
        Some(Ok(_)) => Ok(stream),
        _ => Err(VsockError::BadAnswer { port, answer }),
    }
}

/// Where the host must listen for the guest's connections to host `port`.
pub fn guest_listener_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt as _;

    /// A fake device: answers `CONNECT` lines with `answer` (or hangs up).
    async fn device(answer: Option<&'static str>) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("v.sock");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut s = tokio::io::BufReader::new(s);
            let mut line = String::new();
            s.read_line(&mut line).await.unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            if let Some(a) = answer {
                s.get_mut().write_all(a.as_bytes()).await.unwrap();
                s.get_mut().write_all(b"guest bytes").await.unwrap();
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
        (dir, path)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!(
                    "kiln-vsock-test-{}-{}",
                    std::process::id(),
                    crate::SandboxId::random()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[tokio::test]
    async fn ok_answer_gives_the_stream_without_eating_guest_bytes() {
        let (_d, path) = device(Some("OK 1073741824\n")).await;
        let mut s = connect(&path, 1024).await.unwrap();
        let mut buf = [0u8; 11];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"guest bytes");
    }

    #[tokio::test]
    async fn hang_up_means_nobody_listens_and_garbage_is_named() {
        let (_d, path) = device(None).await;
        assert!(matches!(
            connect(&path, 1024).await,
            Err(VsockError::Refused(1024))
        ));
        let (_d, path) = device(Some("NO\n")).await;
        let e = connect(&path, 1024).await.unwrap_err();
        assert!(e.to_string().contains("\"NO\""), "{e}");
    }

    #[test]
    fn guest_connections_arrive_on_port_suffixed_sockets() {
        assert_eq!(
            guest_listener_path(Path::new("/run/x/vsock.sock"), 52),
            PathBuf::from("/run/x/vsock.sock_52")
        );
    }
}

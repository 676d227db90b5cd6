//! From a started VMM to a ready agent: the steps every microVM backend
//! takes once its VMM runs. A booting guest's agent connects to host vsock
//! port [`READY_PORT`] and says `ready` once it listens ([`ReadySignal`]);
//! the host then connects to [`AGENT_PORT`] ([`connect_agent`]), shakes
//! hands and sends the per-sandbox guest setup ([`handshake`],
//! [`guest_setup`]). A guest restored from a snapshot already listens: its
//! host skips the ready signal and connects at once.
//!
//! While it waits, the host keeps asking the backend whether its VMM still
//! runs (an `alive` callback), so that a guest that died fails at once
//! with its console's last lines instead of at the timeout.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use kiln_protocol::{GuestSetup, Hello};
use tokio::net::{UnixListener, UnixStream};

use super::console::Console;
use super::vsock::{self, VsockError};
use crate::{AgentConn, AgentError, SandboxId, SandboxSpec};

/// The vsock port the guest agent listens on (`kiln.port=`).
pub const AGENT_PORT: u32 = 1024;

/// The host vsock port on which the guest agent says `ready` once it
/// listens (`kiln.ready=`).
pub const READY_PORT: u32 = 1023;

/// The guest kernel's command line for Kiln's guest image: the console on
/// the first serial port, the read-only ext4 root on the first virtio disk,
/// `kiln-agent` as init listening on [`AGENT_PORT`] and announcing itself on
/// [`READY_PORT`], and a reboot that stops the VM. `verbose` lets the
/// kernel log its boot (slow under emulation; for diagnosis). The agent's
/// log level comes from `KILN_AGENT_LOG` (default `warn`).
pub fn kernel_cmdline(verbose: bool) -> String {
    let log = std::env::var("KILN_AGENT_LOG").unwrap_or_else(|_| "warn".into());
    format!(
        "console=ttyS0 {} reboot=t panic=-1 root=/dev/vda ro rootfstype=ext4 \
         init=/sbin/init kiln.port={AGENT_PORT} kiln.ready={READY_PORT} kiln.log={log}",
        if verbose { "" } else { "quiet" },
    )
}

/// Bytes of fresh entropy each sandbox's guest gets (twice the kernel's
/// 256-bit generator key).
const SETUP_ENTROPY_BYTES: usize = 64;

/// Why a guest's agent did not become reachable.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The VMM, or a helper it needs, stopped.
    #[error("the guest {what}; its console said:\n{console}")]
    Died { what: String, console: String },
    /// The agent took too long.
    #[error("the guest's agent did not {step} within {within:?}; its console said:\n{console}")]
    Timeout {
        step: &'static str,
        within: Duration,
        console: String,
    },
    /// The host could not listen for the guest's ready signal.
    #[error("listening for the guest's ready signal on {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The hybrid-vsock socket failed in a way retrying does not mend.
    #[error("connecting to the guest's agent: {0}")]
    Connect(#[source] VsockError),
}

/// The host's end of the guest's ready signal: a listener on the hybrid
/// vsock's `<uds>_<READY_PORT>`, made before the VMM starts.
#[must_use = "the guest's ready signal is missed unless it is waited for"]
pub struct ReadySignal {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadySignal {
    /// Listens where the agent of the guest behind `uds` will announce
    /// itself.
    pub fn listen(uds: &Path) -> Result<Self, BootError> {
        let path = vsock::guest_listener_path(uds, READY_PORT);
        let listener = UnixListener::bind(&path).map_err(|source| BootError::Listen {
            path: path.clone(),
            source,
        })?;
        Ok(Self { listener, path })
    }

    /// Waits for `ready\n` until `deadline`, failing early when `alive`
    /// says the VMM died. Connecting to the guest before its vsock driver
    /// is up can wedge vhost-device-vsock, which is why a booting guest is
    /// not polled.
    pub async fn wait(
        self,
        deadline: Instant,
        alive: &mut (dyn FnMut() -> Result<(), String> + Send),
        console: &Console,
    ) -> Result<(), BootError> {
        let within = deadline.saturating_duration_since(Instant::now());
        loop {
            tokio::select! {
                conn = self.listener.accept() => {
                    if let Ok((mut c, _)) = conn {
                        let mut line = [0u8; 6];
                        let read = tokio::time::timeout(
                            Duration::from_secs(5),
                            tokio::io::AsyncReadExt::read_exact(&mut c, &mut line),
                        )
                        .await;
                        if matches!(read, Ok(Ok(_)) if &line == b"ready\n") {
                            return Ok(());
                        }
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            still_booting(alive, console, deadline, within, "say ready")?;
        }
    }
}

impl Drop for ReadySignal {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn still_booting(
    alive: &mut (dyn FnMut() -> Result<(), String> + Send),
    console: &Console,
    deadline: Instant,
    within: Duration,
    step: &'static str,
) -> Result<(), BootError> {
    if let Err(what) = alive() {
        return Err(BootError::Died {
            what,
            console: console.tail(),
        });
    }
    if Instant::now() >= deadline {
        return Err(BootError::Timeout {
            step,
            within,
            console: console.tail(),
        });
    }
    Ok(())
}

/// Connects to the agent through the hybrid vsock at `uds`, retrying while
/// nothing listens yet (a device still settling, a restored guest whose
/// agent is about to accept) until `deadline`.
pub async fn connect_agent(
    uds: &Path,
    deadline: Instant,
    alive: &mut (dyn FnMut() -> Result<(), String> + Send),
    console: &Console,
) -> Result<UnixStream, BootError> {
    let within = deadline.saturating_duration_since(Instant::now());
    loop {
        let attempt =
            tokio::time::timeout(Duration::from_secs(2), vsock::connect(uds, AGENT_PORT)).await;
        match attempt {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(VsockError::Socket { path, source }))
                if source.kind() != io::ErrorKind::NotFound
                    && source.kind() != io::ErrorKind::ConnectionRefused =>
            {
                return Err(BootError::Connect(VsockError::Socket { path, source }));
            }
            _ => {}
        }
        still_booting(alive, console, deadline, within, "listen")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What is unique to a new sandbox's guest: fresh entropy from the host's
/// generator, the host's clock now, a hostname and the id, the disk size
/// and the task cap. `Err` if the host's generator fails: a guest must
/// never get predictable bytes.
pub fn guest_setup(id: &SandboxId, spec: &SandboxSpec) -> io::Result<GuestSetup> {
    let mut entropy = vec![0u8; SETUP_ENTROPY_BYTES];
    let mut filled = 0;
    while filled < entropy.len() {
        // SAFETY: getrandom writes at most the given length into the buffer.
        let n = unsafe {
            libc::getrandom(
                entropy[filled..].as_mut_ptr().cast(),
                entropy.len() - filled,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += n as usize;
    }
    let clock_unix_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(io::Error::other)?
        .as_nanos() as u64;
    Ok(GuestSetup {
        tag: 0,
        sandbox_id: id.to_string(),
        hostname: format!("kiln-{id}"),
        entropy,
        clock_unix_ns,
        disk_mb: spec.disk_mb,
        pids: spec.pids,
        network: None,
    })
}

/// The protocol's opening on a fresh connection to a guest's agent:
/// `Hello`, then the guest setup, each bounded by `within`.
pub async fn handshake(
    agent: &AgentConn,
    hello: Hello,
    setup: GuestSetup,
    within: Duration,
) -> Result<(), AgentError> {
    agent.hello(hello, within).await?;
    agent.setup(setup, within).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_sandboxes_get_different_entropy_and_their_own_names() {
        let spec = SandboxSpec::for_job(&kiln_protocol::Limits::default(), "python");
        let (a, b) = (SandboxId::random(), SandboxId::random());
        let sa = guest_setup(&a, &spec).unwrap();
        let sb = guest_setup(&b, &spec).unwrap();
        assert_eq!(sa.entropy.len(), SETUP_ENTROPY_BYTES);
        assert_ne!(sa.entropy, sb.entropy);
        assert_eq!(sa.hostname, format!("kiln-{a}"));
        assert_eq!(sa.sandbox_id, a.as_str());
        assert_eq!(sa.disk_mb, spec.disk_mb);
        assert!(sa.entropy.len() <= kiln_protocol::MAX_SETUP_ENTROPY_BYTES);
    }
}

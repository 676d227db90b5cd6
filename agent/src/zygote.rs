//! Zygotes: one long-lived, pre-initialised interpreter per runtime that
//! forks every warm interpreter of a sandbox with rooms, instead of each
//! one paying the interpreter's start.
//!
//! A zygote is the runtime's warm command (`zygote = true` in the runtime
//! table) started as the agent's own user, in the agent's namespaces, with
//! fd 3 one end of a `SOCK_SEQPACKET` socket pair. The contract, from the
//! agent's side of that socket (the interpreter's side is in
//! `protocol/src/runtime.rs`):
//!
//! 1. The agent sends the set-up, once: JSON `{"uid", "gid", "cwd",
//!    "filters"}` (the job's identity, its work directory inside a room,
//!    and the job's seccomp programs, base64).
//! 2. The zygote imports and warms what it can, then answers
//!    `{"ready": true}`.
//! 3. For each warm interpreter the agent sends `{"id": n}` with five
//!    descriptors attached: the room's pidfd, then the child's stdin,
//!    stdout, stderr and control pipe ends. The zygote forks; the fork
//!    enters the room (`setns` on the pidfd) and forks again, so that the
//!    interpreter is born in the room's pid namespace, and answers
//!    `{"id": n, "pid": p}` (or `{"id": n, "error": "..."}`) before it exits.
//!    The interpreter is then re-parented to the agent, which reaps it like
//!    any exec. It drops every privilege, installs the filters, prepares the
//!    job path while nobody waits (the copy-on-write faults of a fork are
//!    paid here), and reads its job from fd 3 like any warm interpreter.
//! 4. A message with `"error"` that answers no pending request is logged.
//!
//! The agent asks synchronously (a fork takes well under a millisecond) and
//! gives up after [`FORK_TIMEOUT`]; a zygote that dies or stops answering is
//! killed, and the runtime's warm interpreters are started from scratch
//! until a new zygote is ready.
//!
//! Every fork has the zygote's memory layout (libc, heap and stack
//! addresses, the stack protector's canary) and its interpreter's hash
//! seed, which a job can read and the next job of the sandbox would share.
//! So a zygote forks at most its runtime's `zygote_max_uses` interpreters
//! (each of which runs at most one job): right after its last fork the
//! agent kills it and starts a fresh one, whose forks get a layout of their
//! own. The fresh one starts while the last fork waits for its job, so it
//! is usually ready before the next fork is wanted; until it is, jobs start
//! cold.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::room::Room;
use crate::spawn::{self, JobFilters, JobIdentity, Spawned};
use crate::{log_info, log_warn, sys};

/// How long a fork request may take before the zygote counts as broken.
const FORK_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest message either side sends.
const MAX_MESSAGE: usize = 64 * 1024;

/// A message from a zygote.
#[derive(Debug, serde::Deserialize)]
struct Reply {
    #[serde(default)]
    ready: bool,
    id: Option<u64>,
    pid: Option<i32>,
    error: Option<String>,
}

/// Why a zygote could not fork.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    #[error("talking to the zygote failed: {0}")]
    Io(#[from] io::Error),
    #[error("the zygote did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the zygote could not fork: {0}")]
    Refused(String),
    #[error("the zygote closed its socket")]
    Gone,
}

/// A running zygote.
#[derive(Debug)]
pub struct Zygote {
    runtime: String,
    pid: i32,
    sock: OwnedFd,
    ready: bool,
    next_id: u64,
    /// Interpreters forked so far.
    forks: u32,
    /// Forks after which it is replaced (at least 1).
    max_uses: u32,
    /// Receive buffer for the zygote's messages, allocated once.
    buf: Vec<u8>,
}

impl Zygote {
    /// Starts `command` as the zygote of `runtime`, to fork `max_uses`
    /// interpreters, and sends it the set-up.
    pub fn start(
        runtime: &str,
        command: &[String],
        max_uses: u32,
        env: &BTreeMap<String, String>,
        job: &JobIdentity,
        filters: &JobFilters,
    ) -> io::Result<Zygote> {
        let (ours, theirs) = sys::seqpacket_pair()?;
        let pid = spawn::spawn_zygote(command, env, &theirs)?;
        drop(theirs);
        let setup = serde_json::json!({
            "uid": job.uid,
            "gid": job.gid,
            "cwd": job.cwd,
            "filters": filters
                .raw()
                .iter()
                .map(|p| base64::engine::general_purpose::STANDARD.encode(p))
                .collect::<Vec<_>>(),
        });
        let zygote = Zygote {
            runtime: runtime.to_owned(),
            pid,
            sock: ours,
            ready: false,
            next_id: 0,
            forks: 0,
            max_uses: max_uses.max(1),
            buf: vec![0u8; MAX_MESSAGE],
        };
        if let Err(e) = sys::send_with_fds(zygote.fd(), setup.to_string().as_bytes(), &[]) {
            zygote.kill();
            return Err(e);
        }
        sys::set_nonblocking(zygote.fd())?;
        log_info!("{runtime} zygote started: pid {pid}");
        Ok(zygote)
    }

    pub fn runtime(&self) -> &str {
        &self.runtime
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Whether it has made its `max_uses` forks and is to be replaced.
    pub fn used_up(&self) -> bool {
        self.forks >= self.max_uses
    }

    /// The socket, for the agent's poll set.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Reads what the zygote sent unasked; `Ok(true)` once it said it is
    /// ready, `Err` when it is gone.
    pub fn on_readable(&mut self) -> Result<bool, ZygoteError> {
        while let Some(reply) = self.recv()? {
            self.note(&reply);
        }
        Ok(self.ready)
    }

    fn note(&mut self, reply: &Reply) {
        if reply.ready && !self.ready {
            self.ready = true;
            log_info!("{} zygote {} is ready", self.runtime, self.pid);
        }
        if let Some(e) = &reply.error {
            log_warn!(
                "{} zygote {}: request {:?} failed: {e}",
                self.runtime,
                self.pid,
                reply.id
            );
        }
    }

    /// One message, if one is waiting.
    fn recv(&mut self) -> Result<Option<Reply>, ZygoteError> {
        // SAFETY: `buf` is valid writable memory of its length.
        let n = unsafe {
            libc::recv(
                self.sock.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e.into()),
            };
        }
        if n == 0 {
            return Err(ZygoteError::Gone);
        }
        match serde_json::from_slice::<Reply>(&self.buf[..n as usize]) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                log_warn!("{} zygote sent an unreadable message: {e}", self.runtime);
                Ok(Some(Reply {
                    ready: false,
                    id: None,
                    pid: None,
                    error: None,
                }))
            }
        }
    }

    /// Has the zygote fork a warm interpreter into `room` and returns it with
    /// the agent's ends of its pipes. Only for a zygote that is ready
    /// ([`Zygote::is_ready`]); the caller checks.
    pub fn fork_into(&mut self, room: &Room) -> Result<Spawned, ZygoteError> {
        let (stdin_r, stdin_w) = sys::pipe()?;
        let (stdout_r, stdout_w) = sys::pipe()?;
        let (stderr_r, stderr_w) = sys::pipe()?;
        let (control_r, control_w) = sys::pipe()?;
        self.next_id += 1;
        let id = self.next_id;
        sys::send_with_fds(
            self.fd(),
            serde_json::json!({ "id": id }).to_string().as_bytes(),
            &[
                room.pidfd(),
                stdin_r.as_fd(),
                stdout_w.as_fd(),
                stderr_w.as_fd(),
                control_r.as_fd(),
            ],
        )?;
        drop((stdin_r, stdout_w, stderr_w, control_r));
        let deadline = Instant::now() + FORK_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !sys::wait_readable(self.fd(), left)? {
                return Err(ZygoteError::Timeout(FORK_TIMEOUT));
            }
            let Some(reply) = self.recv()? else { continue };
            if reply.id != Some(id) {
                self.note(&reply);
                continue;
            }
            if let Some(e) = reply.error {
                return Err(ZygoteError::Refused(e));
            }
            let Some(pid) = reply.pid.filter(|&p| p > 1) else {
                return Err(ZygoteError::Refused(format!(
                    "answer without a pid: {reply:?}"
                )));
            };
            self.forks += 1;
            for fd in [&stdin_w, &stdout_r, &stderr_r, &control_w] {
                sys::set_nonblocking(fd.as_fd())?;
            }
            return Ok(Spawned {
                pid,
                stdin: stdin_w,
                stdout: stdout_r,
                stderr: stderr_r,
                control: Some(control_w),
            });
        }
    }

    /// Kills the zygote (its forks live on: they are the agent's).
    pub fn kill(&self) {
        // SAFETY: kill has no memory effects; the pid is our child, not
        // reaped yet (the agent forgets the zygote when it reaps it).
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }
}

//! The agent proper: one host connection served by a single-threaded
//! poll(2) loop over the socket, a signalfd (SIGCHLD, and the termination
//! signals it forwards to jobs) and the pipes of every running exec.
//!
//! Every write is non-blocking. Frames for the host go to one outgoing
//! buffer, in the order they are produced, which is what guarantees that an
//! exec's output frames precede its `Exit`. When that buffer holds more than
//! [`BACKPRESSURE_BYTES`], job pipes are no longer read (the jobs block on
//! full pipes) until the host has drained it, so an output flood costs
//! bounded memory.
//!
//! With rooms (`Hello.rooms`, jails), every job process runs in the current
//! room (see `room`), warm interpreters come from a zygote where the runtime
//! has one (see `zygote`), and `Reset` replaces the room between leases.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use kiln_protocol::limits::{MAX_CHUNK_BYTES, MAX_FRAME_BYTES};
use kiln_protocol::{
    Decoder, ExecError, ExecId, ExecRequest, ExitReport, ExitStatus, Frame, FrameError, GetFile,
    GuestSetup, Hello, HelloAck, Kill, PutFile, Runtime, RuntimeTable, Started, PROTOCOL_VERSION,
};

use crate::files::Workdir;
use crate::room::{Room, RoomPlan, RoomSupply};
use crate::spawn::{spawn, JobFilters, JobIdentity, Place, Spawned};
use crate::zygote::Zygote;
use crate::{log_debug, log_error, log_info, log_warn, sys};

/// Outgoing bytes past which job pipes are no longer read.
const BACKPRESSURE_BYTES: usize = 4 * 1024 * 1024;
/// Outgoing bytes past which host requests are no longer read either (a host
/// that sends requests without reading answers must not grow the agent).
const STOP_READING_HOST_BYTES: usize = 16 * 1024 * 1024;
/// Most stdin bytes buffered for one exec.
const MAX_STDIN_BUFFER: usize = 16 * 1024 * 1024;
/// How long output is still collected after an exec's main process ended.
const DRAIN_GRACE: Duration = Duration::from_millis(100);
/// How long the agent tries to deliver its last frames to a peer it is
/// closing on.
const FINAL_FLUSH: Duration = Duration::from_secs(1);
/// How long a reset waits for the old room's processes to be gone.
const RESET_REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an exec's `Started` is held back, so that it travels with the
/// exec's first output (or its `Exit`) instead of waking the host on its
/// own: on the benchmark machine every wake-up of the daemon costs it tens
/// of microseconds. Output itself is never held: holding it too saved a
/// little more CPU but cost the c=1 median ~0.35 ms, because the host then
/// handles all of a job's frames after the job instead of while it runs
/// (interleaved A/B in docs/BENCHMARKS.md).
const COALESCE: Duration = Duration::from_millis(2);
/// Held-back bytes past which the hold ends at once.
const COALESCE_BYTES: usize = 64 * 1024;

/// Environment every job starts from; the request's env goes on top.
fn default_env(workdir: &str) -> BTreeMap<String, String> {
    [
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("HOME", workdir),
        ("LANG", "C.UTF-8"),
        ("TMPDIR", "/tmp"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Bytes waiting to be written to a non-blocking pipe.
#[derive(Debug, Default)]
struct PipeWriter {
    fd: Option<OwnedFd>,
    buf: Vec<u8>,
    /// Close once `buf` is flushed.
    close_when_flushed: bool,
}

impl PipeWriter {
    fn new(fd: OwnedFd) -> Self {
        Self {
            fd: Some(fd),
            ..Self::default()
        }
    }

    /// Writes what the pipe takes now. A reader that went away (EPIPE) is
    /// not an error: the data is dropped and the pipe closed.
    fn flush(&mut self) -> io::Result<()> {
        let Some(fd) = &self.fd else {
            self.buf.clear();
            return Ok(());
        };
        while !self.buf.is_empty() {
            match sys::write(fd.as_raw_fd(), &self.buf) {
                Ok(n) => {
                    self.buf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => {
                    self.close();
                    return Err(e);
                }
            }
        }
        if self.close_when_flushed {
            self.fd = None;
        }
        Ok(())
    }

    fn close(&mut self) {
        self.fd = None;
        self.buf = Vec::new();
    }

    fn wants_poll(&self) -> Option<RawFd> {
        match &self.fd {
            Some(fd) if !self.buf.is_empty() => Some(fd.as_raw_fd()),
            _ => None,
        }
    }
}

/// One of an exec's output streams.
#[derive(Debug)]
struct OutputStream {
    fd: Option<OwnedFd>,
    /// Bytes the job wrote (forwarded or not).
    bytes: u64,
    truncated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn index(self) -> usize {
        self as usize
    }
}

/// How the main process of an exec ended.
#[derive(Debug)]
struct Ended {
    status: ExitStatus,
    rusage: libc::rusage,
    wall: Duration,
    drain_until: Instant,
}

/// A running exec.
#[derive(Debug)]
struct Exec {
    pid: i32,
    runtime: String,
    warm_next: bool,
    output_limit: u64,
    started: Instant,
    output: [OutputStream; 2],
    stdin: PipeWriter,
    /// The warm-start request still being written to a warm interpreter.
    control: PipeWriter,
    reason: Option<&'static str>,
    ended: Option<Ended>,
}

impl Exec {
    fn new(p: Spawned, req: &ExecRequest, runtime: &str) -> Self {
        Self {
            pid: p.pid,
            runtime: runtime.to_owned(),
            warm_next: req.warm_next,
            output_limit: req.output_limit,
            started: Instant::now(),
            output: [
                OutputStream {
                    fd: Some(p.stdout),
                    bytes: 0,
                    truncated: false,
                },
                OutputStream {
                    fd: Some(p.stderr),
                    bytes: 0,
                    truncated: false,
                },
            ],
            stdin: PipeWriter::new(p.stdin),
            control: p.control.map(PipeWriter::new).unwrap_or_default(),
            reason: None,
            ended: None,
        }
    }

    /// Signals the exec's process group. Once the main process has been
    /// reaped its group was already killed, and its id may be reused: it
    /// is left alone.
    fn kill(&mut self, sig: libc::c_int, reason: &'static str) {
        if self.ended.is_none() {
            sys::kill_group(self.pid, sig);
            self.reason.get_or_insert(reason);
        }
    }

    /// Whether the Exit report can be sent now.
    fn finished(&self, now: Instant, backpressured: bool) -> bool {
        let Some(ended) = &self.ended else {
            return false;
        };
        let drained = self.output.iter().all(|o| o.fd.is_none());
        drained || (now >= ended.drain_until && !backpressured)
    }

    fn report(&self, tag: ExecId) -> ExitReport {
        let ended = self.ended.as_ref().expect("finished execs have ended");
        let us = |tv: libc::timeval| tv.tv_sec.max(0) as u64 * 1_000_000 + tv.tv_usec.max(0) as u64;
        ExitReport {
            tag,
            status: ended.status,
            reason: self.reason.map(str::to_owned),
            stdout_bytes: self.output[0].bytes,
            stderr_bytes: self.output[1].bytes,
            stdout_truncated: self.output[0].truncated,
            stderr_truncated: self.output[1].truncated,
            cpu_user_us: us(ended.rusage.ru_utime),
            cpu_system_us: us(ended.rusage.ru_stime),
            max_rss_kb: ended.rusage.ru_maxrss.max(0) as u64,
            wall_us: ended.wall.as_micros() as u64,
        }
    }
}

/// A pre-started interpreter waiting for its job on fd 3.
#[derive(Debug)]
struct Warm {
    runtime: String,
    command: Vec<String>,
    uid: u32,
    gid: u32,
    cwd: String,
    process: Spawned,
}

/// What `Hello` established.
#[derive(Debug)]
struct Setup {
    runtimes: RuntimeTable,
    workdir: Workdir,
    /// Runtimes the host wants kept warm, by canonical name.
    wanted: Vec<String>,
    rooms: Option<Rooms>,
}

/// Room mode: where rooms come from, and the current one.
#[derive(Debug)]
struct Rooms {
    supply: RoomSupply,
    filters: JobFilters,
    own_pid_ns: OwnedFd,
    /// `None` once its holder died; only a reset brings a room back.
    room: Option<Room>,
    /// Make the next room ahead (`Rooms.spare` of the hello).
    spare: bool,
}

impl Setup {
    fn identity(&self) -> JobIdentity {
        JobIdentity {
            uid: self.workdir.uid(),
            gid: self.workdir.gid(),
            cwd: self.workdir.path().to_owned(),
        }
    }

    /// Where job processes start: the current room, or here without rooms.
    fn place(&self) -> Result<Place<'_>, String> {
        match &self.rooms {
            None => Ok(Place::Here),
            Some(Rooms {
                room: Some(room),
                own_pid_ns,
                filters,
                ..
            }) => Ok(Place::Room {
                room,
                own_pid_ns,
                filters,
            }),
            Some(_) => Err("the sandbox's room is gone (its holder died); reset it".into()),
        }
    }
}

/// A room's work directory, as the agent reads and writes it.
fn room_workdir(room: &Room, path: &str, uid: u32, gid: u32) -> Result<Workdir, String> {
    let root = kiln_sys::fd::dup(room.work()).map_err(|e| format!("workdir: {e}"))?;
    Workdir::in_room(root, path, uid, gid).map_err(|e| format!("workdir: {e}"))
}

/// The host connection: its socket, incoming decoder and outgoing buffer.
struct Connection {
    fd: OwnedFd,
    decoder: Decoder,
    out: Vec<u8>,
    /// Bytes of `out` already written.
    sent: usize,
    hello_done: bool,
    /// Whether this connection's [`Frame::Setup`] was applied (microVM
    /// guests run nothing before).
    setup_done: bool,
    /// Until when buffered frames wait (see [`COALESCE`]).
    hold_until: Option<Instant>,
}

impl Connection {
    fn pending(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Queues a frame; an exec's `Started` begins a hold (see
    /// [`COALESCE`]), and any other frame ends it.
    fn send(&mut self, frame: &Frame) {
        log_debug!("-> {}", frame.name());
        frame.encode_into(&mut self.out);
        match frame {
            Frame::Started(_) => {
                self.hold_until
                    .get_or_insert_with(|| Instant::now() + COALESCE);
            }
            _ => self.hold_until = None,
        }
        if self.pending() > COALESCE_BYTES {
            self.hold_until = None;
        }
    }

    /// Whether frames are being held back now; clears an expired hold.
    fn holding(&mut self, now: Instant) -> bool {
        match self.hold_until {
            Some(t) if now < t => true,
            Some(_) => {
                self.hold_until = None;
                false
            }
            None => false,
        }
    }

    fn error(&mut self, tag: Option<u32>, message: impl Into<String>) {
        let message = message.into();
        log_info!("error for request {tag:?}: {message}");
        self.send(&Frame::Error(ExecError { tag, message }));
    }

    /// Writes what the socket takes now, unless frames are held back.
    fn flush(&mut self) -> io::Result<()> {
        if self.holding(Instant::now()) {
            return Ok(());
        }
        self.write_out()
    }

    fn write_out(&mut self) -> io::Result<()> {
        while self.sent < self.out.len() {
            match sys::write(self.fd.as_raw_fd(), &self.out[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        } else if self.sent > self.out.len() / 2 {
            self.out.drain(..self.sent);
            self.sent = 0;
        }
        Ok(())
    }

    /// Best effort: delivers what is buffered within [`FINAL_FLUSH`].
    fn flush_before_close(&mut self) {
        let deadline = Instant::now() + FINAL_FLUSH;
        self.hold_until = None;
        while self.pending() > 0 {
            if self.flush().is_err() {
                return;
            }
            let now = Instant::now();
            if self.pending() == 0 || now >= deadline {
                return;
            }
            let mut p = [libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            }];
            if sys::poll(&mut p, Some(deadline - now)).is_err() {
                return;
            }
        }
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum Closed {
    /// The host closed it (or the socket failed).
    Peer,
    /// The agent closed it after a protocol violation.
    Violation,
}

/// Where a poll entry came from.
#[derive(Debug, Clone, Copy)]
enum Source {
    Socket,
    Signals,
    Output(ExecId, Stream),
    Stdin(ExecId),
    Control(ExecId),
    /// A zygote's socket, by the zygote's pid.
    Zygote(i32),
}

/// The agent's state across connections.
pub struct Agent {
    signals: OwnedFd,
    is_init: bool,
    /// PID 1 of a microVM guest: jobs wait for the host's guest setup.
    guest: bool,
    /// The sandbox's id from the last guest setup, for jobs'
    /// `KILN_SANDBOX_ID`.
    sandbox_id: Option<String>,
    /// Tags of `AwaitWarm` requests to answer once everything is warm.
    warm_waiters: Vec<u32>,
    setup: Option<Setup>,
    warm: Vec<Warm>,
    zygotes: Vec<Zygote>,
    execs: BTreeMap<ExecId, Exec>,
    scratch: Vec<u8>,
}

impl Agent {
    pub fn new(signals: OwnedFd, is_init: bool) -> Self {
        Self {
            signals,
            is_init,
            guest: false,
            sandbox_id: None,
            warm_waiters: Vec::new(),
            setup: None,
            warm: Vec::new(),
            zygotes: Vec::new(),
            execs: BTreeMap::new(),
            scratch: vec![0; MAX_CHUNK_BYTES],
        }
    }

    /// Makes this the agent of a microVM guest: every connection must bring
    /// a [`Frame::Setup`] before jobs run.
    pub fn serve_guest(&mut self) {
        self.guest = true;
    }

    /// Serves one host connection until it ends; every exec still running
    /// is killed before this returns (warm interpreters survive, for the
    /// next connection).
    pub fn serve(&mut self, fd: OwnedFd) -> io::Result<()> {
        sys::set_nonblocking(fd.as_fd())?;
        let mut conn = Connection {
            fd,
            decoder: Decoder::new(MAX_FRAME_BYTES),
            out: Vec::new(),
            sent: 0,
            hello_done: false,
            setup_done: false,
            hold_until: None,
        };
        let closed = self.run(&mut conn);
        self.warm_waiters.clear();
        log_info!("connection ended: {closed:?}");
        if matches!(closed, Closed::Violation) {
            conn.flush_before_close();
        }
        for (_, exec) in std::mem::take(&mut self.execs) {
            if exec.ended.is_none() {
                sys::kill_group(exec.pid, libc::SIGKILL);
            }
        }
        self.reap();
        Ok(())
    }

    /// Kills every process the agent started (and, as init, every process
    /// in the namespace), and reaps them for up to a second.
    pub fn shutdown(&mut self) {
        for (_, exec) in std::mem::take(&mut self.execs) {
            if exec.ended.is_none() {
                sys::kill_group(exec.pid, libc::SIGKILL);
            }
        }
        self.drop_rooms();
        if self.is_init {
            sys::kill_everything();
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            while sys::reap_one().is_some() {}
            // ECHILD: nothing left to wait for.
            // SAFETY: siginfo_t is plain data, valid when zeroed.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid with WNOHANG|WNOWAIT only queries, into `info`.
            let r = unsafe {
                libc::waitid(
                    libc::P_ALL,
                    0,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            if r == -1 || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Serves the accept loop's idle time: reaps children while waiting for
    /// `listener` to become readable.
    pub fn wait_readable(&mut self, listener: RawFd) -> io::Result<()> {
        loop {
            let mut p = [
                libc::pollfd {
                    fd: listener,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.signals.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            sys::poll(&mut p, None)?;
            if p[1].revents != 0 {
                sys::read_signals(self.signals.as_fd());
                self.reap();
            }
            if p[0].revents != 0 {
                return Ok(());
            }
        }
    }

    fn run(&mut self, conn: &mut Connection) -> Closed {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut sources: Vec<Source> = Vec::new();
        loop {
            let now = Instant::now();
            let backpressured = conn.pending() > BACKPRESSURE_BYTES;
            self.finish_execs(conn, now, backpressured);
            self.answer_warm_waiters(conn);
            if let Err(e) = conn.flush() {
                log_info!("writing to the host failed: {e}");
                return Closed::Peer;
            }
            // Once the answers are out: a zygote's successor starts while
            // its last fork waits for a job.
            self.refresh_zygotes();
            let backpressured = conn.pending() > BACKPRESSURE_BYTES;

            fds.clear();
            sources.clear();
            let mut add = |fd: RawFd, events: libc::c_short, src: Source| {
                fds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
                sources.push(src);
            };
            let mut sock_events = 0;
            if conn.pending() <= STOP_READING_HOST_BYTES {
                sock_events |= libc::POLLIN;
            }
            // This clears an expired hold: below, `hold_until` is `Some`
            // only while holding.
            let holding = conn.holding(now);
            if conn.pending() > 0 && !holding {
                sock_events |= libc::POLLOUT;
            }
            add(conn.fd.as_raw_fd(), sock_events, Source::Socket);
            add(self.signals.as_raw_fd(), libc::POLLIN, Source::Signals);
            for z in &self.zygotes {
                add(z.fd().as_raw_fd(), libc::POLLIN, Source::Zygote(z.pid()));
            }
            let mut timeout: Option<Duration> =
                conn.hold_until.map(|t| t.saturating_duration_since(now));
            for (&tag, exec) in &self.execs {
                if !backpressured {
                    for (s, o) in [Stream::Stdout, Stream::Stderr].iter().zip(&exec.output) {
                        if let Some(fd) = &o.fd {
                            add(fd.as_raw_fd(), libc::POLLIN, Source::Output(tag, *s));
                        }
                    }
                }
                if let Some(fd) = exec.stdin.wants_poll() {
                    add(fd, libc::POLLOUT, Source::Stdin(tag));
                }
                if let Some(fd) = exec.control.wants_poll() {
                    add(fd, libc::POLLOUT, Source::Control(tag));
                }
                if let Some(e) = &exec.ended {
                    let left = e.drain_until.saturating_duration_since(now);
                    timeout = Some(timeout.map_or(left, |t: Duration| t.min(left)));
                }
            }
            if let Err(e) = sys::poll(&mut fds, timeout) {
                log_warn!("poll failed: {e}");
                return Closed::Peer;
            }
            for i in 0..fds.len() {
                let revents = fds[i].revents;
                if revents == 0 {
                    continue;
                }
                match sources[i] {
                    Source::Signals => self.on_signals(),
                    Source::Socket => {
                        if revents & libc::POLLOUT != 0 {
                            if let Err(e) = conn.flush() {
                                log_info!("writing to the host failed: {e}");
                                return Closed::Peer;
                            }
                        }
                        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                            if let Some(closed) = self.on_socket_readable(conn) {
                                return closed;
                            }
                        }
                    }
                    Source::Output(tag, stream) => self.on_output(conn, tag, stream),
                    Source::Stdin(tag) => {
                        if let Some(exec) = self.execs.get_mut(&tag) {
                            let _ = exec.stdin.flush();
                        }
                    }
                    Source::Control(tag) => {
                        if let Some(exec) = self.execs.get_mut(&tag) {
                            let _ = exec.control.flush();
                        }
                    }
                    Source::Zygote(pid) => self.on_zygote_readable(pid),
                }
            }
        }
    }

    /// Sends the Exit of every exec that is over, and starts the warm
    /// interpreters they asked for.
    fn finish_execs(&mut self, conn: &mut Connection, now: Instant, backpressured: bool) {
        let done: Vec<ExecId> = self
            .execs
            .iter()
            .filter(|(_, e)| e.finished(now, backpressured))
            .map(|(&t, _)| t)
            .collect();
        for tag in done {
            let exec = self.execs.remove(&tag).expect("listed above");
            let report = exec.report(tag);
            log_info!("exec {tag} ended: {:?}", report.status);
            conn.send(&Frame::Exit(report));
            if exec.warm_next {
                // The host is waiting for this Exit: put it on the wire
                // before paying for the next interpreter's fork and exec.
                // A write error shows again at the main loop's flush.
                let _ = conn.flush();
                self.start_warm(&exec.runtime);
            }
        }
    }

    fn on_signals(&mut self) {
        for sig in sys::read_signals(self.signals.as_fd()) {
            if sig == libc::SIGCHLD {
                continue;
            }
            log_info!("forwarding signal {sig} to {} exec(s)", self.execs.len());
            for exec in self.execs.values().filter(|e| e.ended.is_none()) {
                sys::kill_group(exec.pid, sig);
            }
        }
        // SIGCHLD may have been coalesced with any other: always reap.
        self.reap();
    }

    /// Reaps every terminated child, handing the status and resource usage
    /// of exec processes to their exec; other children (orphans re-parented
    /// to the agent, dead warm interpreters) are just reaped.
    fn reap(&mut self) {
        while let Some(r) = sys::reap_one() {
            if let Some((_, exec)) = self
                .execs
                .iter_mut()
                .find(|(_, e)| e.pid == r.pid && e.ended.is_none())
            {
                // Whatever the main process left behind in its group dies
                // with it.
                sys::kill_group(exec.pid, libc::SIGKILL);
                let status = if libc::WIFSIGNALED(r.status) {
                    ExitStatus::Signal(libc::WTERMSIG(r.status))
                } else {
                    ExitStatus::Code(libc::WEXITSTATUS(r.status))
                };
                let now = Instant::now();
                exec.ended = Some(Ended {
                    status,
                    rusage: r.rusage,
                    wall: now - exec.started,
                    drain_until: now + DRAIN_GRACE,
                });
                exec.stdin.close();
                exec.control.close();
            } else if let Some(i) = self.warm.iter().position(|w| w.process.pid == r.pid) {
                let w = self.warm.swap_remove(i);
                log_warn!(
                    "warm {} interpreter {} died before use (status {:#x})",
                    w.runtime,
                    r.pid,
                    r.status
                );
                sys::kill_group(w.process.pid, libc::SIGKILL);
            } else if self.forget_zygote(r.pid, r.status) {
                // Logged and forgotten there.
            } else if self.spare_room_holder_reaped(r.pid) {
                log_warn!(
                    "the spare room's holder {} died (status {:#x})",
                    r.pid,
                    r.status
                );
            } else if let Some(rooms) =
                self.setup
                    .as_mut()
                    .and_then(|s| s.rooms.as_mut())
                    .filter(|rooms| {
                        rooms
                            .room
                            .as_ref()
                            .is_some_and(|room| room.holder() == r.pid)
                    })
            {
                log_error!(
                    "the room's holder {} died (status {:#x}); its jobs are gone",
                    r.pid,
                    r.status
                );
                if let Some(mut room) = rooms.room.take() {
                    room.holder_reaped();
                }
            } else {
                log_debug!("reaped orphan {}", r.pid);
            }
        }
    }

    /// Reads what the host sent and handles every complete frame. Returns
    /// why the connection must end, if it must.
    fn on_socket_readable(&mut self, conn: &mut Connection) -> Option<Closed> {
        match sys::read(conn.fd.as_raw_fd(), &mut self.scratch) {
            Ok(0) => {
                if let FrameError::Truncated { got, want } = conn.decoder.finish() {
                    log_warn!("host closed the connection inside a frame ({got} of {want} bytes)");
                }
                return Some(Closed::Peer);
            }
            Ok(n) => conn.decoder.extend(&self.scratch[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => {
                log_info!("reading from the host failed: {e}");
                return Some(Closed::Peer);
            }
        }
        loop {
            match conn.decoder.next_frame() {
                Ok(Some(frame)) => {
                    if let Some(closed) = self.on_frame(conn, frame) {
                        return Some(closed);
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    log_warn!("malformed frame from the host: {e}");
                    conn.error(None, format!("malformed frame, closing: {e}"));
                    return Some(Closed::Violation);
                }
            }
        }
    }

    fn on_frame(&mut self, conn: &mut Connection, frame: Frame) -> Option<Closed> {
        log_debug!("<- {}", frame.name());
        // Requests that act on the sandbox need this connection's Hello.
        let request_tag = match &frame {
            Frame::Exec(r) => Some(r.tag),
            Frame::Stdin { tag, .. } => Some(*tag),
            Frame::Kill(k) => Some(k.tag),
            Frame::PutFile(p) => Some(p.tag),
            Frame::GetFile(g) => Some(g.tag),
            Frame::Reset { tag } => Some(*tag),
            Frame::Setup(s) => Some(s.tag),
            Frame::AwaitWarm { tag } => Some(*tag),
            _ => None,
        };
        if let Some(tag) = request_tag.filter(|_| !conn.hello_done) {
            conn.error(Some(tag), format!("{} before hello", frame.name()));
            return None;
        }
        match frame {
            Frame::Hello(h) => return self.on_hello(conn, h),
            Frame::Ping(n) => conn.send(&Frame::Pong(n)),
            Frame::Exec(req) => {
                let tag = req.tag;
                if let Err(message) = self.on_exec(conn, req) {
                    conn.error(Some(tag), message);
                }
            }
            Frame::Stdin { tag, data } => {
                if let Err(message) = self.on_stdin(tag, data) {
                    conn.error(Some(tag), message);
                }
            }
            Frame::Kill(Kill { tag, signal }) => match self.execs.get_mut(&tag) {
                Some(_) if !(0..=64).contains(&signal) => {
                    conn.error(Some(tag), format!("signal {signal} is not a signal number"))
                }
                // Signal 0 only probes; it ends nothing.
                Some(exec) if signal == 0 => sys::kill_group(exec.pid, 0),
                Some(exec) => exec.kill(signal, "killed"),
                None => conn.error(Some(tag), format!("no running exec has tag {tag}")),
            },
            Frame::PutFile(p) => self.on_put_file(conn, p),
            Frame::GetFile(g) => self.on_get_file(conn, g),
            Frame::Reset { tag } => self.on_reset(conn, tag),
            Frame::Setup(s) => self.on_guest_setup(conn, s),
            Frame::AwaitWarm { tag } => self.warm_waiters.push(tag),
            other => {
                let name = other.name();
                conn.error(
                    None,
                    format!("{name} frames are sent by the agent, not to it"),
                );
            }
        }
        None
    }

    fn on_hello(&mut self, conn: &mut Connection, hello: Hello) -> Option<Closed> {
        if hello.version != PROTOCOL_VERSION {
            conn.error(
                None,
                format!(
                    "protocol version {} is not supported; this agent speaks version {PROTOCOL_VERSION}",
                    hello.version
                ),
            );
            return Some(Closed::Violation);
        }
        if conn.hello_done {
            conn.error(None, "hello was already received on this connection");
            return None;
        }
        for name in &hello.warm {
            if hello.runtimes.resolve(name).is_err() {
                conn.error(
                    None,
                    format!(
                        "warm runtime {name:?} is not in the runtime table; available: {}",
                        hello.runtimes.names().join(", ")
                    ),
                );
                return None;
            }
        }
        let wanted: Vec<String> = hello
            .warm
            .iter()
            .filter_map(|n| hello.runtimes.resolve(n).ok().map(|r| r.name.clone()))
            .collect();
        let setup = match hello.rooms {
            None => Workdir::open(&hello.workdir, hello.uid, hello.gid)
                .map_err(|e| format!("workdir: {e}"))
                .map(|workdir| Setup {
                    runtimes: hello.runtimes,
                    workdir,
                    wanted,
                    rooms: None,
                }),
            Some(spec) => {
                // A fresh start: nothing of an earlier connection's rooms
                // may serve this one.
                self.drop_rooms();
                Self::room_setup(&hello.workdir, hello.uid, hello.gid, &spec).map(
                    |(workdir, rooms)| Setup {
                        runtimes: hello.runtimes,
                        workdir,
                        wanted,
                        rooms: Some(rooms),
                    },
                )
            }
        };
        let setup = match setup {
            Ok(s) => s,
            Err(e) => {
                conn.error(None, e);
                return None;
            }
        };
        let room_mode = setup.rooms.is_some();
        self.setup = Some(setup);
        if room_mode {
            self.start_zygotes();
        } else {
            // Keep interpreters from a previous connection (a restored
            // snapshot) that still fit; stop the others.
            let stale: Vec<Warm> = {
                let wanted = self.wanted();
                let (keep, stale) = std::mem::take(&mut self.warm)
                    .into_iter()
                    .partition(|w| wanted.contains(&w.runtime) && self.warm_fits(w));
                self.warm = keep;
                stale
            };
            for w in stale {
                sys::kill_group(w.process.pid, libc::SIGKILL);
            }
        }
        for name in self.wanted() {
            self.start_warm(&name);
        }
        self.prepare_spare_room();
        conn.hello_done = true;
        conn.send(&Frame::HelloAck(HelloAck {
            version: PROTOCOL_VERSION,
            agent: env!("CARGO_PKG_VERSION").to_owned(),
            pid: sys::getpid(),
        }));
        None
    }

    /// The first room and everything room mode needs.
    fn room_setup(
        workdir: &str,
        uid: u32,
        gid: u32,
        spec: &kiln_protocol::Rooms,
    ) -> Result<(Workdir, Rooms), String> {
        let plan = RoomPlan::new(workdir, uid, gid, spec.disk_mb, spec.loopback)
            .map_err(|e| e.to_string())?;
        let own_pid_ns = sys::own_pid_namespace()
            .map_err(|e| format!("opening the agent's own pid namespace: {e}"))?;
        let mut supply = RoomSupply::new(plan);
        let room = supply.take().map_err(|e| e.to_string())?;
        log_info!("room ready: holder {}", room.holder());
        let workdir = room_workdir(&room, workdir, uid, gid)?;
        Ok((
            workdir,
            Rooms {
                supply,
                filters: JobFilters::decode(&spec.job_filters)
                    .map_err(|e| format!("the job's seccomp filters: {e}"))?,
                own_pid_ns,
                room: Some(room),
                spare: spec.spare,
            },
        ))
    }

    /// Kills the warm interpreters, the zygotes and the room (reaped by
    /// whoever reaps next: the loop, or shutdown).
    fn drop_rooms(&mut self) {
        for w in std::mem::take(&mut self.warm) {
            sys::kill_group(w.process.pid, libc::SIGKILL);
        }
        for z in std::mem::take(&mut self.zygotes) {
            z.kill();
        }
        if let Some(rooms) = self.setup.as_mut().and_then(|s| s.rooms.as_mut()) {
            if let Some(room) = rooms.room.take() {
                room.kill();
            }
            rooms.supply.discard_spare();
        }
    }

    fn wanted(&self) -> Vec<String> {
        self.setup
            .as_ref()
            .map(|s| s.wanted.clone())
            .unwrap_or_default()
    }

    /// Starts a zygote for every wanted runtime that has one and none
    /// running (room mode only).
    fn start_zygotes(&mut self) {
        let Some(setup) = &self.setup else { return };
        if setup.rooms.is_none() {
            return;
        }
        let who = setup.identity();
        for name in &setup.wanted {
            let Ok(rt) = setup.runtimes.resolve(name) else {
                continue;
            };
            let Some(warm) = rt.warm.as_ref().filter(|w| w.zygote) else {
                continue;
            };
            if self.zygotes.iter().any(|z| z.runtime() == rt.name) {
                continue;
            }
            let filters = &setup.rooms.as_ref().expect("room mode").filters;
            let env = default_env("/");
            let max_uses = warm.zygote_max_uses();
            match Zygote::start(&rt.name, &warm.command, max_uses, &env, &who, filters) {
                Ok(z) => self.zygotes.push(z),
                Err(e) => log_warn!("cannot start a {} zygote: {e}", rt.name),
            }
        }
    }

    /// Replaces every zygote that has made its runtime's `zygote_max_uses`
    /// forks with a freshly started one (see `zygote`).
    fn refresh_zygotes(&mut self) {
        let mut refreshed = false;
        while let Some(i) = self.zygotes.iter().position(Zygote::used_up) {
            let z = self.zygotes.swap_remove(i);
            log_info!(
                "{} zygote {} made its last fork; starting a fresh one",
                z.runtime(),
                z.pid()
            );
            z.kill();
            refreshed = true;
        }
        if refreshed {
            self.start_zygotes();
        }
    }

    /// Handles what a zygote sent unasked: once it is ready, the warm
    /// interpreters that waited for it are forked.
    fn on_zygote_readable(&mut self, pid: i32) {
        let Some(i) = self.zygotes.iter().position(|z| z.pid() == pid) else {
            return;
        };
        let was_ready = self.zygotes[i].is_ready();
        match self.zygotes[i].on_readable() {
            Ok(true) if !was_ready => {
                let runtime = self.zygotes[i].runtime().to_owned();
                self.start_warm(&runtime);
            }
            Ok(_) => {}
            Err(e) => {
                let z = self.zygotes.swap_remove(i);
                log_warn!("{} zygote {pid} is unusable ({e}); killing it", z.runtime());
                z.kill();
            }
        }
    }

    fn runtime(&self, name: &str) -> Option<&Runtime> {
        self.setup.as_ref()?.runtimes.resolve(name).ok()
    }

    /// Whether a live warm interpreter matches the current setup.
    fn warm_fits(&self, w: &Warm) -> bool {
        let (Some(setup), Some(rt)) = (&self.setup, self.runtime(&w.runtime)) else {
            return false;
        };
        rt.warm.as_ref().map(|x| &x.command) == Some(&w.command)
            && setup.workdir.uid() == w.uid
            && setup.workdir.gid() == w.gid
            && setup.workdir.path() == w.cwd
    }

    /// Starts a warm interpreter for `runtime` unless it has no warm start
    /// or one is already waiting. In room mode it goes into the current
    /// room, forked by the runtime's zygote if it has one (and nothing
    /// happens until that zygote is ready).
    fn start_warm(&mut self, runtime: &str) {
        let Some(setup) = &self.setup else { return };
        let Ok(rt) = setup.runtimes.resolve(runtime) else {
            return;
        };
        let Some(warm) = &rt.warm else { return };
        if self.warm.iter().any(|w| w.runtime == rt.name) {
            return;
        }
        let who = setup.identity();
        let place = match setup.place() {
            Ok(p) => p,
            Err(e) => return log_warn!("cannot start a warm {} interpreter: {e}", rt.name),
        };
        let forked = match place {
            Place::Room { room, .. } if warm.zygote => {
                let Some(z) = self.zygotes.iter_mut().find(|z| z.runtime() == rt.name) else {
                    return log_warn!("no {} zygote; the next exec starts cold", rt.name);
                };
                if !z.is_ready() || z.used_up() {
                    return;
                }
                match z.fork_into(room) {
                    Ok(p) => Ok(p),
                    Err(e) => {
                        log_warn!(
                            "the {} zygote {} failed ({e}); killing it",
                            rt.name,
                            z.pid()
                        );
                        z.kill();
                        return;
                    }
                }
            }
            place => spawn(&warm.command, &default_env(&who.cwd), &who, true, place)
                .map_err(|e| e.to_string()),
        };
        match forked {
            Ok(process) => {
                log_info!("warm {} interpreter started: pid {}", rt.name, process.pid);
                self.warm.push(Warm {
                    runtime: rt.name.clone(),
                    command: warm.command.clone(),
                    uid: who.uid,
                    gid: who.gid,
                    cwd: who.cwd,
                    process,
                });
            }
            Err(e) => log_warn!("cannot start a warm {} interpreter: {e}", rt.name),
        }
    }

    /// Acks every `AwaitWarm` once each wanted runtime that has a warm
    /// start has an interpreter waiting.
    fn answer_warm_waiters(&mut self, conn: &mut Connection) {
        if self.warm_waiters.is_empty() {
            return;
        }
        let all_warm = self.wanted().iter().all(|name| match self.runtime(name) {
            Some(rt) if rt.warm.is_some() => self.warm.iter().any(|w| w.runtime == rt.name),
            _ => true,
        });
        if all_warm {
            for tag in std::mem::take(&mut self.warm_waiters) {
                conn.send(&Frame::Ack { tag });
            }
        }
    }

    /// Applies what is unique to this sandbox in a microVM guest (see
    /// `GuestSetup`), then replaces the warm interpreters that were started
    /// before it and do not reseed themselves with their job
    /// (`WarmStart::reseeds`): started before the entropy arrived (in a
    /// restored snapshot, before the snapshot was taken), they would share
    /// the random state of every clone of this guest.
    fn on_guest_setup(&mut self, conn: &mut Connection, s: GuestSetup) {
        if !self.guest {
            return conn.error(
                Some(s.tag),
                "setup is for microVM guests; this agent serves a jail",
            );
        }
        if let Err(e) = crate::guest::apply_setup(&s) {
            log_error!("guest setup failed: {e}");
            return conn.error(Some(s.tag), format!("guest setup failed: {e}"));
        }
        self.sandbox_id = Some(s.sandbox_id);
        let (keep, stale): (Vec<Warm>, Vec<Warm>) =
            std::mem::take(&mut self.warm).into_iter().partition(|w| {
                self.runtime(&w.runtime)
                    .and_then(|rt| rt.warm.as_ref())
                    .is_some_and(|ws| ws.reseeds)
            });
        self.warm = keep;
        for w in stale {
            sys::kill_group(w.process.pid, libc::SIGKILL);
        }
        for name in self.wanted() {
            self.start_warm(&name);
        }
        conn.setup_done = true;
        conn.send(&Frame::Ack { tag: s.tag });
    }

    /// Kills the current room with everything in it, waits until it is
    /// gone, and makes the next one (see `Frame::Reset`).
    fn on_reset(&mut self, conn: &mut Connection, tag: u32) {
        match self.reset() {
            Ok(()) => conn.send(&Frame::Ack { tag }),
            Err(e) => {
                log_error!("reset failed: {e}");
                conn.error(Some(tag), format!("reset failed: {e}"));
            }
        }
    }

    fn reset(&mut self) -> Result<(), String> {
        let Some(rooms) = self.setup.as_ref().and_then(|s| s.rooms.as_ref()) else {
            return Err("this sandbox has no rooms (Hello.rooms was not set)".into());
        };
        let holder = rooms.room.as_ref().map(Room::holder);
        // The execs and warm interpreters all live in the room's pid
        // namespace (reset needs room mode), so killing the holder kills
        // them too; they are the agent's children and must be reaped for
        // the holder to finish.
        if let Some(room) = &rooms.room {
            room.kill();
        }
        let mut doomed: Vec<i32> = self
            .execs
            .values()
            .filter(|e| e.ended.is_none())
            .map(|e| e.pid)
            .chain(self.warm.iter().map(|w| w.process.pid))
            .chain(holder)
            .collect();
        let deadline = Instant::now() + RESET_REAP_TIMEOUT;
        while !doomed.is_empty() {
            while let Some(r) = sys::reap_one() {
                doomed.retain(|&p| p != r.pid);
                if !self.forget_zygote(r.pid, r.status) {
                    self.spare_room_holder_reaped(r.pid);
                }
            }
            if doomed.is_empty() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // The sandbox is unusable after this error; what is left
                // of the old room's execs and interpreters is not reused.
                self.execs.clear();
                self.warm.clear();
                return Err(format!(
                    "processes {doomed:?} of the old room were still alive after {RESET_REAP_TIMEOUT:?}"
                ));
            }
            let _ = sys::wait_readable(self.signals.as_fd(), left);
            sys::read_signals(self.signals.as_fd());
        }
        self.execs.clear();
        self.warm.clear();
        let setup = self.setup.as_mut().expect("checked above");
        let rooms = setup.rooms.as_mut().expect("checked above");
        if let Some(mut old) = rooms.room.take() {
            old.holder_reaped();
        }
        let room = rooms.supply.take().map_err(|e| e.to_string())?;
        log_info!("room reset: holder {}", room.holder());
        // Stored before the work directory is built, so that a failure there
        // leaves the live room where it is killed and reaped like any other.
        let room = rooms.room.insert(room);
        let path = setup.workdir.path().to_owned();
        setup.workdir = room_workdir(room, &path, setup.workdir.uid(), setup.workdir.gid())?;
        self.start_zygotes();
        for name in self.wanted() {
            self.start_warm(&name);
        }
        self.prepare_spare_room();
        Ok(())
    }

    /// Starts making the next reset's room, in the background (unless
    /// the host asked for no spare: `Rooms.spare`).
    fn prepare_spare_room(&mut self) {
        if let Some(rooms) = self.setup.as_mut().and_then(|s| s.rooms.as_mut()) {
            if rooms.spare {
                rooms.supply.prepare_spare();
            }
        }
    }

    /// Whether `pid`, just reaped, was the spare room's holder.
    fn spare_room_holder_reaped(&mut self, pid: i32) -> bool {
        self.setup
            .as_mut()
            .and_then(|s| s.rooms.as_mut())
            .is_some_and(|rooms| rooms.supply.reaped(pid))
    }

    /// Forgets the zygote `pid` if it is one (it was reaped with `status`);
    /// returns whether it was.
    fn forget_zygote(&mut self, pid: i32, status: libc::c_int) -> bool {
        let Some(i) = self.zygotes.iter().position(|z| z.pid() == pid) else {
            return false;
        };
        let z = self.zygotes.swap_remove(i);
        log_warn!(
            "{} zygote {pid} died (status {status:#x}); the next reset starts another",
            z.runtime()
        );
        true
    }

    fn on_exec(&mut self, conn: &mut Connection, req: ExecRequest) -> Result<(), String> {
        let Some(setup) = &self.setup else {
            return Err("exec before hello".into());
        };
        if self.guest && !conn.setup_done {
            return Err(
                "exec before setup: a microVM guest runs nothing until the host's setup frame has been applied"
                    .into(),
            );
        }
        if self.execs.contains_key(&req.tag) {
            return Err(format!("an exec with tag {} is already running", req.tag));
        }
        let rt = setup
            .runtimes
            .resolve(&req.runtime)
            .map_err(|e| e.to_string())?
            .clone();
        let entry = setup
            .workdir
            .absolute(&req.entrypoint)
            .map_err(|e| format!("entrypoint: {e}"))?;
        let who = setup.identity();
        let mut env = default_env(&who.cwd);
        if let Some(id) = &self.sandbox_id {
            env.insert("KILN_SANDBOX_ID".into(), id.clone());
        }
        env.extend(req.env.iter().map(|(k, v)| (k.clone(), v.clone())));

        if let Some(i) = self.warm.iter().position(|w| w.runtime == rt.name) {
            let w = self.warm.swap_remove(i);
            let line = serde_json::json!({
                "file": entry,
                "args": req.args,
                "env": env,
                "cwd": who.cwd,
            });
            let mut exec = Exec::new(w.process, &req, &rt.name);
            exec.control.buf = serde_json::to_vec(&line).map_err(|e| e.to_string())?;
            exec.control.buf.push(b'\n');
            exec.control.close_when_flushed = true;
            match exec.control.flush() {
                Ok(()) => {
                    conn.send(&Frame::Started(Started {
                        tag: req.tag,
                        pid: exec.pid as u32,
                        warm: true,
                    }));
                    self.execs.insert(req.tag, exec);
                    return Ok(());
                }
                Err(e) => {
                    // The interpreter died before it could be reaped: the
                    // job goes cold instead.
                    log_warn!("warm {} interpreter unusable ({e}); starting cold", rt.name);
                    sys::kill_group(exec.pid, libc::SIGKILL);
                }
            }
        }
        let setup = self.setup.as_ref().expect("checked above");
        let argv = rt.cold_argv(&entry, &req.args);
        let process = spawn(&argv, &env, &who, false, setup.place()?)
            .map_err(|e| format!("cannot start {:?}: {e}", argv[0]))?;
        let exec = Exec::new(process, &req, &rt.name);
        conn.send(&Frame::Started(Started {
            tag: req.tag,
            pid: exec.pid as u32,
            warm: false,
        }));
        self.execs.insert(req.tag, exec);
        Ok(())
    }

    fn on_stdin(&mut self, tag: ExecId, data: Vec<u8>) -> Result<(), String> {
        let exec = self
            .execs
            .get_mut(&tag)
            .ok_or_else(|| format!("no running exec has tag {tag}"))?;
        let w = &mut exec.stdin;
        if w.fd.is_none() {
            // Closed by the host before, or the job is over or closed its
            // stdin: the data has nowhere to go.
            return Ok(());
        }
        if w.close_when_flushed {
            return Err(format!("stdin of exec {tag} was already closed"));
        }
        if data.is_empty() {
            w.close_when_flushed = true;
        } else if w.buf.len() + data.len() > MAX_STDIN_BUFFER {
            return Err(format!(
                "stdin of exec {tag} is not being read; more than {MAX_STDIN_BUFFER} bytes are waiting"
            ));
        } else {
            w.buf.extend_from_slice(&data);
        }
        // EPIPE: the job closed its stdin; the data is dropped.
        let _ = w.flush();
        Ok(())
    }

    fn on_output(&mut self, conn: &mut Connection, tag: ExecId, stream: Stream) {
        let Some(exec) = self.execs.get_mut(&tag) else {
            return;
        };
        let limit = exec.output_limit;
        let out = &mut exec.output[stream.index()];
        let Some(fd) = &out.fd else { return };
        let n = match sys::read(fd.as_raw_fd(), &mut self.scratch) {
            Ok(0) => {
                out.fd = None;
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                log_warn!("reading output of exec {tag} failed: {e}");
                out.fd = None;
                return;
            }
        };
        let before = out.bytes;
        out.bytes += n as u64;
        let forward = (limit.saturating_sub(before)).min(n as u64) as usize;
        if forward > 0 {
            let data = self.scratch[..forward].to_vec();
            conn.send(&match stream {
                Stream::Stdout => Frame::Stdout { tag, data },
                Stream::Stderr => Frame::Stderr { tag, data },
            });
        }
        if out.bytes > limit && !out.truncated {
            out.truncated = true;
            log_info!("exec {tag} exceeded its output limit of {limit} bytes");
            exec.kill(libc::SIGKILL, "output_limit");
        }
    }

    fn on_put_file(&mut self, conn: &mut Connection, p: PutFile) {
        let Some(setup) = &self.setup else {
            return conn.error(Some(p.tag), "put_file before hello");
        };
        match setup.workdir.put(&p.path, p.mode, &p.data) {
            Ok(()) => conn.send(&Frame::Ack { tag: p.tag }),
            Err(e) => conn.error(Some(p.tag), e.to_string()),
        }
    }

    fn on_get_file(&mut self, conn: &mut Connection, g: GetFile) {
        let Some(setup) = &self.setup else {
            return conn.error(Some(g.tag), "get_file before hello");
        };
        match setup.workdir.get(&g.path, g.max_bytes) {
            Ok(data) => conn.send(&Frame::FileData { tag: g.tag, data }),
            Err(e) => conn.error(Some(g.tag), e.to_string()),
        }
    }
}

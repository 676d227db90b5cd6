//! The host's side of the agent protocol, shared by every backend: one
//! connection per sandbox, a reader task that routes frames to whoever asked
//! by tag, and request methods for files, pings and execs. Channels to
//! callers are bounded, so a slow consumer slows the reader, which fills the
//! socket, which makes the agent stop reading the job's pipes: backpressure
//! all the way to the job, and bounded memory on the host.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_protocol::{
    limits::MAX_CHUNK_BYTES, Decoder, ExecRequest, Frame, GetFile, GuestSetup, Hello, HelloAck,
    Kill, PutFile,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Why a request to the agent failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// The connection is gone; the sandbox is unusable.
    #[error("agent connection lost: {0}")]
    Disconnected(String),
    /// The agent refused the request and said why.
    #[error("agent refused the request: {0}")]
    Refused(String),
    /// The agent answered with a frame that makes no sense here.
    #[error("agent protocol violation: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
}

struct Routes {
    map: HashMap<u32, mpsc::Sender<Frame>>,
    closed: Option<String>,
}

struct Inner {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    routes: Mutex<Routes>,
    next_tag: AtomicU32,
    /// Execs of inline code in flight (see [`AgentConn::claim_inline`]).
    inline_in_flight: AtomicU32,
    /// When bytes last came from the agent, in µs since `born`.
    heard_us: AtomicU64,
    born: Instant,
}

/// Tag reserved for the handshake, whose frames carry none.
const HELLO_TAG: u32 = 0;

impl Inner {
    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (single insert/remove operations), so poisoning is ignored.
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, tag: u32, depth: usize) -> Result<mpsc::Receiver<Frame>, AgentError> {
        let (tx, rx) = mpsc::channel(depth);
        let mut r = self.routes();
        if let Some(why) = &r.closed {
            return Err(AgentError::Disconnected(why.clone()));
        }
        r.map.insert(tag, tx);
        Ok(rx)
    }

    fn unregister(&self, tag: u32) {
        self.routes().map.remove(&tag);
    }

    fn tag(&self) -> u32 {
        loop {
            let t = self.next_tag.fetch_add(1, Ordering::Relaxed);
            if t != HELLO_TAG {
                return t;
            }
        }
    }

    async fn send(&self, frame: &Frame) -> Result<(), AgentError> {
        self.send_bytes(&frame.encode()).await
    }

    async fn send_bytes(&self, bytes: &[u8]) -> Result<(), AgentError> {
        let mut w = self.writer.lock().await;
        w.write_all(bytes)
            .await
            .map_err(|e| AgentError::Disconnected(format!("write failed: {e}")))
    }

    fn close(&self, why: String) {
        let mut r = self.routes();
        if r.closed.is_none() {
            r.closed = Some(why);
        }
        r.map.clear();
    }

    fn closed_reason(&self) -> String {
        self.routes()
            .closed
            .clone()
            .unwrap_or_else(|| "connection closed".into())
    }
}

/// A connection to one sandbox's agent.
pub struct AgentConn {
    inner: Arc<Inner>,
    reader: JoinHandle<()>,
}

impl Drop for AgentConn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl AgentConn {
    /// Wraps a connected stream and starts routing its frames.
    pub fn new(stream: UnixStream) -> Self {
        let (mut rd, wr) = stream.into_split();
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(wr),
            routes: Mutex::new(Routes {
                map: HashMap::new(),
                closed: None,
            }),
            next_tag: AtomicU32::new(1),
            inline_in_flight: AtomicU32::new(0),
            heard_us: AtomicU64::new(0),
            born: Instant::now(),
        });
        let weak = Arc::downgrade(&inner);
        let reader = tokio::spawn(async move {
            let mut dec = Decoder::default();
            let mut buf = vec![0u8; 64 * 1024];
            let why = 'outer: loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) => break dec.finish().to_string(),
                    Ok(n) => n,
                    Err(e) => break format!("read failed: {e}"),
                };
                // One upgrade per read, for the stamp (any bytes count as
                // heard) and the frames it completes; dropped before the
                // next read, so an idle reader keeps only the weak pointer.
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let us = inner.born.elapsed().as_micros() as u64;
                inner.heard_us.store(us, Ordering::Relaxed);
                dec.extend(&buf[..n]);
                loop {
                    let frame = match dec.next_frame() {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => break 'outer format!("bad frame from agent: {e}"),
                    };
                    if let Err(why) = route(&inner, frame).await {
                        break 'outer why;
                    }
                }
            };
            if let Some(inner) = weak.upgrade() {
                tracing::debug!(reason = %why, "agent connection closed");
                inner.close(why);
            }
        });
        Self { inner, reader }
    }

    /// Performs the version handshake.
    pub async fn hello(&self, hello: Hello, within: Duration) -> Result<HelloAck, AgentError> {
        let mut rx = self.inner.register(HELLO_TAG, 2)?;
        self.inner.send(&Frame::Hello(hello)).await?;
        let reply = tokio::time::timeout(within, rx.recv())
            .await
            .map_err(|_| AgentError::Timeout(within))?;
        self.inner.unregister(HELLO_TAG);
        match reply {
            Some(Frame::HelloAck(ack)) => Ok(ack),
            Some(Frame::Error(e)) => Err(AgentError::Refused(e.message)),
            Some(f) => Err(AgentError::Protocol(format!(
                "{} in answer to hello",
                f.name()
            ))),
            None => Err(AgentError::Disconnected(self.inner.closed_reason())),
        }
    }

    async fn request(&self, tag: u32, frame: Frame) -> Result<Frame, AgentError> {
        let mut rx = self.inner.register(tag, 2)?;
        let sent = self.inner.send(&frame).await;
        let reply = match sent {
            Ok(()) => rx.recv().await,
            Err(e) => {
                self.inner.unregister(tag);
                return Err(e);
            }
        };
        self.inner.unregister(tag);
        match reply {
            Some(Frame::Error(e)) => Err(AgentError::Refused(e.message)),
            Some(f) => Ok(f),
            None => Err(AgentError::Disconnected(self.inner.closed_reason())),
        }
    }

    /// Writes a file under the sandbox's work directory.
    pub async fn put_file(&self, path: &str, data: Vec<u8>, mode: u32) -> Result<(), AgentError> {
        let tag = self.inner.tag();
        let f = PutFile {
            tag,
            mode,
            path: path.to_owned(),
            data,
        };
        match self.request(tag, Frame::PutFile(f)).await? {
            Frame::Ack { .. } => Ok(()),
            f => Err(AgentError::Protocol(format!(
                "{} in answer to put_file",
                f.name()
            ))),
        }
    }

    /// Reads a file under the sandbox's work directory.
    pub async fn get_file(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>, AgentError> {
        let tag = self.inner.tag();
        let g = GetFile {
            tag,
            path: path.to_owned(),
            max_bytes,
        };
        match self.request(tag, Frame::GetFile(g)).await? {
            Frame::FileData { data, .. } => Ok(data),
            f => Err(AgentError::Protocol(format!(
                "{} in answer to get_file",
                f.name()
            ))),
        }
    }

    /// Whether the connection is up and the agent sent something within
    /// `within`: as good as a [`ping`](Self::ping) for telling a live
    /// agent, without the round trip.
    pub fn heard_within(&self, within: Duration) -> bool {
        let heard_us = self.inner.heard_us.load(Ordering::Relaxed);
        self.is_connected()
            && heard_us > 0
            && self
                .inner
                .born
                .elapsed()
                .saturating_sub(Duration::from_micros(heard_us))
                <= within
    }

    /// [`request`](Self::request) bounded by `within`; on timeout the tag's
    /// route is removed (the late answer, if any, is then dropped).
    async fn request_within(
        &self,
        tag: u32,
        frame: Frame,
        within: Duration,
    ) -> Result<Frame, AgentError> {
        match tokio::time::timeout(within, self.request(tag, frame)).await {
            Ok(reply) => reply,
            Err(_) => {
                self.inner.unregister(tag);
                Err(AgentError::Timeout(within))
            }
        }
    }

    /// Round-trips a ping; the health check of pooled sandboxes.
    pub async fn ping(&self, within: Duration) -> Result<Duration, AgentError> {
        let tag = self.inner.tag();
        let start = Instant::now();
        match self
            .request_within(tag, Frame::Ping(u64::from(tag)), within)
            .await?
        {
            Frame::Pong(_) => Ok(start.elapsed()),
            f => Err(AgentError::Protocol(format!(
                "{} in answer to ping",
                f.name()
            ))),
        }
    }

    /// Asks the agent to replace the sandbox's room (`Frame::Reset`): every
    /// process of the last lease killed, its files and namespaces gone, a
    /// fresh room pre-warmed. Waits at most `within`.
    pub async fn reset(&self, within: Duration) -> Result<(), AgentError> {
        let tag = self.inner.tag();
        match self
            .request_within(tag, Frame::Reset { tag }, within)
            .await?
        {
            Frame::Ack { .. } => Ok(()),
            f => Err(AgentError::Protocol(format!(
                "{} in answer to reset",
                f.name()
            ))),
        }
    }

    /// Waits until every runtime the hello asked to pre-warm has a warm
    /// interpreter waiting (a template is snapshotted only then).
    pub async fn await_warm(&self, within: Duration) -> Result<(), AgentError> {
        let tag = self.inner.tag();
        match self
            .request_within(tag, Frame::AwaitWarm { tag }, within)
            .await?
        {
            Frame::Ack { .. } => Ok(()),
            f => Err(AgentError::Protocol(format!(
                "{} in answer to await_warm",
                f.name()
            ))),
        }
    }

    /// Sends a microVM guest what is unique to its sandbox (entropy, clock,
    /// hostname, id, limits) and waits until the agent has applied it; the
    /// tag is assigned here.
    pub async fn setup(&self, mut setup: GuestSetup, within: Duration) -> Result<(), AgentError> {
        let tag = self.inner.tag();
        setup.tag = tag;
        match self
            .request_within(tag, Frame::Setup(setup), within)
            .await?
        {
            Frame::Ack { .. } => Ok(()),
            f => Err(AgentError::Protocol(format!(
                "{} in answer to setup",
                f.name()
            ))),
        }
    }

    /// Starts an exec in one write: its files, the exec (whose tag is
    /// assigned here) and its whole stdin (closed at the end). The agent handles frames in order, so the files
    /// exist before the exec starts; their acks are collected afterwards
    /// through the returned [`PendingReply`]s, which saves a round trip per
    /// file and lets the agent read the job with one wake-up.
    pub async fn start_job(
        &self,
        files: Vec<PutFile>,
        req: ExecRequest,
        stdin: &[u8],
    ) -> Result<(Vec<PendingReply>, ExecStream), AgentError> {
        self.start(files, req, Some(stdin)).await
    }

    /// [`start_job`](Self::start_job) with stdin left open: the caller feeds
    /// it later through [`ExecHandle::stdin`]. For a long-lived interpreter
    /// (a code context) that reads its requests from stdin.
    pub async fn start_open(
        &self,
        files: Vec<PutFile>,
        req: ExecRequest,
    ) -> Result<(Vec<PendingReply>, ExecStream), AgentError> {
        self.start(files, req, None).await
    }

    async fn start(
        &self,
        files: Vec<PutFile>,
        mut req: ExecRequest,
        stdin: Option<&[u8]>,
    ) -> Result<(Vec<PendingReply>, ExecStream), AgentError> {
        let mut bytes = Vec::new();
        let mut acks = Vec::with_capacity(files.len());
        for mut f in files {
            f.tag = self.inner.tag();
            acks.push(PendingReply {
                tag: f.tag,
                rx: self.inner.register(f.tag, 2)?,
                inner: self.inner.clone(),
            });
            Frame::PutFile(f).encode_into(&mut bytes);
        }
        let tag = self.inner.tag();
        req.tag = tag;
        let stream = ExecStream {
            tag,
            rx: self.inner.register(tag, 64)?,
            inner: self.inner.clone(),
        };
        Frame::Exec(req).encode_into(&mut bytes);
        if let Some(stdin) = stdin {
            encode_stdin(tag, stdin, &mut bytes);
            let data = Vec::new();
            Frame::Stdin { tag, data }.encode_into(&mut bytes);
        }
        self.inner.send_bytes(&bytes).await?;
        Ok((acks, stream))
    }

    /// Claims a name for an exec's inline code. Only an exec that finds no
    /// other inline exec in flight may use the runtime's default file name
    /// (`main.py`); concurrent ones get a unique hidden name, so that two
    /// execs in one workspace never overwrite each other's code. Atomic, so
    /// two execs cannot both take the default.
    pub fn claim_inline(&self) -> InlineClaim {
        let before = self.inner.inline_in_flight.fetch_add(1, Ordering::AcqRel);
        InlineClaim {
            inner: self.inner.clone(),
            unique: (before > 0).then(|| self.inner.tag()),
        }
    }

    /// Whether the connection is still up.
    pub fn is_connected(&self) -> bool {
        self.inner.routes().closed.is_none()
    }
}

/// Appends `data` as `Stdin` frames of at most one chunk each (an empty
/// `data` appends nothing: an empty frame would close stdin).
fn encode_stdin(tag: u32, data: &[u8], out: &mut Vec<u8>) {
    for chunk in data.chunks(MAX_CHUNK_BYTES) {
        let data = chunk.to_vec();
        Frame::Stdin { tag, data }.encode_into(out);
    }
}

/// A claim on the inline-code file name, released on drop.
#[must_use = "the claim must live until the exec has ended"]
pub struct InlineClaim {
    inner: Arc<Inner>,
    unique: Option<u32>,
}

impl InlineClaim {
    /// The file name to use for inline code given the runtime's default.
    pub fn file_name(&self, default: &str) -> String {
        match self.unique {
            None => default.to_owned(),
            Some(n) => match default.rsplit_once('.') {
                Some((stem, ext)) => format!(".{stem}-{n}.{ext}"),
                None => format!(".{default}-{n}"),
            },
        }
    }
}

impl Drop for InlineClaim {
    fn drop(&mut self) {
        self.inner.inline_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Routes one frame from the agent. An `Err` ends the connection.
async fn route(inner: &Inner, frame: Frame) -> Result<(), String> {
    let tag = match &frame {
        Frame::HelloAck(_) => HELLO_TAG,
        Frame::Error(e) => match e.tag {
            Some(t) => t,
            None => {
                let has_hello = inner.routes().map.contains_key(&HELLO_TAG);
                if !has_hello {
                    return Err(format!("agent reported: {}", e.message));
                }
                HELLO_TAG
            }
        },
        Frame::Pong(n) => *n as u32,
        Frame::Ack { tag } | Frame::FileData { tag, .. } => *tag,
        Frame::Started(s) => s.tag,
        Frame::Stdout { tag, .. } | Frame::Stderr { tag, .. } => *tag,
        Frame::Exit(x) => x.tag,
        other => return Err(format!("agent sent a host-bound frame: {}", other.name())),
    };
    let tx = inner.routes().map.get(&tag).cloned();
    if let Some(tx) = tx {
        // A dropped receiver just means nobody waits any more.
        let _ = tx.send(frame).await;
    }
    Ok(())
}

/// The answer to a request sent without waiting (see
/// [`AgentConn::start_job`]).
#[must_use = "a request's answer says whether it worked"]
pub struct PendingReply {
    tag: u32,
    rx: mpsc::Receiver<Frame>,
    inner: Arc<Inner>,
}

impl PendingReply {
    /// Waits for the answer: `Ok` for an `Ack`.
    pub async fn ack(mut self) -> Result<(), AgentError> {
        match self.rx.recv().await {
            Some(Frame::Ack { .. }) => Ok(()),
            Some(Frame::Error(e)) => Err(AgentError::Refused(e.message)),
            Some(f) => Err(AgentError::Protocol(format!(
                "{} instead of an ack",
                f.name()
            ))),
            None => Err(AgentError::Disconnected(self.inner.closed_reason())),
        }
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        self.inner.unregister(self.tag);
    }
}

/// The frames of one exec, and the handles to feed and stop it.
#[must_use = "an exec's frames must be read, or the agent stalls on backpressure"]
pub struct ExecStream {
    tag: u32,
    rx: mpsc::Receiver<Frame>,
    inner: Arc<Inner>,
}

impl ExecStream {
    pub fn tag(&self) -> u32 {
        self.tag
    }

    /// The next frame: `Started`, `Stdout`, `Stderr`, `Exit` or `Error`;
    /// `None` when the connection is gone.
    pub async fn next(&mut self) -> Option<Frame> {
        self.rx.recv().await
    }

    /// Why the connection closed, once `next` returned `None`.
    pub fn closed_reason(&self) -> String {
        self.inner.closed_reason()
    }

    /// Signals the exec's process group.
    pub async fn kill(&self, signal: i32) -> Result<(), AgentError> {
        self.inner
            .send(&Frame::Kill(Kill {
                tag: self.tag,
                signal,
            }))
            .await
    }

    /// A handle that feeds and signals this exec while another task
    /// reads its frames.
    pub fn handle(&self) -> ExecHandle {
        ExecHandle {
            tag: self.tag,
            inner: self.inner.clone(),
        }
    }
}

/// Feeds and signals one exec; cheap to clone, and useless (every call
/// fails or reaches nobody) once the exec or the connection is gone.
#[derive(Clone)]
pub struct ExecHandle {
    tag: u32,
    inner: Arc<Inner>,
}

impl ExecHandle {
    /// Sends `data` to the exec's stdin (nothing for empty `data`; stdin
    /// stays open).
    pub async fn stdin(&self, data: &[u8]) -> Result<(), AgentError> {
        let mut bytes = Vec::new();
        encode_stdin(self.tag, data, &mut bytes);
        self.inner.send_bytes(&bytes).await
    }

    /// Signals the exec's process group.
    pub async fn kill(&self, signal: i32) -> Result<(), AgentError> {
        self.inner
            .send(&Frame::Kill(Kill {
                tag: self.tag,
                signal,
            }))
            .await
    }
}

impl Drop for ExecStream {
    fn drop(&mut self) {
        self.inner.unregister(self.tag);
    }
}

impl std::fmt::Debug for AgentConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConn")
            .field("connected", &self.is_connected())
            .finish()
    }
}

//! Stateful code contexts: a long-lived interpreter (Python, Node) inside a workspace, so
//! that an agent (the LLM kind) can run a cell, look at the result and run
//! the next one with its variables, imports and loaded data still there.
//!
//! A context is an ordinary exec that never ends on its own: the host starts
//! a small driver program for the language (shipped in this binary, put into
//! the sandbox as a hidden file) with its stdin left open. Each cell is one
//! JSON line on the driver's stdin; the driver answers on its stdout with
//! JSON lines (the cell's output, rich display data, and a `done` record
//! with the value of a trailing expression or the error). So the agent
//! protocol needs nothing new: `Exec`, `Stdin`, `Kill` and `Exit` already
//! carry all of it, and the agent treats the driver like any other job
//! process (its user, seccomp filters, OOM priority, cgroup).
//!
//! The host still enforces every limit itself: a cell's deadline (SIGINT at
//! it, which the driver turns into `KeyboardInterrupt`, then SIGKILL of the
//! driver when it does not stop within [`INTERRUPT_GRACE`]) and its output
//! cap (bytes past it are dropped and the cell is interrupted). A driver
//! that ends (OOM, a crash, `os._exit`) leaves the context dead with the
//! reason, which the next exec reports; `restart` starts a fresh driver
//! under the same id.

mod cell;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kiln_protocol::{
    check_rel_path, ContextDriver, ExecRequest, ExitStatus, Frame, JobId, PutFile, RuntimeTable,
};
use kiln_sandbox::{ExecHandle, ExecStream, Sandbox};
use serde::Serialize;
use tokio::sync::oneshot;

pub use cell::{CellRequest, CellSink, ContextExecResult, DisplayData};

use crate::sandboxes::Held;

/// How long a driver gets to say it is ready after it was started.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// How long a cell gets to stop after SIGINT (its deadline, an output cap)
/// before its driver is killed and the context dies.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(2);

/// Contexts one workspace may hold at once.
pub const MAX_PER_SANDBOX: usize = 16;

/// The drivers, by the runtime table's `contexts` key: the file the
/// driver goes to in the work directory, and its source (see
/// `python_driver.py`'s header for the line protocol both speak).
fn driver(kind: ContextDriver) -> (&'static str, &'static str) {
    match kind {
        ContextDriver::Python => (".kiln-context-python.py", include_str!("python_driver.py")),
        ContextDriver::Node => (".kiln-context-node.js", include_str!("node_driver.js")),
    }
}

/// The runtimes of `table` with code contexts (their `contexts` key).
pub fn languages(table: &RuntimeTable) -> Vec<String> {
    table
        .iter()
        .filter(|r| r.contexts.is_some())
        .map(|r| r.name.clone())
        .collect()
}

/// Why a context operation failed; the API maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// A request field asks for something contexts cannot do.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// No such context in this sandbox.
    #[error("no context {0} in this sandbox: it never existed or was deleted")]
    Gone(String),
    /// Another exec is running in the context.
    #[error("context {0} is running another exec; wait for it, or interrupt it with POST .../contexts/{0}/interrupt")]
    Busy(String),
    /// The context's interpreter ended; only a restart brings it back.
    #[error("context {id} is dead: {reason}; restart it with POST .../contexts/{id}/restart (its state is lost) or delete it")]
    Dead { id: String, reason: String },
    /// As many contexts as allowed exist in the sandbox.
    #[error("the sandbox has {MAX_PER_SANDBOX} contexts, the most allowed; delete one first")]
    TooMany,
    /// Starting or talking to the driver failed.
    #[error("{0}")]
    Internal(String),
}

/// Whether a context can run cells.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ContextState {
    Idle,
    Running,
    Dead { reason: String },
}

/// The public description of a context.
#[derive(Debug, Clone, Serialize)]
pub struct ContextInfo {
    pub id: String,
    pub sandbox_id: String,
    pub language: String,
    /// The directory cells run in (relative to the sandbox's work directory).
    pub cwd: String,
    /// Unix seconds.
    pub created_at: f64,
    /// Cells run so far (since the last restart).
    pub execs: u64,
    #[serde(flatten)]
    pub state: ContextState,
}

/// Output a parked driver's drainer keeps for the next cell, in bytes;
/// the rest is dropped.
const PARKED_KEEP_BYTES: usize = 64 * 1024;

/// What a drainer hands back: the stream and the frames it kept.
type Drained = (ExecStream, VecDeque<Frame>);

/// One running driver. While a cell runs, the cell reads the driver's exec
/// stream itself. Between cells the driver is parked: a drainer task reads
/// the stream, because an unread exec stream fills its route and stalls
/// the sandbox's whole agent connection (file calls, other execs). The
/// drainer keeps up to [`PARKED_KEEP_BYTES`] of output for the next cell
/// (the drivers write nothing then, but the code in them could) and every
/// other frame (an exit), and drops the rest.
struct Driver {
    stream: Option<ExecStream>,
    drainer: Option<(tokio::task::JoinHandle<Drained>, oneshot::Sender<()>)>,
    /// Frames the drainer kept, read before the stream.
    backlog: VecDeque<Frame>,
    handle: ExecHandle,
    /// Bytes of the driver's stdout not yet ending in a newline.
    pending: Vec<u8>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some((task, _)) = &self.drainer {
            task.abort();
        }
    }
}

impl Driver {
    fn new(stream: ExecStream) -> Self {
        Self {
            handle: stream.handle(),
            stream: Some(stream),
            drainer: None,
            backlog: VecDeque::new(),
            pending: Vec::new(),
        }
    }

    /// Hands the stream to a drainer until [`resume`](Self::resume).
    fn park(&mut self) {
        let Some(mut stream) = self.stream.take() else {
            return;
        };
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut kept = VecDeque::new();
            let mut kept_bytes = 0usize;
            loop {
                let frame = tokio::select! {
                    biased;
                    _ = &mut stopped => return (stream, kept),
                    f = stream.next() => f,
                };
                match frame {
                    None => return (stream, kept),
                    Some(Frame::Stdout { data, .. } | Frame::Stderr { data, .. })
                        if kept_bytes + data.len() > PARKED_KEEP_BYTES => {}
                    Some(f @ (Frame::Stdout { .. } | Frame::Stderr { .. })) => {
                        if let Frame::Stdout { data, .. } | Frame::Stderr { data, .. } = &f {
                            kept_bytes += data.len();
                        }
                        kept.push_back(f);
                    }
                    Some(f) => kept.push_back(f),
                }
            }
        });
        self.drainer = Some((task, stop));
    }

    /// Takes the stream back from the drainer.
    async fn resume(&mut self) {
        let Some((task, stop)) = self.drainer.take() else {
            return;
        };
        let _ = stop.send(());
        if let Ok((stream, kept)) = task.await {
            self.stream = Some(stream);
            self.backlog.extend(kept);
        }
    }

    /// The exec's next frame; `None` once the connection is gone (or the
    /// stream was lost with a failed drainer).
    async fn next(&mut self) -> Option<Frame> {
        if let Some(f) = self.backlog.pop_front() {
            return Some(f);
        }
        self.stream.as_mut()?.next().await
    }

    fn closed_reason(&self) -> String {
        match &self.stream {
            Some(s) => s.closed_reason(),
            None => "the context's exec stream was lost".into(),
        }
    }

    fn handle(&self) -> ExecHandle {
        self.handle.clone()
    }

    async fn kill(&self, signal: i32) -> Result<(), kiln_sandbox::AgentError> {
        self.handle.kill(signal).await
    }
}

/// A long-lived interpreter in a workspace.
pub struct Context {
    id: String,
    sandbox_id: String,
    language: String,
    /// The driver the runtime table names for `language`.
    kind: ContextDriver,
    cwd: String,
    created_at: f64,
    execs: AtomicU64,
    /// Held by the exec that runs a cell (and by restart).
    driver: tokio::sync::Mutex<Option<Driver>>,
    /// Signals the current driver without waiting for `driver`.
    handle: Mutex<Option<ExecHandle>>,
    running: AtomicBool,
    /// The running cell's driver said it started it (SIGINT reaches it).
    started: AtomicBool,
    dead: Mutex<Option<String>>,
}

impl Context {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn info(&self) -> ContextInfo {
        let state = match self
            .dead
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            Some(reason) => ContextState::Dead { reason },
            None if self.running.load(Ordering::SeqCst) => ContextState::Running,
            None => ContextState::Idle,
        };
        ContextInfo {
            id: self.id.clone(),
            sandbox_id: self.sandbox_id.clone(),
            language: self.language.clone(),
            cwd: self.cwd.clone(),
            created_at: self.created_at,
            execs: self.execs.load(Ordering::SeqCst),
            state,
        }
    }

    /// `Ok` when a cell could start now: the context is alive and idle.
    pub fn check_ready(&self) -> Result<(), ContextError> {
        if let Some(reason) = self
            .dead
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Err(ContextError::Dead {
                id: self.id.clone(),
                reason,
            });
        }
        if self.running.load(Ordering::SeqCst) {
            return Err(ContextError::Busy(self.id.clone()));
        }
        Ok(())
    }

    fn mark_dead(&self, reason: String) {
        let mut d = self.dead.lock().unwrap_or_else(PoisonError::into_inner);
        if d.is_none() {
            tracing::info!(context = %self.id, %reason, "code context died");
            *d = Some(reason);
        }
    }

    fn handle(&self) -> Option<ExecHandle> {
        self.handle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sends SIGINT to a running cell (`KeyboardInterrupt` in it); the
    /// context keeps its state. `false` when no cell was running.
    pub async fn interrupt(&self) -> bool {
        if !self.running.load(Ordering::SeqCst) {
            return false;
        }
        // A SIGINT before the driver started the cell would find it idle
        // (and be ignored); wait for the start, boundedly.
        for _ in 0..200 {
            if self.started.load(Ordering::SeqCst) || !self.running.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !self.running.load(Ordering::SeqCst) {
            return false;
        }
        match self.handle() {
            Some(h) => h.kill(libc::SIGINT).await.is_ok(),
            None => false,
        }
    }

    /// Kills the driver (its state is lost).
    async fn kill(&self) {
        if let Some(h) = self.handle() {
            let _ = h.kill(libc::SIGKILL).await;
        }
    }
}

/// The contexts of one workspace.
#[derive(Default)]
pub struct ContextSet {
    by_id: Mutex<HashMap<String, Arc<Context>>>,
}

impl ContextSet {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Context>>> {
        self.by_id.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, id: &str) -> Result<Arc<Context>, ContextError> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| ContextError::Gone(id.to_owned()))
    }

    pub fn list(&self) -> Vec<ContextInfo> {
        let mut v: Vec<_> = self.map().values().map(|c| c.info()).collect();
        v.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
        v
    }

    /// Starts a context in `held`'s sandbox.
    pub async fn create(
        &self,
        held: &Held,
        runtimes: &RuntimeTable,
        warm_template: &str,
        language: &str,
        cwd: Option<String>,
    ) -> Result<ContextInfo, ContextError> {
        let runtime = runtimes
            .resolve(language)
            .map_err(|e| ContextError::Invalid {
                field: "language",
                message: e.to_string(),
            })?;
        let Some(kind) = runtime.contexts else {
            return Err(ContextError::Invalid {
                field: "language",
                message: format!(
                    "{} has no code contexts (its runtime table entry has no `contexts` key); runtimes with contexts: {}",
                    runtime.name,
                    languages(runtimes).join(", ")
                ),
            });
        };
        let cwd = match cwd {
            None => String::new(),
            Some(c) if c.is_empty() || c == "." => String::new(),
            Some(c) => {
                check_rel_path("cwd", &c).map_err(|e| ContextError::Invalid {
                    field: "cwd",
                    message: e.message,
                })?;
                c
            }
        };
        if self.map().len() >= MAX_PER_SANDBOX {
            return Err(ContextError::TooMany);
        }
        let ctx = Arc::new(Context {
            id: format!("ctx-{}", JobId::random()),
            sandbox_id: held.id().to_string(),
            language: runtime.name.clone(),
            kind,
            cwd,
            created_at: crate::workspaces::unix_now(),
            execs: AtomicU64::new(0),
            driver: tokio::sync::Mutex::new(None),
            handle: Mutex::new(None),
            running: AtomicBool::new(false),
            started: AtomicBool::new(false),
            dead: Mutex::new(None),
        });
        let warm_next = runtime.name == warm_template && runtime.warm.is_some();
        let driver = start_driver(held, &ctx, warm_next).await?;
        *ctx.driver.lock().await = Some(driver);
        let info = ctx.info();
        self.map().insert(ctx.id.clone(), ctx);
        Ok(info)
    }

    /// Replaces a context's driver with a fresh one (state lost, id kept);
    /// waits for a running cell's driver to be killed first.
    pub async fn restart(
        &self,
        held: &Held,
        id: &str,
        warm_template: &str,
    ) -> Result<ContextInfo, ContextError> {
        let ctx = self.get(id)?;
        ctx.kill().await;
        let mut slot = ctx.driver.lock().await;
        if let Some(mut old) = slot.take() {
            old.resume().await;
            // Drain the old driver's end so that its process is reaped.
            let _ = tokio::time::timeout(INTERRUPT_GRACE, async {
                while !matches!(
                    old.next().await,
                    None | Some(Frame::Exit(_) | Frame::Error(_))
                ) {}
            })
            .await;
        }
        *ctx.dead.lock().unwrap_or_else(PoisonError::into_inner) = None;
        ctx.execs.store(0, Ordering::SeqCst);
        let warm_next = ctx.language == warm_template;
        match start_driver(held, &ctx, warm_next).await {
            Ok(d) => {
                *slot = Some(d);
                Ok(ctx.info())
            }
            Err(e) => {
                ctx.mark_dead(format!("restarting failed: {e}"));
                Err(e)
            }
        }
    }

    /// Kills a context's driver and forgets the context.
    pub async fn delete(&self, id: &str) -> Result<(), ContextError> {
        let ctx = self
            .map()
            .remove(id)
            .ok_or_else(|| ContextError::Gone(id.to_owned()))?;
        ctx.kill().await;
        Ok(())
    }
}

/// Puts the driver into the sandbox, starts it with stdin open, and waits
/// for its `ready` line.
async fn start_driver(held: &Held, ctx: &Context, warm_next: bool) -> Result<Driver, ContextError> {
    let agent = held.agent();
    let runtime = ctx.language.as_str();
    let (driver_file, source) = driver(ctx.kind);
    let file = PutFile {
        tag: 0,
        mode: 0o644,
        path: driver_file.to_owned(),
        data: source.as_bytes().to_vec(),
    };
    let mut env = std::collections::BTreeMap::new();
    env.insert("KILN_CONTEXT_CWD".to_owned(), ctx.cwd.clone());
    // Figures render to PNG without a display.
    env.insert("MPLBACKEND".to_owned(), "Agg".to_owned());
    // Its font cache goes where the sandbox can write.
    env.insert(
        "MPLCONFIGDIR".to_owned(),
        "/tmp/.kiln-matplotlib".to_owned(),
    );
    env.insert("PYTHONUNBUFFERED".to_owned(), "1".to_owned());
    let req = ExecRequest {
        tag: 0,
        runtime: runtime.to_owned(),
        entrypoint: driver_file.to_owned(),
        args: Vec::new(),
        env,
        // The host caps each cell's output itself; the driver's lifetime
        // total is unbounded.
        output_limit: u64::MAX,
        warm_next,
    };
    let internal = |what: &str, e: &dyn std::fmt::Display| {
        ContextError::Internal(format!("{what} the context's interpreter: {e}"))
    };
    let (acks, stream) = agent
        .start_open(vec![file], req)
        .await
        .map_err(|e| internal("starting", &e))?;
    let mut driver = Driver::new(stream);
    *ctx.handle.lock().unwrap_or_else(PoisonError::into_inner) = Some(driver.handle());
    for ack in acks {
        ack.ack().await.map_err(|e| internal("placing", &e))?;
    }
    let ready = tokio::time::timeout(READY_WITHIN, async {
        let mut stderr = Vec::new();
        loop {
            match driver.next().await {
                Some(Frame::Started(_)) => {}
                Some(Frame::Stdout { data, .. }) => {
                    driver.pending.extend_from_slice(&data);
                    if let Some(line) = cell::take_line(&mut driver.pending) {
                        return match serde_json::from_slice::<serde_json::Value>(&line) {
                            Ok(v) if v.get("ready").is_some() => Ok(()),
                            _ => Err(format!(
                                "it said {:?} instead of ready",
                                String::from_utf8_lossy(&line)
                            )),
                        };
                    }
                }
                Some(Frame::Stderr { data, .. }) => {
                    if stderr.len() < 64 * 1024 {
                        stderr.extend_from_slice(&data);
                    }
                }
                Some(Frame::Exit(x)) => {
                    return Err(format!(
                        "it ended before it was ready ({}): {}",
                        describe_exit(x.status),
                        String::from_utf8_lossy(&stderr).trim()
                    ))
                }
                Some(Frame::Error(e)) => return Err(e.message),
                Some(f) => return Err(format!("unexpected {} frame", f.name())),
                None => return Err(driver.closed_reason()),
            }
        }
    })
    .await;
    match ready {
        Ok(Ok(())) => {
            driver.park();
            Ok(driver)
        }
        Ok(Err(why)) => {
            let _ = driver.kill(libc::SIGKILL).await;
            Err(ContextError::Internal(format!(
                "starting the context's interpreter: {why}"
            )))
        }
        Err(_) => {
            let _ = driver.kill(libc::SIGKILL).await;
            Err(ContextError::Internal(format!(
                "the context's interpreter was not ready within {READY_WITHIN:?}"
            )))
        }
    }
}

fn describe_exit(s: ExitStatus) -> String {
    match s {
        ExitStatus::Code(c) => format!("exit code {c}"),
        ExitStatus::Signal(s) => format!("killed by signal {s}"),
    }
}

/// Runs one cell in `ctx`. Never waits for another cell: a busy context is
/// an error. The workspace's end is the caller's to race against.
pub async fn exec(
    held: &Held,
    ctx: &Context,
    req: CellRequest,
    sink: &mut dyn CellSink,
) -> Result<ContextExecResult, ContextError> {
    if let Some(reason) = ctx
        .dead
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
    {
        return Err(ContextError::Dead {
            id: ctx.id.clone(),
            reason,
        });
    }
    let Ok(mut slot) = ctx.driver.try_lock() else {
        return Err(ContextError::Busy(ctx.id.clone()));
    };
    let Some(driver) = slot.as_mut() else {
        return Err(ContextError::Dead {
            id: ctx.id.clone(),
            reason: "its interpreter is gone".into(),
        });
    };
    for f in &req.files {
        held.agent()
            .put_file(
                &f.path,
                f.content.clone(),
                if f.executable { 0o755 } else { 0o644 },
            )
            .await
            .map_err(|e| ContextError::Invalid {
                field: "files",
                message: format!("placing {}: {e}", f.path),
            })?;
    }
    let n = ctx.execs.fetch_add(1, Ordering::SeqCst) + 1;
    ctx.started.store(false, Ordering::SeqCst);
    ctx.running.store(true, Ordering::SeqCst);
    let started = Instant::now();
    driver.resume().await;
    let out = cell::run(held, driver, &req, n, &ctx.started, sink).await;
    driver.park();
    ctx.running.store(false, Ordering::SeqCst);
    let mut result = out.result;
    result.result.timings.run_ms = started.elapsed().as_secs_f64() * 1000.0;
    result.result.timings.total_ms = result.result.timings.run_ms;
    result.context = ctx.id.clone();
    if let Some(reason) = out.died {
        ctx.mark_dead(reason);
        *slot = None;
    }
    Ok(result)
}

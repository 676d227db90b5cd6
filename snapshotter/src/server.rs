//! The page server: unix-socket listeners, one per snapshot source, that
//! accept Firecracker-style `Uffd` handshakes and serve each restore on its
//! own thread.
//!
//! The server is the unit of lifecycle and observability: it owns the
//! listeners, the shared memory-file mappings (one per file, however many VMs
//! use it), the table of live restores with their VMM's pid from
//! `SO_PEERCRED`, a bounded history of finished ones, and the metrics. A
//! restore's state is dropped the moment its VMM exits (watched through a
//! pidfd), its address space disappears, or the server shuts down; a bad
//! handshake or a failing restore is logged, recorded and contained to its
//! own connection.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::handshake::{self, HandshakeError};
use crate::memory::{MemoryError, MemoryFile, MemoryIdentity};
use crate::metrics::{PageServerMetrics, RestoreMetrics, RestoreMetricsSnapshot};
use crate::restore::{Restore, RestoreEnd};
use crate::sys;
use crate::working_set::{self, WorkingSet};

/// How a snapshot's memory is served: chosen per template.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ServeMode {
    /// Serve every page on its first fault.
    Lazy,
    /// Serve lazily and write the fault order as the working set when the restore ends.
    Record,
    /// Install the recorded working set up front, serve the rest lazily
    /// (lazily only, with a warning, if there is no valid working set).
    Prefetch,
}

/// What one listener serves: a memory file and how.
#[derive(Debug, Clone)]
pub struct SnapshotSource {
    /// The snapshot memory file (Firecracker's `mem_file_path` output).
    pub memory: PathBuf,
    /// Its identity when known (content digest from the store's manifest).
    pub identity: Option<MemoryIdentity>,
    /// Where the working set is read (prefetch) or written (record).
    pub working_set: PathBuf,
    /// Lazy, record or prefetch.
    pub mode: ServeMode,
}

impl SnapshotSource {
    /// A source for `memory` with the working set at `<memory>.ws`.
    pub fn new(memory: impl Into<PathBuf>, mode: ServeMode) -> Self {
        let memory = memory.into();
        Self {
            working_set: working_set::default_path(&memory),
            memory,
            identity: None,
            mode,
        }
    }
}

/// Tunables of a [`PageServer`].
#[derive(Debug, Clone)]
pub struct PageServerConfig {
    /// How long a connection may take to deliver its complete handshake.
    pub handshake_timeout: Duration,
    /// How many finished restores [`PageServer::recent_restores`] remembers.
    pub history: usize,
    /// Permission bits of the listening sockets. Whoever can connect can
    /// read the snapshot's memory through their own userfaultfd, so the
    /// default, 0o600, admits only the server's own user; widen it (and the
    /// directory's) for a jailed VMM running under another uid.
    pub socket_mode: u32,
    /// Threads that install one restore's working set in parallel (the
    /// restore's own thread included; 0 counts as 1). Creating fresh guest
    /// pages, not the copy, bounds a prefetch; threads share that work when
    /// cores are free (see `docs/BENCHMARKS.md`).
    /// Default: the available parallelism, at most
    /// [`PageServerConfig::MAX_DEFAULT_PREFETCH_THREADS`].
    pub prefetch_threads: usize,
}

impl PageServerConfig {
    /// Cap on the default [`PageServerConfig::prefetch_threads`], so that a
    /// burst of restores on a large host does not each take every core.
    pub const MAX_DEFAULT_PREFETCH_THREADS: usize = 4;
}

impl Default for PageServerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            history: 256,
            socket_mode: 0o600,
            prefetch_threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(Self::MAX_DEFAULT_PREFETCH_THREADS),
        }
    }
}

/// Why the server (not one connection) failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be bound.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The socket path exists and is not a socket; refusing to replace it.
    #[error("{0} exists and is not a unix socket; choose another path or remove it")]
    PathInUse(PathBuf),
    /// The memory file could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Creating the shutdown eventfd or a thread failed.
    #[error("page server setup failed: {0}")]
    Setup(#[source] io::Error),
}

/// Identifier of one restore within a page server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct RestoreId(pub u64);

impl std::fmt::Display for RestoreId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "restore-{}", self.0)
    }
}

/// A live restore as seen from outside.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreInfo {
    /// Its id.
    pub id: RestoreId,
    /// The VMM's pid (from `SO_PEERCRED`).
    pub vmm_pid: i32,
    /// The VMM's uid.
    pub vmm_uid: u32,
    /// The socket it connected to.
    pub socket: PathBuf,
    /// The mode actually in force (prefetch without a working set is lazy).
    pub mode: ServeMode,
    /// Guest memory size in bytes.
    pub guest_bytes: u64,
    /// When the handshake was accepted.
    pub started: SystemTime,
    /// Its counters now.
    pub metrics: RestoreMetricsSnapshot,
}

/// How a connection or restore ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum RestoreOutcome {
    /// The handshake was refused; the message says why.
    Refused(String),
    /// The restore was served and ended this way.
    Ended(RestoreEnd),
}

/// A finished connection, kept in a bounded history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    /// Its id.
    pub id: RestoreId,
    /// The VMM's pid, when credentials could be read.
    pub vmm_pid: Option<i32>,
    /// The socket it connected to.
    pub socket: PathBuf,
    /// The mode in force (`None` when refused).
    pub mode: Option<ServeMode>,
    /// How it ended.
    pub outcome: RestoreOutcome,
    /// Final counters.
    pub metrics: RestoreMetricsSnapshot,
    /// How long it lasted.
    pub duration: Duration,
}

struct LiveRestore {
    info: RestoreInfo,
    metrics: Arc<RestoreMetrics>,
}

struct Inner {
    config: PageServerConfig,
    metrics: Arc<PageServerMetrics>,
    shutdown: OwnedFd,
    next_id: AtomicU64,
    live: Mutex<HashMap<RestoreId, LiveRestore>>,
    history: Mutex<VecDeque<RestoreReport>>,
    memory_files: Mutex<HashMap<PathBuf, Weak<MemoryFile>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The userfaultfd page server. Dropping it shuts it down.
#[must_use = "dropping the page server stops serving every VM"]
pub struct PageServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageServer")
            .field(
                "live_restores",
                &self.inner.live.lock().map(|l| l.len()).unwrap_or(0),
            )
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic in a restore thread must not poison the whole server.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PageServer {
    /// A server with default tunables and no listeners yet.
    pub fn new() -> Result<Self, ServerError> {
        Self::with_config(PageServerConfig::default())
    }

    /// A server with the given tunables.
    pub fn with_config(config: PageServerConfig) -> Result<Self, ServerError> {
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                metrics: Arc::new(PageServerMetrics::default()),
                shutdown: sys::eventfd().map_err(ServerError::Setup)?,
                next_id: AtomicU64::new(1),
                live: Mutex::new(HashMap::new()),
                history: Mutex::new(VecDeque::new()),
                memory_files: Mutex::new(HashMap::new()),
                threads: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Starts serving `source` on a unix socket at `socket` (a stale socket
    /// file there is replaced). The memory file is mapped now, once.
    pub fn listen(&self, socket: &Path, source: SnapshotSource) -> Result<(), ServerError> {
        let memory = self.inner.memory_file(&source)?;
        match std::fs::symlink_metadata(socket) {
            Ok(meta) if meta.file_type().is_socket() => {
                let _ = std::fs::remove_file(socket);
            }
            Ok(_) => return Err(ServerError::PathInUse(socket.to_owned())),
            Err(_) => {}
        }
        let bind_err = |source| ServerError::Bind {
            path: socket.to_owned(),
            source,
        };
        let listener = UnixListener::bind(socket).map_err(bind_err)?;
        std::fs::set_permissions(
            socket,
            std::fs::Permissions::from_mode(self.inner.config.socket_mode),
        )
        .map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        tracing::info!(socket = %socket.display(), memory = %source.memory.display(), mode = ?source.mode, "page server listening");
        let inner = Arc::clone(&self.inner);
        let socket = socket.to_owned();
        let handle = std::thread::Builder::new()
            .name("kiln-pagesrv-accept".into())
            .spawn(move || inner.accept_loop(listener, socket, source, memory))
            .map_err(ServerError::Setup)?;
        lock(&self.inner.threads).push(handle);
        Ok(())
    }

    /// The restores being served now.
    pub fn restores(&self) -> Vec<RestoreInfo> {
        let live = lock(&self.inner.live);
        let mut out: Vec<RestoreInfo> = live
            .values()
            .map(|l| RestoreInfo {
                metrics: l.metrics.snapshot(),
                ..l.info.clone()
            })
            .collect();
        out.sort_by_key(|i| i.id);
        out
    }

    /// Finished connections, oldest first (bounded by `PageServerConfig::history`).
    pub fn recent_restores(&self) -> Vec<RestoreReport> {
        lock(&self.inner.history).iter().cloned().collect()
    }

    /// Server-wide metrics.
    pub fn metrics(&self) -> &Arc<PageServerMetrics> {
        &self.inner.metrics
    }

    /// Stops accepting, ends every restore (writing recorded working sets)
    /// and waits for all threads.
    pub fn shutdown(self) {
        drop(self)
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        let _ = sys::eventfd_signal(self.inner.shutdown.as_fd());
        // Threads may add threads while we join: loop until none are left.
        for _ in 0..1024 {
            let handles: Vec<_> = lock(&self.inner.threads).drain(..).collect();
            if handles.is_empty() {
                break;
            }
            for h in handles {
                let _ = h.join();
            }
        }
    }
}

impl Inner {
    fn memory_file(&self, source: &SnapshotSource) -> Result<Arc<MemoryFile>, MemoryError> {
        let key = std::fs::canonicalize(&source.memory).unwrap_or_else(|_| source.memory.clone());
        let mut cache = lock(&self.memory_files);
        cache.retain(|_, weak| weak.strong_count() > 0);
        if let Some(existing) = cache.get(&key).and_then(Weak::upgrade) {
            if source.identity.is_none_or(|id| id == existing.identity()) {
                return Ok(existing);
            }
        }
        let file = Arc::new(match source.identity {
            Some(id) => MemoryFile::open_with_identity(&source.memory, id)?,
            None => MemoryFile::open(&source.memory)?,
        });
        cache.insert(key, Arc::downgrade(&file));
        Ok(file)
    }

    fn accept_loop(
        self: Arc<Self>,
        listener: UnixListener,
        socket: PathBuf,
        source: SnapshotSource,
        memory: Arc<MemoryFile>,
    ) {
        let source = Arc::new(source);
        loop {
            let ready = sys::poll(
                &[
                    (listener.as_fd(), libc::POLLIN),
                    (self.shutdown.as_fd(), libc::POLLIN),
                ],
                None,
            );
            match ready {
                Ok(r) if r[1] != 0 => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "poll on the listener failed; stopping this listener");
                    break;
                }
            }
            loop {
                match listener.accept() {
                    Ok((stream, _)) => self.spawn_connection(stream, &socket, &source, &memory),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        break;
                    }
                }
            }
            lock(&self.threads).retain(|h| !h.is_finished());
        }
        let _ = std::fs::remove_file(&socket);
    }

    fn spawn_connection(
        self: &Arc<Self>,
        stream: UnixStream,
        socket: &Path,
        source: &Arc<SnapshotSource>,
        memory: &Arc<MemoryFile>,
    ) {
        let id = RestoreId(self.next_id.fetch_add(1, Relaxed));
        let (inner, socket, source, memory) = (
            Arc::clone(self),
            socket.to_owned(),
            Arc::clone(source),
            Arc::clone(memory),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("kiln-uffd-{}", id.0))
            .spawn(move || inner.serve_connection(id, stream, socket, &source, memory));
        match spawned {
            Ok(handle) => lock(&self.threads).push(handle),
            Err(e) => {
                tracing::error!(%id, error = %e, "cannot spawn a thread for the restore; dropping the connection")
            }
        }
    }

    fn serve_connection(
        self: Arc<Self>,
        id: RestoreId,
        stream: UnixStream,
        socket: PathBuf,
        source: &SnapshotSource,
        memory: Arc<MemoryFile>,
    ) {
        let span = tracing::info_span!("restore", %id, socket = %socket.display());
        let _guard = span.enter();
        let accepted = Instant::now();
        let peer = sys::peer_cred(stream.as_fd());
        let vmm_pid = peer.as_ref().ok().map(|p| p.pid);
        let handshake = peer.map_err(HandshakeError::PeerCred).and_then(|p| {
            handshake::receive(&stream, memory.len(), self.config.handshake_timeout)
                .map(|(uffd, table)| (p, uffd, table))
        });
        let (peer, uffd, table) = match handshake {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(vmm_pid, error = %err, "refusing restore");
                self.metrics.handshakes_refused.fetch_add(1, Relaxed);
                let reply = serde_json::json!({ "error": err.to_string() }).to_string() + "\n";
                let _ = sys::send_with_fds(stream.as_fd(), reply.as_bytes(), &[]);
                self.remember(RestoreReport {
                    id,
                    vmm_pid,
                    socket,
                    mode: None,
                    outcome: RestoreOutcome::Refused(err.to_string()),
                    metrics: RestoreMetricsSnapshot::default(),
                    duration: accepted.elapsed(),
                });
                return;
            }
        };
        let page_size = Restore::uniform_page_size(&table);
        let working_set = match source.mode {
            ServeMode::Prefetch => match WorkingSet::load(&source.working_set, memory.identity()) {
                Ok(ws) if Some(ws.page_size as u64) == page_size => Some(ws),
                Ok(ws) => {
                    tracing::warn!(
                        ws_page = ws.page_size,
                        ?page_size,
                        "working set page size does not match the regions; serving lazily"
                    );
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no usable working set; serving lazily");
                    None
                }
            },
            _ => None,
        };
        if source.mode == ServeMode::Prefetch && working_set.is_none() {
            self.metrics.working_sets_unusable.fetch_add(1, Relaxed);
        }
        let record = source.mode == ServeMode::Record && page_size.is_some();
        let mode = match (source.mode, &working_set) {
            (ServeMode::Prefetch, None) => ServeMode::Lazy,
            (ServeMode::Record, _) if !record => ServeMode::Lazy,
            (m, _) => m,
        };
        let pidfd = match sys::pidfd_open(peer.pid) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                tracing::info!(
                    vmm_pid = peer.pid,
                    "the VMM exited before its restore began"
                );
                self.remember(RestoreReport {
                    id,
                    vmm_pid: Some(peer.pid),
                    socket,
                    mode: Some(mode),
                    outcome: RestoreOutcome::Ended(RestoreEnd::VmmExited),
                    metrics: RestoreMetricsSnapshot::default(),
                    duration: accepted.elapsed(),
                });
                return;
            }
            Err(e) => {
                tracing::warn!(vmm_pid = peer.pid, error = %e, "cannot watch the VMM process; its exit will not end the restore");
                None
            }
        };
        let restore_metrics = Arc::new(RestoreMetrics::default());
        let info = RestoreInfo {
            id,
            vmm_pid: peer.pid,
            vmm_uid: peer.uid,
            socket: socket.clone(),
            mode,
            guest_bytes: table.total_size(),
            started: SystemTime::now(),
            metrics: RestoreMetricsSnapshot::default(),
        };
        tracing::info!(
            vmm_pid = peer.pid,
            ?mode,
            regions = table.regions().len(),
            guest_bytes = info.guest_bytes,
            "restore started"
        );
        lock(&self.live).insert(
            id,
            LiveRestore {
                info,
                metrics: Arc::clone(&restore_metrics),
            },
        );
        self.metrics.restores_started.fetch_add(1, Relaxed);
        self.metrics.restores_active.fetch_add(1, Relaxed);

        let mut restore = Restore::new(
            uffd,
            pidfd,
            table,
            Arc::clone(&memory),
            record,
            working_set,
            self.config.prefetch_threads,
            Arc::clone(&restore_metrics),
            Arc::clone(&self.metrics),
        );
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            restore.run(self.shutdown.as_fd())
        }));
        let end = match run {
            Ok(Ok(end)) => end,
            Ok(Err(e)) => RestoreEnd::Failed(e.to_string()),
            Err(_) => RestoreEnd::Failed("the serving thread panicked".into()),
        };
        if let (Some(offsets), Some(page)) = (restore.take_recording(), page_size) {
            if !offsets.is_empty() {
                let ws = WorkingSet {
                    page_size: page as u32,
                    identity: memory.identity(),
                    offsets,
                };
                match ws.write_atomic(&source.working_set) {
                    Ok(()) => {
                        self.metrics.working_sets_written.fetch_add(1, Relaxed);
                        tracing::info!(pages = ws.offsets.len(), path = %source.working_set.display(), "working set written");
                    }
                    Err(e) => tracing::error!(error = %e, "cannot write the working set"),
                }
            }
        }
        drop(restore);
        // This thread was spawned for this connection: its CPU clock is
        // everything it did for the restore, handshake to teardown.
        restore_metrics
            .cpu_ns
            .fetch_add(sys::thread_cpu_time().as_nanos() as u64, Relaxed);
        match &end {
            RestoreEnd::Failed(why) => {
                tracing::error!(vmm_pid = peer.pid, error = %why, "restore failed")
            }
            other => tracing::info!(vmm_pid = peer.pid, end = ?other, "restore ended"),
        }
        // Counted and into the history before it leaves the live restores:
        // an observer that sees it gone from `restores()` finds its report
        // and the counters settled (the other order left a window where it
        // was in neither list, which a test of ten concurrent restores
        // caught once).
        self.remember(RestoreReport {
            id,
            vmm_pid: Some(peer.pid),
            socket,
            mode: Some(mode),
            outcome: RestoreOutcome::Ended(end),
            metrics: restore_metrics.snapshot(),
            duration: accepted.elapsed(),
        });
        self.metrics.restores_finished.fetch_add(1, Relaxed);
        self.metrics.restores_active.fetch_sub(1, Relaxed);
        lock(&self.live).remove(&id);
    }

    fn remember(&self, report: RestoreReport) {
        let mut history = lock(&self.history);
        history.push_back(report);
        while history.len() > self.config.history {
            history.pop_front();
        }
    }
}

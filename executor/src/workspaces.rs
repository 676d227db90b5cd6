//! Sandboxes as workspaces: a sandbox that outlives one job, so that an
//! agent (the LLM kind) can exec several times in it and keep files in its
//! work directory between execs. Every workspace has a TTL enforced by a
//! timer on the host: when it ends the sandbox is killed whatever it is
//! doing (an exec in flight ends with outcome `killed`) and destroyed.
//! With `remove_on_exit` a workspace is destroyed after its first exec.

use crate::images::{self, Images};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_protocol::{check_rel_path, limits, JobId, JobResult, JobSpec, Outcome, RuntimeTable};
use kiln_sandbox::{
    run_job, AgentError, AnyBackend, Backend, OutputSink, Sandbox, SandboxError, SandboxSpec,
};
use serde::Serialize;
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::live::{self, LiveSample};
use crate::metrics::Metrics;
use crate::sandboxes::Held;

/// Bounds on workspaces.
#[derive(Debug, Clone)]
pub struct WorkspaceSettings {
    /// Workspaces alive at once.
    pub max: usize,
    /// TTL when the request gives none.
    pub default_ttl: Duration,
    /// Longest TTL a request may ask for.
    pub max_ttl: Duration,
}

/// What a client asks for (already range-checked by the API).
#[derive(Debug, Clone)]
pub struct WorkspaceRequest {
    /// Runtime whose interpreter is pre-warmed, and the default of execs.
    pub template: String,
    pub ttl: Duration,
    pub remove_on_exit: bool,
    pub allow_internet: bool,
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub pids: u64,
    /// Environment of every exec (an exec's own env wins).
    pub env: BTreeMap<String, String>,
    /// The OCI image the sandbox's root is made of; `None`: the backend's.
    pub image: Option<String>,
    /// Egress rules of a networked sandbox; `None`: the configured ones.
    pub egress: Option<kiln_sandbox::network::EgressRules>,
    /// The private network to join (networked sandboxes only).
    pub network: Option<String>,
    /// Bandwidth each way in Mbit/s (networked sandboxes only); `None`:
    /// the configured one.
    pub rate_mbit: Option<u32>,
}

/// Why a workspace operation failed; the API maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// A request field asks for something this host cannot do.
    #[error("{field}: {message}")]
    Unsupported {
        field: &'static str,
        message: String,
    },
    /// As many workspaces as allowed exist.
    #[error("{0} workspaces exist, the configured maximum; delete one or wait for a TTL")]
    TooMany(usize),
    /// No such workspace (never existed, deleted, or its TTL ended).
    #[error("no sandbox {0}: it never existed, was deleted, or its TTL ended")]
    Gone(String),
    /// The agent refused a file operation (missing file, bad path).
    #[error("{0}")]
    Refused(String),
    /// Making the sandbox or talking to it failed.
    #[error("{0}")]
    Internal(String),
}

/// Why a workspace ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    Ttl,
    Deleted,
    Exited,
    Shutdown,
}

/// The public description of a workspace.
#[derive(Debug, Clone, Serialize)]
pub struct WorkspaceInfo {
    pub id: String,
    pub template: String,
    /// Unix seconds.
    pub created_at: f64,
    pub expires_at: f64,
    pub ttl_s: f64,
    pub remove_on_exit: bool,
    pub allow_internet: bool,
    pub cpus: f64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub pids: u64,
    pub env: BTreeMap<String, String>,
    /// Manifest digest of the image its root is made of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// A live workspace.
pub struct Workspace {
    info: WorkspaceInfo,
    /// Ports proxied by the API (`http::ports`), in order.
    exposed: Mutex<std::collections::BTreeSet<u16>>,
    held: Mutex<Option<Arc<Held>>>,
    ended: watch::Sender<Option<EndReason>>,
    /// Its code contexts (long-lived interpreters).
    pub contexts: crate::contexts::ContextSet,
}

/// What `/v1/sandboxes/{id}/egress` shows.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkView {
    pub allow_internet: bool,
    /// The sandbox's address; absent when air-gapped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::Ipv4Addr>,
    /// The rules in force; absent when air-gapped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<kiln_sandbox::network::EgressSpec>,
    /// The private network joined.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Bandwidth each way, Mbit/s (0: unlimited); absent when air-gapped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_mbit: Option<u32>,
}

impl Workspace {
    pub fn info(&self) -> &WorkspaceInfo {
        &self.info
    }

    /// Exposes `port` through the API's proxy; the ports exposed now.
    pub fn expose(&self, port: u16) -> Result<Vec<u16>, String> {
        let held = self.held().map_err(|e| e.to_string())?;
        if held.network_info().is_none() {
            return Err(
                "this sandbox has no network; create it with allow_internet: true (egress {\"allow\": []} for no internet)".into(),
            );
        }
        let mut p = self.exposed.lock().unwrap_or_else(PoisonError::into_inner);
        p.insert(port);
        Ok(p.iter().copied().collect())
    }

    /// The ports exposed.
    pub fn exposed(&self) -> Vec<u16> {
        let p = self.exposed.lock().unwrap_or_else(PoisonError::into_inner);
        p.iter().copied().collect()
    }

    /// A connection to `port` inside the sandbox (for the proxy).
    pub async fn open_port(&self, port: u16) -> Result<std::net::TcpStream, WorkspaceError> {
        let held = self.held()?;
        tokio::task::spawn_blocking(move || held.open_port(port))
            .await
            .map_err(|e| WorkspaceError::Internal(e.to_string()))?
            .map_err(|e| WorkspaceError::Internal(e.to_string()))
    }

    /// The sandbox's network as it is now.
    pub fn network(&self) -> Result<NetworkView, WorkspaceError> {
        let n = self.held()?.network_info();
        Ok(NetworkView {
            allow_internet: n.is_some(),
            address: n.as_ref().map(|n| n.address),
            network: n.as_ref().and_then(|n| n.network.clone()),
            rate_mbit: n.as_ref().map(|n| n.rate_mbit),
            egress: n.map(|n| n.egress),
        })
    }

    /// Replaces the egress rules of a networked workspace.
    pub async fn set_egress(
        &self,
        rules: kiln_sandbox::network::EgressRules,
    ) -> Result<NetworkView, WorkspaceError> {
        let held = self.held()?;
        tokio::task::spawn_blocking(move || held.set_egress(rules))
            .await
            .map_err(|e| WorkspaceError::Internal(e.to_string()))?
            .map_err(|e| match e {
                // No network of Kiln's: the sandbox says so.
                SandboxError::Unsupported(message) => WorkspaceError::Unsupported {
                    field: "egress",
                    message,
                },
                e => WorkspaceError::Internal(format!("changing the egress rules: {e}")),
            })?;
        self.network()
    }

    pub(crate) fn held(&self) -> Result<Arc<Held>, WorkspaceError> {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| WorkspaceError::Gone(self.info.id.clone()))
    }

    /// Resolves when the workspace ends, with why.
    pub async fn ended(&self) -> EndReason {
        let mut rx = self.ended.subscribe();
        let why = match rx.wait_for(Option::is_some).await {
            Ok(r) => r.unwrap_or(EndReason::Deleted),
            Err(_) => EndReason::Deleted,
        };
        why
    }

    /// One sample of the sandbox's live figures; `None` once it ended.
    pub fn sample(&self) -> Option<LiveSample> {
        let held = self.held().ok()?;
        let s = live::sample(&held);
        // A sample that raced with the end reads a dying sandbox; drop it.
        self.held().ok().map(|_| s)
    }
}

struct Inner {
    images: Images,
    settings: WorkspaceSettings,
    backend: AnyBackend,
    runtimes: RuntimeTable,
    metrics: Metrics,
    by_id: Mutex<HashMap<String, Arc<Workspace>>>,
    /// Workspaces alive or being made; bounded by `settings.max`.
    slots: AtomicUsize,
}

/// Every workspace of this server. Cheap to clone.
#[derive(Clone)]
pub struct Workspaces {
    inner: Arc<Inner>,
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

impl Workspaces {
    pub fn new(
        settings: WorkspaceSettings,
        backend: AnyBackend,
        runtimes: RuntimeTable,
        metrics: Metrics,
        images: Images,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                images,
                settings,
                backend,
                runtimes,
                metrics,
                by_id: Mutex::new(HashMap::new()),
                slots: AtomicUsize::new(0),
            }),
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Workspace>>> {
        self.inner
            .by_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn runtimes(&self) -> &RuntimeTable {
        &self.inner.runtimes
    }

    pub fn settings(&self) -> &WorkspaceSettings {
        &self.inner.settings
    }

    /// Makes a sandbox for `req` and starts its TTL.
    pub async fn create(&self, req: WorkspaceRequest) -> Result<WorkspaceInfo, WorkspaceError> {
        let runtime = self
            .inner
            .runtimes
            .resolve(&req.template)
            .map_err(|e| WorkspaceError::Unsupported {
                field: "template",
                message: e.to_string(),
            })?
            .clone();
        let image_ref = req
            .image
            .clone()
            .or_else(|| self.inner.images.default_for(&runtime.name));
        let ready = match &image_ref {
            None => None,
            Some(r) => Some(self.inner.images.ready(r, &runtime).await.map_err(|e| {
                if e.is_callers() {
                    WorkspaceError::Unsupported {
                        field: "image",
                        message: e.to_string(),
                    }
                } else {
                    WorkspaceError::Internal(e.to_string())
                }
            })?),
        };
        let mut env = req.env;
        if let Some(r) = &ready {
            images::merge_env(&mut env, &r.env);
        }
        let image = ready.map(|r| r.root);
        self.reserve()?;
        let spec = SandboxSpec {
            memory_mb: req.memory_mb,
            pids: req.pids,
            cpu_millis: req.cpu_millis,
            disk_mb: req.disk_mb,
            warm: vec![runtime.name.clone()],
            allow_internet: req.allow_internet,
            background: false,
            image: image.clone(),
        };
        let jail = self.inner.backend.create(&spec).await.map_err(|e| match e {
            SandboxError::Unsupported(m) if req.allow_internet => WorkspaceError::Unsupported {
                field: "allow_internet",
                message: m,
            },
            e => WorkspaceError::Internal(format!("creating the sandbox: {e}")),
        });
        let jail = match jail {
            Ok(j) => j,
            Err(e) => {
                self.inner.slots.fetch_sub(1, Ordering::SeqCst);
                return Err(e);
            }
        };
        // Before anything runs in it: the sandbox's own rules replace the
        // configured ones its network started with.
        // Each step names the request field it serves: a backend that
        // cannot do it (no Kiln-managed network) is the client's 422.
        let mut configured: Result<(), (&'static str, SandboxError)> = Ok(());
        if let Some(rules) = req.egress {
            configured = jail.set_egress(rules).map_err(|e| ("egress", e));
        }
        if let (Ok(()), Some(name)) = (&configured, &req.network) {
            configured = jail.join_network(name).map_err(|e| ("network", e));
        }
        if let (Ok(()), Some(mbit)) = (&configured, req.rate_mbit) {
            configured = jail.set_rate_mbit(mbit).map_err(|e| ("rate_mbit", e));
        }
        if let Err((field, e)) = configured {
            jail.destroy().await;
            self.inner.slots.fetch_sub(1, Ordering::SeqCst);
            return Err(match e {
                SandboxError::Unsupported(message) => {
                    WorkspaceError::Unsupported { field, message }
                }
                e => WorkspaceError::Internal(format!("{field}: {e}")),
            });
        }
        let info = WorkspaceInfo {
            id: jail.id().to_string(),
            template: runtime.name.clone(),
            created_at: unix_now(),
            expires_at: unix_now() + req.ttl.as_secs_f64(),
            ttl_s: req.ttl.as_secs_f64(),
            remove_on_exit: req.remove_on_exit,
            allow_internet: req.allow_internet,
            cpus: req.cpu_millis as f64 / 1000.0,
            memory_mb: req.memory_mb,
            disk_mb: req.disk_mb,
            pids: req.pids,
            env,
            image: image.map(|i| i.digest),
        };
        Ok(self.insert(Held::Own(jail), info, req.ttl))
    }

    /// Keeps a job's sandbox as a workspace with the default TTL; `image`:
    /// the digest of the image its root is made of.
    pub async fn adopt(
        &self,
        held: Held,
        runtime: &str,
        image: Option<String>,
    ) -> Result<String, WorkspaceError> {
        if let Err(e) = self.reserve() {
            held.destroy().await;
            return Err(e);
        }
        let ttl = self.inner.settings.default_ttl;
        let d = kiln_protocol::Limits::default();
        let info = WorkspaceInfo {
            id: held.id().to_string(),
            template: runtime.to_owned(),
            created_at: unix_now(),
            expires_at: unix_now() + ttl.as_secs_f64(),
            ttl_s: ttl.as_secs_f64(),
            remove_on_exit: false,
            // A job's own networked sandbox keeps its network.
            allow_internet: held.network_info().is_some(),
            cpus: d.cpu_millis as f64 / 1000.0,
            memory_mb: d.memory_mb,
            disk_mb: d.disk_mb,
            pids: d.pids,
            env: BTreeMap::new(),
            image,
        };
        Ok(self.insert(held, info, ttl).id)
    }

    fn insert(&self, held: Held, info: WorkspaceInfo, ttl: Duration) -> WorkspaceInfo {
        let id = info.id.clone();
        let ws = Arc::new(Workspace {
            info: info.clone(),
            held: Mutex::new(Some(Arc::new(held))),
            ended: watch::Sender::new(None),
            exposed: Mutex::default(),
            contexts: Default::default(),
        });
        self.map().insert(id.clone(), ws);
        self.inner.metrics.set_workspaces(self.map().len());
        let me = self.clone();
        let span = tracing::info_span!("sandbox", id = %id);
        tokio::spawn(
            async move {
                tokio::time::sleep(ttl).await;
                if me.end(&id, EndReason::Ttl).await {
                    tracing::info!("workspace TTL ended; sandbox destroyed");
                }
            }
            .instrument(span),
        );
        info
    }

    /// Takes a workspace slot, or says that all are taken.
    fn reserve(&self) -> Result<(), WorkspaceError> {
        let max = self.inner.settings.max;
        self.inner
            .slots
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| ())
            .map_err(|_| WorkspaceError::TooMany(max))
    }

    pub fn get(&self, id: &str) -> Option<Arc<Workspace>> {
        self.map().get(id).cloned()
    }

    pub fn list(&self) -> Vec<WorkspaceInfo> {
        let mut v: Vec<_> = self.map().values().map(|w| w.info.clone()).collect();
        v.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
        v
    }

    /// Ends a workspace: kills everything in it at once, tells execs in
    /// flight why, and destroys the sandbox. `false` if it was already gone.
    pub async fn end(&self, id: &str, why: EndReason) -> bool {
        let Some(ws) = self.map().remove(id) else {
            return false;
        };
        self.inner.slots.fetch_sub(1, Ordering::SeqCst);
        self.inner.metrics.set_workspaces(self.map().len());
        let held = ws
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        ws.ended.send_replace(Some(why));
        let Some(held) = held else { return false };
        // Kill first, so that a running exec stops now, not when it yields.
        let h = held.clone();
        let _ = tokio::task::spawn_blocking(move || h.kill_now()).await;
        let mut held = held;
        for _ in 0..500 {
            match Arc::try_unwrap(held) {
                Ok(h) => {
                    h.destroy().await;
                    return true;
                }
                Err(h) => held = h,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // An exec still holds it; the last holder's drop tears it down.
        tracing::warn!(
            sandbox = id,
            "workspace still referenced after its end; dropping"
        );
        true
    }

    /// Ends every workspace (drain).
    pub async fn end_all(&self) {
        let ids: Vec<String> = self.map().keys().cloned().collect();
        for id in ids {
            self.end(&id, EndReason::Shutdown).await;
        }
    }

    /// Runs `spec` in the workspace. The workspace's env is the base of the
    /// exec's; the exec ends early (outcome `killed`) if the workspace does.
    pub async fn exec(
        &self,
        ws: &Arc<Workspace>,
        mut spec: JobSpec,
        sink: &mut dyn OutputSink,
    ) -> Result<JobResult, WorkspaceError> {
        let held = ws.held()?;
        let runtime = self
            .inner
            .runtimes
            .resolve(&spec.runtime)
            .map_err(|e| WorkspaceError::Unsupported {
                field: "runtime",
                message: e.to_string(),
            })?
            .clone();
        let mut env = ws.info.env.clone();
        env.append(&mut spec.env);
        spec.env = env;
        let id = spec.id.clone().unwrap_or_else(JobId::random);
        let warm_next = runtime.name == ws.info.template && runtime.warm.is_some();
        let mut ended = ws.ended.subscribe();
        let started = std::time::Instant::now();
        let result = tokio::select! {
            biased;
            why = crate::scheduler::until_some(&mut ended) => {
                let mut res = JobResult::internal(id.clone(), match why {
                    Some(EndReason::Ttl) => format!(
                        "the sandbox's TTL of {} s ended during the exec; the sandbox is gone",
                        ws.info.ttl_s
                    ),
                    Some(EndReason::Shutdown) => "the server shut down during the exec".to_owned(),
                    _ => "the sandbox was deleted during the exec".to_owned(),
                });
                res.outcome = Outcome::Killed;
                res.timings.run_ms = started.elapsed().as_secs_f64() * 1000.0;
                res.timings.total_ms = res.timings.run_ms;
                res
            }
            o = run_job(&**held, id.clone(), &runtime, &spec, warm_next, sink)
                .instrument(tracing::info_span!("sandbox", id = %ws.info.id, exec = %id)) => {
                let mut r = o.result;
                r.timings.total_ms = started.elapsed().as_secs_f64() * 1000.0;
                if o.poisoned {
                    drop(held);
                    self.end(&ws.info.id, EndReason::Exited).await;
                    return Ok(r);
                }
                r
            }
        };
        drop(held);
        if ws.info.remove_on_exit {
            self.end(&ws.info.id, EndReason::Exited).await;
        }
        Ok(result)
    }

    /// Writes a file under the workspace's `/work`.
    pub async fn put_file(
        &self,
        ws: &Workspace,
        path: &str,
        data: Vec<u8>,
    ) -> Result<(), WorkspaceError> {
        check_rel_path("path", path).map_err(|e| WorkspaceError::Unsupported {
            field: "path",
            message: e.message,
        })?;
        let held = ws.held()?;
        held.agent()
            .put_file(path, data, 0o644)
            .await
            .map_err(agent_error)
    }

    /// Reads a file under the workspace's `/work`.
    pub async fn get_file(&self, ws: &Workspace, path: &str) -> Result<Vec<u8>, WorkspaceError> {
        check_rel_path("path", path).map_err(|e| WorkspaceError::Unsupported {
            field: "path",
            message: e.message,
        })?;
        let held = ws.held()?;
        held.agent()
            .get_file(path, limits::MAX_FILE_BYTES as u64)
            .await
            .map_err(agent_error)
    }
}

fn agent_error(e: AgentError) -> WorkspaceError {
    match e {
        AgentError::Refused(m) => WorkspaceError::Refused(m),
        e => WorkspaceError::Internal(e.to_string()),
    }
}

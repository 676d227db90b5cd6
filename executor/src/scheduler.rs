//! The scheduler: every intake (HTTP, AMQP, CLI) hands its jobs here.
//!
//! Admission is bounded: at most `max_running` jobs run at once and at most
//! `queue_depth` more wait for a run slot; past that [`Scheduler::submit`]
//! answers [`AdmitError::Busy`] at once (the HTTP API's 429), so memory never
//! grows with the offered load. An admitted job waits for a run slot, leases
//! a sandbox for its runtime from the warm pool (or makes one when its
//! limits fit no template), runs with the host enforcing its deadline, and
//! afterwards (remove-on-exit) everything the job left is removed: a pooled
//! sandbox is reset in the background (its room destroyed and made anew)
//! and serves another job, any other one is destroyed. A submitter may ask
//! to keep the sandbox as a workspace instead. Every result carries where the time went
//! (`queued_ms`, `acquire_ms` + `warm|cold`, `run_ms`, `total_ms`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_protocol::{Acquire, JobId, JobResult, JobSpec, Outcome, Runtime, RuntimeTable};
use kiln_sandbox::network::EgressRules;
use kiln_sandbox::{
    run_job, AnyBackend, Backend, Capabilities, ImageRoot, Sandbox, SandboxError, SandboxSpec,
    Stream,
};

use crate::images::{self, Images};
use kiln_warmpool::{Pool, TemplateKey, TemplateSettings};
use tokio::sync::{watch, Semaphore};
use tracing::Instrument as _;

pub use crate::jobs::Retention;
pub use crate::jobs::{EventStream, OutputEvent, Phase};
use crate::jobs::{JobRecord, JobStore};
use crate::metrics::Metrics;
use crate::sandboxes::{self, Held, SandboxFactory};
use crate::workspaces::{WorkspaceSettings, Workspaces};

/// How the scheduler admits and runs jobs.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    /// Jobs running at once (each in its own sandbox).
    pub max_running: usize,
    /// Admitted jobs waiting for a run slot; beyond it, submit says Busy.
    pub queue_depth: usize,
    /// Runtimes that get a warm-pool template.
    pub pooled: Vec<String>,
    /// Idle sandboxes kept ready per pooled runtime.
    pub min_idle: usize,
    /// Oldest an idle pooled sandbox may get before it is replaced.
    pub max_idle_age: Duration,
    /// How long a job waits for a pooled sandbox when all are out.
    pub lease_timeout: Duration,
    /// Jobs a pooled sandbox serves, reset between them, before it is
    /// replaced.
    pub max_uses: u32,
    /// Finished results kept for `GET /v1/jobs/{id}`.
    pub retention: Retention,
    pub workspaces: WorkspaceSettings,
    /// The image store jobs' and sandboxes' `image` is looked up in, and
    /// its rules.
    pub images: kiln_sandbox::settings::ImagesSettings,
}

/// Where a job came from (a label on metrics and logs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum JobSource {
    #[default]
    Http,
    Amqp,
    Cli,
}

impl JobSource {
    pub fn as_str(self) -> &'static str {
        match self {
            JobSource::Http => "http",
            JobSource::Amqp => "amqp",
            JobSource::Cli => "cli",
        }
    }
}

/// How a job is to be run.
#[derive(Debug, Clone)]
pub struct SubmitOptions {
    /// Destroy the sandbox when the job ends (default). `false` keeps it as
    /// a workspace (see [`JobHandle::sandbox`]) until its TTL.
    pub remove_on_exit: bool,
    pub source: JobSource,
}

impl Default for SubmitOptions {
    fn default() -> Self {
        Self {
            remove_on_exit: true,
            source: JobSource::Http,
        }
    }
}

/// Why a job was not admitted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdmitError {
    /// The job is invalid here (unknown runtime, id already in use); the
    /// result says why, its message starting with the field's name.
    #[error("{}", .0.message.as_deref().unwrap_or("rejected"))]
    Rejected(Box<JobResult>),
    /// Every run slot and queue slot is taken; try again after `retry_after`.
    #[error("the server is at capacity; retry after {retry_after:?}")]
    Busy { retry_after: Duration },
    /// The server is draining and admits nothing more.
    #[error("the server is shutting down and admits no new jobs")]
    ShuttingDown,
}

/// An admitted job.
#[must_use = "a JobHandle is how the job's result is obtained"]
pub struct JobHandle {
    pub id: JobId,
    record: Arc<JobRecord>,
    sandbox: watch::Receiver<Option<String>>,
}

impl JobHandle {
    /// The job's result, once it finished. Always a result: failures of
    /// Kiln's own become outcome `internal`.
    pub async fn result(self) -> JobResult {
        self.record.wait().await
    }

    /// The job's output events, from its start (replayed) until `Exit`.
    pub fn events(&self) -> EventStream {
        self.record.events()
    }

    /// With `remove_on_exit = false`: the id of the workspace the job's
    /// sandbox became, once the job finished.
    pub fn sandbox(&self) -> Option<String> {
        self.sandbox.borrow().clone()
    }

    /// Like [`JobHandle::sandbox`], for reading after `result` consumed the
    /// handle.
    pub fn sandbox_watch(&self) -> watch::Receiver<Option<String>> {
        self.sandbox.clone()
    }
}

/// The bound on jobs in the system (queued + running): a counter that
/// never passes `bound`, so admission is a single atomic step that cannot
/// block.
#[derive(Debug)]
struct Admission {
    bound: usize,
    admitted: AtomicUsize,
}

impl Admission {
    fn new(bound: usize) -> Self {
        Self {
            bound,
            admitted: AtomicUsize::new(0),
        }
    }

    /// Takes a slot if one is free.
    fn try_admit(&self) -> bool {
        self.admitted
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.bound).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives a slot back (the job finished, or was refused after all).
    fn release(&self) {
        self.admitted.fetch_sub(1, Ordering::SeqCst);
    }

    fn admitted(&self) -> usize {
        self.admitted.load(Ordering::SeqCst)
    }

    fn free(&self) -> usize {
        self.bound.saturating_sub(self.admitted())
    }
}

struct Template {
    key: TemplateKey,
    spec: SandboxSpec,
    /// Digest of the image its sandboxes are rooted in (the runtime's
    /// default image), if any: only jobs in that image lease them.
    image: Option<String>,
}

struct Inner {
    settings: SchedulerSettings,
    runtimes: RuntimeTable,
    backend: AnyBackend,
    capabilities: Capabilities,
    pool: Pool<SandboxFactory>,
    templates: HashMap<String, Template>,
    run_slots: Semaphore,
    /// Jobs admitted and not finished (queued + running).
    admission: Admission,
    running: AtomicUsize,
    capacity: watch::Sender<usize>,
    shutting_down: AtomicBool,
    /// Set when the drain's grace ran out: jobs still running are stopped.
    hard_stop: watch::Sender<bool>,
    jobs: JobStore,
    workspaces: Workspaces,
    images: Images,
    metrics: Metrics,
    /// Moving average of a job's time in the system, in ms (for Retry-After).
    avg_total_ms: Mutex<f64>,
}

/// Admits and runs jobs. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl Scheduler {
    /// Sets up the pool templates (must run inside a tokio runtime).
    pub fn new(
        settings: SchedulerSettings,
        backend: AnyBackend,
        runtimes: RuntimeTable,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(settings.max_running >= 1, "max_running must be at least 1");
        let images = Images::new(&settings.images, &runtimes);
        let mut templates = HashMap::new();
        let mut specs = HashMap::new();
        for name in &settings.pooled {
            let rt = runtimes
                .resolve(name)
                .map_err(|e| anyhow::anyhow!("pool.runtimes: {e}"))?;
            let key = TemplateKey::new(rt.name.clone());
            let mut spec = sandboxes::spec_for(&kiln_protocol::Limits::default(), &rt.name);
            // Spares warm up at background CPU priority, so that refilling
            // the pool does not slow the jobs running meanwhile.
            spec.background = true;
            // A runtime with a default image keeps spares rooted in it
            // (unpacked now if need be).
            let image = match images.default_for(&rt.name) {
                None => None,
                Some(reference) => match images.ready_blocking(&reference, rt) {
                    Ok(ready) => {
                        spec.image = Some(ready.root.clone());
                        Some(ready.root.digest)
                    }
                    Err(e) => {
                        tracing::warn!("no pool spares of {}'s default image: {e}", rt.name);
                        continue;
                    }
                },
            };
            specs.insert(key.clone(), spec.clone());
            templates.insert(rt.name.clone(), Template { key, spec, image });
        }
        // A sandbox that cannot be reset (a microVM has no rooms to
        // replace) serves one job, instead of failing a recycle after each.
        let capabilities = backend.capabilities();
        let max_uses = if capabilities.reset {
            settings.max_uses
        } else {
            1
        };
        let pool = Pool::new(SandboxFactory::new(backend.clone(), specs));
        for t in templates.values() {
            pool.set_template(
                t.key.clone(),
                TemplateSettings {
                    min_idle: settings.min_idle,
                    // Idle and being-destroyed sandboxes count against the
                    // bound too; leave room for them above the run slots.
                    max_total: settings.max_running + settings.min_idle + 2,
                    replenish_concurrency: 2,
                    max_age: settings.max_idle_age,
                    // A reset replaces a sandbox's rooms, not its root: what
                    // a job wrote into an image root's writable layer would
                    // meet the next job. Such spares serve one job each.
                    max_uses: if t.image.is_some() { 1 } else { max_uses },
                    lease_timeout: settings.lease_timeout,
                    ..TemplateSettings::default()
                },
            )
            .map_err(|e| anyhow::anyhow!("pool settings for {}: {e}", t.key))?;
        }
        let free = settings.max_running + settings.queue_depth;
        let workspaces = Workspaces::new(
            settings.workspaces.clone(),
            backend.clone(),
            runtimes.clone(),
            metrics.clone(),
            images.clone(),
        );
        let inner = Inner {
            images,
            jobs: JobStore::new(settings.retention),
            run_slots: Semaphore::new(settings.max_running),
            admission: Admission::new(free),
            settings,
            runtimes,
            backend,
            capabilities,
            pool,
            templates,
            running: AtomicUsize::new(0),
            capacity: watch::Sender::new(free),
            shutting_down: AtomicBool::new(false),
            hard_stop: watch::Sender::new(false),
            workspaces,
            metrics,
            avg_total_ms: Mutex::new(100.0),
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// For a backend with templates: prepares (builds if missing or
    /// outdated) the template of every pooled runtime in the background,
    /// logging each step. Until one is published, sandboxes of its runtime
    /// are restored from an older template of the same kind or booted.
    pub fn prepare_templates(&self) {
        let inner = &self.inner;
        if !inner.capabilities.templates {
            return;
        }
        for (runtime, t) in &inner.templates {
            let (inner, runtime, spec) = (self.inner.clone(), runtime.clone(), t.spec.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                inner.metrics.template_started();
                let progress = |line: &str| tracing::info!(%runtime, "template: {line}");
                let result = inner.backend.prepare_template(&spec, &progress).await;
                let secs = started.elapsed().as_secs_f64();
                inner.metrics.template_finished(result.is_ok(), secs);
                match result {
                    Ok(t) => tracing::info!(%runtime, template = %t.id, secs, "template ready"),
                    Err(e) => tracing::error!(%runtime, "template could not be prepared: {e}"),
                }
            });
        }
    }

    /// Validates against the runtime table and admits. Never blocks: a full
    /// queue is an error.
    pub fn submit(&self, mut spec: JobSpec, opts: SubmitOptions) -> Result<JobHandle, AdmitError> {
        let inner = &self.inner;
        if inner.shutting_down.load(Ordering::SeqCst) {
            inner.metrics.rejected(opts.source, "shutting_down");
            return Err(AdmitError::ShuttingDown);
        }
        let id = spec.id.clone().unwrap_or_else(JobId::random);
        let runtime = match inner.runtimes.resolve(&spec.runtime) {
            Ok(r) => r.clone(),
            Err(e) => {
                inner.metrics.rejected(opts.source, "invalid");
                return Err(AdmitError::Rejected(Box::new(JobResult::rejected(
                    id,
                    format!("runtime: {e}"),
                ))));
            }
        };
        if spec.image.is_none() {
            spec.image = inner.images.default_for(&runtime.name);
        }
        // An image that is not stored, not allowed, or lacks the runtime,
        // is the caller's mistake: refused before admission.
        if let Some(Err(e)) = spec.image.as_ref().map(|i| inner.images.admit(i, &runtime)) {
            if e.is_callers() {
                inner.metrics.rejected(opts.source, "invalid");
                return Err(AdmitError::Rejected(Box::new(JobResult::rejected(
                    id,
                    e.to_string(),
                ))));
            }
        }
        // Egress rules that do not parse are refused before admission too.
        if let Some(Err(e)) = spec.egress.as_ref().map(EgressRules::parse) {
            inner.metrics.rejected(opts.source, "invalid");
            return Err(AdmitError::Rejected(Box::new(JobResult::rejected(
                id,
                format!("egress: {e}"),
            ))));
        }
        if !inner.admission.try_admit() {
            inner.metrics.rejected(opts.source, "busy");
            return Err(AdmitError::Busy {
                retry_after: self.retry_after(),
            });
        }
        let Some(record) = inner.jobs.insert(id.clone()) else {
            inner.admission.release();
            inner.metrics.rejected(opts.source, "invalid");
            return Err(AdmitError::Rejected(Box::new(JobResult::rejected(
                id.clone(),
                format!("id: a job with id {id:?} already exists; use another id or none"),
            ))));
        };
        self.publish_capacity();
        let (sandbox_tx, sandbox_rx) = watch::channel(None);
        let span = tracing::info_span!("job", id = %id, runtime = %runtime.name, source = opts.source.as_str());
        tokio::spawn(
            run(
                self.inner.clone(),
                record.clone(),
                spec,
                runtime,
                opts,
                sandbox_tx,
            )
            .instrument(span),
        );
        Ok(JobHandle {
            id,
            record,
            sandbox: sandbox_rx,
        })
    }

    /// Jobs that could be admitted right now without waiting (free run
    /// slots + free queue slots).
    pub fn free_capacity(&self) -> usize {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return 0;
        }
        self.inner.admission.free()
    }

    /// Changes whenever free_capacity changes.
    pub fn capacity_watch(&self) -> watch::Receiver<usize> {
        self.inner.capacity.subscribe()
    }

    fn publish_capacity(&self) {
        publish_capacity(&self.inner);
    }

    /// How long a refused client should wait: about the time the jobs ahead
    /// of it need to drain, from the recent average job time.
    fn retry_after(&self) -> Duration {
        let avg = *self
            .inner
            .avg_total_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let s = &self.inner.settings;
        let waves = (s.queue_depth as f64 / s.max_running as f64).max(1.0);
        Duration::from_millis((avg * waves) as u64)
            .clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Stop admitting; wait for in-flight jobs up to `grace`; destroy every
    /// sandbox.
    pub async fn drain(&self, grace: Duration) {
        let inner = &self.inner;
        inner.shutting_down.store(true, Ordering::SeqCst);
        self.publish_capacity();
        let deadline = tokio::time::Instant::now() + grace;
        let mut cap = inner.capacity.subscribe();
        while inner.admission.admitted() > 0 {
            if tokio::time::timeout_at(deadline, cap.changed())
                .await
                .is_err()
            {
                tracing::warn!(
                    in_flight = inner.admission.admitted(),
                    "drain grace ended with jobs in flight; stopping them"
                );
                inner.hard_stop.send_replace(true);
                let until = tokio::time::Instant::now() + Duration::from_secs(5);
                while inner.admission.admitted() > 0
                    && tokio::time::timeout_at(until, cap.changed()).await.is_ok()
                {}
                break;
            }
        }
        inner.workspaces.end_all().await;
        let report = inner.pool.shutdown(Duration::from_secs(10)).await;
        if !report.is_clean() {
            tracing::warn!(
                outstanding = report.outstanding,
                "sandboxes outstanding after drain"
            );
        }
    }

    pub fn runtimes(&self) -> &RuntimeTable {
        &self.inner.runtimes
    }

    /// A job admitted earlier (kept until its result expires).
    pub fn job(&self, id: &JobId) -> Option<Arc<JobRecord>> {
        self.inner.jobs.get(id)
    }

    /// The image store jobs and sandboxes are rooted from.
    pub fn images(&self) -> &Images {
        &self.inner.images
    }

    /// The workspaces (sandboxes kept for several execs).
    pub fn workspaces(&self) -> &Workspaces {
        &self.inner.workspaces
    }

    /// Ready for traffic: every pool template reached `min_idle` and no
    /// drain has begun.
    pub fn ready(&self) -> bool {
        !self.inner.shutting_down.load(Ordering::SeqCst) && self.inner.pool.ready()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// Registers the pool's metric families and the backend's own.
    pub fn register_pool_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.pool.register(registry);
        self.inner.backend.register_metrics(registry);
    }

    /// Jobs waiting for a run slot and jobs running.
    pub fn load(&self) -> (usize, usize) {
        let admitted = self.inner.admission.admitted();
        let running = self.inner.running.load(Ordering::SeqCst);
        (admitted.saturating_sub(running), running)
    }
}

fn publish_capacity(inner: &Inner) {
    let free = if inner.shutting_down.load(Ordering::SeqCst) {
        0
    } else {
        inner.admission.free()
    };
    inner.capacity.send_if_modified(|v| {
        let changed = *v != free;
        *v = free;
        changed
    });
    // Drain waits on changes of the admitted count even when capacity reads
    // 0 throughout; wake it explicitly.
    if inner.shutting_down.load(Ordering::SeqCst) {
        inner.capacity.send_modify(|_| {});
    }
    let (admitted, running) = (
        inner.admission.admitted(),
        inner.running.load(Ordering::SeqCst),
    );
    inner
        .metrics
        .set_load(admitted.saturating_sub(running), running);
}

/// Why a job got no sandbox.
#[derive(Debug)]
enum AcquireError {
    /// The job asked for what this server cannot give (a network where
    /// networking is off or the backend has none): the caller's to fix.
    Refused(String),
    /// Ours: the backend failed, or the server is stopping.
    Failed(String),
}

impl From<String> for AcquireError {
    fn from(e: String) -> Self {
        Self::Failed(e)
    }
}

impl From<&str> for AcquireError {
    fn from(e: &str) -> Self {
        Self::Failed(e.to_owned())
    }
}

fn acquire_failed(id: &JobId, e: AcquireError) -> JobResult {
    match e {
        AcquireError::Refused(m) => JobResult::rejected(id.clone(), m),
        AcquireError::Failed(m) => {
            JobResult::internal(id.clone(), format!("acquiring a sandbox: {m}"))
        }
    }
}

/// Leases a pooled sandbox for the job or makes one.
async fn acquire(
    inner: &Inner,
    runtime: &Runtime,
    spec: &JobSpec,
    image: Option<ImageRoot>,
) -> Result<(Held, Acquire), AcquireError> {
    // Spares are rooted in one image (or none): they serve jobs of the
    // same. They have no network: a job with `allow_internet` gets its own.
    let digest = image.as_ref().map(|i| i.digest.as_str());
    let pooled = inner
        .templates
        .get(&runtime.name)
        .filter(|t| !spec.allow_internet && t.image.as_deref() == digest);
    if let Some(t) = pooled {
        let resize = sandboxes::needs_resize(&t.spec, &spec.limits);
        // A job whose limits the template's sandboxes cannot take gets a
        // sandbox of its own rather than a pooled one thrown away.
        if sandboxes::fits(&t.spec, &spec.limits) && (!resize || inner.capabilities.resize) {
            let lease = inner
                .pool
                .lease(&t.key)
                .await
                .map_err(|e| crate::error_chain(&e))?;
            let how = match lease.acquire() {
                kiln_warmpool::Acquire::Warm => Acquire::Warm,
                kiln_warmpool::Acquire::Cold => Acquire::Cold,
            };
            lease.set_background(false);
            if !resize {
                return Ok((
                    Held::Leased {
                        lease,
                        restore: None,
                    },
                    how,
                ));
            }
            match lease.resize((&spec.limits).into()) {
                Ok(()) => {
                    let restore = Some(sandboxes::template_limits(&t.spec));
                    return Ok((Held::Leased { lease, restore }, how));
                }
                Err(e) => {
                    tracing::debug!("resizing a pooled sandbox failed ({e}); making one");
                    lease.discard();
                }
            }
        }
    }
    let mut sandbox_spec = sandboxes::spec_for(&spec.limits, &runtime.name);
    sandbox_spec.image = image;
    sandbox_spec.allow_internet = spec.allow_internet;
    // What the backend cannot do of a network the job asked for is the
    // caller's refusal; the egress rules are in force before it runs.
    let refused = |field: &str, e: SandboxError| match e {
        SandboxError::Unsupported(m) if spec.allow_internet => {
            AcquireError::Refused(format!("{field}: {m}"))
        }
        e => AcquireError::Failed(e.to_string()),
    };
    let sandbox = inner
        .backend
        .create(&sandbox_spec)
        .await
        .map_err(|e| refused("allow_internet", e))?;
    if let Some(egress) = &spec.egress {
        // Parsed at admission already; a failure here is not expected.
        let set = EgressRules::parse(egress)
            .map_err(|e| AcquireError::Refused(format!("egress: {e}")))
            .and_then(|rules| sandbox.set_egress(rules).map_err(|e| refused("egress", e)));
        if let Err(e) = set {
            sandbox.destroy().await;
            return Err(e);
        }
    }
    Ok((Held::Own(sandbox), Acquire::Cold))
}

/// One job's life after admission.
async fn run(
    inner: Arc<Inner>,
    record: Arc<JobRecord>,
    mut spec: JobSpec,
    runtime: Runtime,
    opts: SubmitOptions,
    sandbox_tx: watch::Sender<Option<String>>,
) {
    let start = Instant::now();
    let id = record.id.clone();
    let mut hard_stop = inner.hard_stop.subscribe();
    let stopped = |id: &JobId| {
        let mut r = JobResult::internal(id.clone(), "the server shut down before the job finished");
        r.outcome = Outcome::Killed;
        r
    };
    let result = async {
        let image = match spec.image.clone() {
            None => None,
            Some(reference) => match inner.images.ready(&reference, &runtime).await {
                Ok(ready) => {
                    images::merge_env(&mut spec.env, &ready.env);
                    Some(ready.root)
                }
                Err(e) if e.is_callers() => return JobResult::rejected(id.clone(), e.to_string()),
                Err(e) => return JobResult::internal(id.clone(), e.to_string()),
            },
        };
        let image_digest = image.as_ref().map(|i| i.digest.clone());
        let permit = tokio::select! {
            p = inner.run_slots.acquire() => match p {
                Ok(p) => p,
                Err(_) => return stopped(&id),
            },
            _ = until_true(&mut hard_stop) => return stopped(&id),
        };
        let queued = start.elapsed();
        inner.running.fetch_add(1, Ordering::SeqCst);
        publish_capacity(&inner);
        record.set_running();
        let acq_start = Instant::now();
        let acquired = tokio::select! {
            a = acquire(&inner, &runtime, &spec, image) => a,
            _ = until_true(&mut hard_stop) => Err(AcquireError::from("the server shut down")),
        };
        let acquire_d = acq_start.elapsed();
        let mut result = match acquired {
            Err(e) => acquire_failed(&id, e),
            Ok((held, how)) => {
                tracing::debug!(sandbox = %held.id(), acquire = ?how, "sandbox acquired");
                let sandbox_timings = held.start_timings();
                let rec = record.clone();
                let mut sink = move |s: Stream, d: &[u8]| {
                    let b = Bytes::copy_from_slice(d);
                    rec.push(match s {
                        Stream::Stdout => OutputEvent::Stdout(b),
                        Stream::Stderr => OutputEvent::Stderr(b),
                    });
                };
                let outcome = tokio::select! {
                    o = run_job(&*held, id.clone(), &runtime, &spec, false, &mut sink) => Some(o),
                    _ = until_true(&mut hard_stop) => None,
                };
                let mut result = match outcome {
                    Some(o) => {
                        let mut r = o.result;
                        if o.poisoned {
                            held.destroy().await;
                        } else if opts.remove_on_exit {
                            held.remove_job().await;
                        } else {
                            match inner
                                .workspaces
                                .adopt(held, &runtime.name, image_digest.clone())
                                .await
                            {
                                Ok(ws) => {
                                    sandbox_tx.send_replace(Some(ws.clone()));
                                    let note = format!("the sandbox is kept as workspace {ws}");
                                    r.message = Some(match r.message.take() {
                                        Some(m) => format!("{m}; {note}"),
                                        None => note,
                                    });
                                }
                                Err(e) => tracing::warn!("keeping the sandbox failed: {e}"),
                            }
                        }
                        r
                    }
                    None => {
                        held.destroy().await;
                        stopped(&id)
                    }
                };
                result.timings.acquire = Some(how);
                result.image = image_digest;
                if how == Acquire::Cold {
                    result.timings.sandbox = sandbox_timings;
                }
                result
            }
        };
        drop(permit);
        inner.running.fetch_sub(1, Ordering::SeqCst);
        result.timings.queued_ms = ms(queued);
        result.timings.acquire_ms = ms(acquire_d);
        result
    }
    .await;
    let mut result = result;
    result.timings.total_ms = ms(start.elapsed());
    {
        let mut avg = inner.avg_total_ms.lock().unwrap_or_else(|p| p.into_inner());
        *avg = *avg * 0.9 + result.timings.total_ms * 0.1;
    }
    inner.metrics.finished(opts.source, &result);
    tracing::info!(outcome = %result.outcome, total_ms = result.timings.total_ms, "job finished");
    record.finish(result);
    inner.jobs.finished(&id);
    inner.admission.release();
    publish_capacity(&inner);
}

/// Resolves once the watched flag is true (or its sender is gone).
pub(crate) async fn until_true(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves with the watched value once it is `Some` (`None` if the sender
/// is gone first).
pub(crate) async fn until_some<T: Clone>(rx: &mut watch::Receiver<Option<T>>) -> Option<T> {
    loop {
        let v = rx.borrow_and_update().clone();
        if v.is_some() {
            return v;
        }
        if rx.changed().await.is_err() {
            return None;
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_never_passes_its_bound_under_contention() {
        let a = Arc::new(Admission::new(5));
        let admitted: usize = std::thread::scope(|t| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let a = a.clone();
                    t.spawn(move || (0..100).filter(|_| a.try_admit()).count())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 5);
        assert_eq!(a.free(), 0);
        a.release();
        assert_eq!(a.free(), 1);
        assert!(a.try_admit());
        assert!(!a.try_admit());
    }

    #[tokio::test]
    async fn until_true_and_until_some_see_values_set_before_and_after() {
        let (tx, mut rx) = watch::channel(false);
        let waiter = tokio::spawn(async move { until_true(&mut rx).await });
        tx.send_replace(true);
        waiter.await.unwrap();
        let (tx, mut rx) = watch::channel(Some(3));
        assert_eq!(until_some(&mut rx).await, Some(3));
        drop(tx);
        let (tx, mut rx) = watch::channel::<Option<u8>>(None);
        drop(tx);
        assert_eq!(until_some(&mut rx).await, None);
    }
}

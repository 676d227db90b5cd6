//! Where the scheduler's sandboxes come from: the warm pool's [`Factory`]
//! over the configured backend (one template per runtime, sized by the
//! default limits; between two jobs a pooled sandbox is reset, see
//! `Sandbox::reset`), [`Held`], a sandbox that is either leased from the pool
//! or made on the spot for limits no template fits. What a backend can do
//! (reset, resize) the scheduler asks through `Backend::capabilities`.

use std::collections::HashMap;
use std::ops::Deref;
use std::time::Duration;

use kiln_protocol::Limits;
use kiln_sandbox::{AnyBackend, AnySandbox, Backend, Sandbox, SandboxError, SandboxSpec};
use kiln_warmpool::{Factory, Lease, TemplateKey};
use tracing::Instrument as _;

/// How long a pooled sandbox's agent may take to answer the health check
/// right before a lease; a healthy agent answers in well under a millisecond.
const CHECK_TIMEOUT: Duration = Duration::from_millis(500);

/// An idle sandbox whose agent spoke this recently (the answer to its reset,
/// or its handshake) over a connection that is still up passes the health
/// check without a ping: a dead agent closes the connection, and a job's
/// host-side deadline covers one that hangs in the meantime. The ping cost
/// a round trip and a wake-up of the daemon per job.
const HEARD_IS_HEALTHY: Duration = Duration::from_secs(1);

/// Makes the pool's sandboxes: `create` is the backend's create with the
/// template's spec (pre-warming its runtime, at background CPU weight),
/// `check` an agent ping, `recycle` the sandbox's reset, `destroy` the
/// sandbox's destroy.
///
/// A reset runs at the normal CPU weight: it is a few milliseconds of
/// work, and an A/B on the benchmark machine (6 interleaved rounds at c=1
/// and c=2) gave a lower p99 without the background weight (7.8 against
/// 9.2 ms at c=1) and 5% less daemon CPU per job, which no longer writes the
/// weight twice per job.
pub struct SandboxFactory {
    backend: AnyBackend,
    specs: HashMap<TemplateKey, SandboxSpec>,
}

impl SandboxFactory {
    pub fn new(backend: AnyBackend, specs: HashMap<TemplateKey, SandboxSpec>) -> Self {
        Self { backend, specs }
    }
}

impl Factory for SandboxFactory {
    type Item = AnySandbox;
    type Error = SandboxError;

    async fn create(&self, template: &TemplateKey) -> Result<AnySandbox, SandboxError> {
        let spec = self.specs.get(template).ok_or_else(|| {
            SandboxError::Unsupported(format!("no sandbox template named {template}"))
        })?;
        let span = tracing::info_span!("sandbox_create", template = %template);
        let sandbox = self.backend.create(spec).instrument(span).await?;
        tracing::debug!(sandbox = %sandbox.id(), template = %template, "pooled sandbox ready");
        Ok(sandbox)
    }

    async fn check(&self, item: &mut AnySandbox) -> bool {
        item.agent().heard_within(HEARD_IS_HEALTHY)
            || item.agent().ping(CHECK_TIMEOUT).await.is_ok()
    }

    async fn recycle(&self, template: &TemplateKey, item: &mut AnySandbox) -> bool {
        match item.reset().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(sandbox = %item.id(), template = %template, "reset failed, destroying the sandbox: {e}");
                false
            }
        }
    }

    async fn destroy(&self, item: AnySandbox) {
        let id = item.id().clone();
        item.destroy().await;
        tracing::debug!(sandbox = %id, "sandbox destroyed");
    }
}

/// A sandbox in use: leased from the pool, or owned outright.
pub enum Held {
    Leased {
        lease: Lease<SandboxFactory>,
        /// The template's limits, when the job's differed and the sandbox
        /// was resized for it: put back before it serves another job.
        restore: Option<Limits>,
    },
    Own(AnySandbox),
}

impl Deref for Held {
    type Target = AnySandbox;

    fn deref(&self) -> &AnySandbox {
        match self {
            Held::Leased { lease, .. } => lease,
            Held::Own(j) => j,
        }
    }
}

impl Held {
    /// Destroys the sandbox (a lease is discarded: the pool destroys it in
    /// the background; an owned one is destroyed before this returns).
    pub async fn destroy(self) {
        match self {
            Held::Leased { lease, .. } => lease.discard(),
            Held::Own(j) => j.destroy().await,
        }
    }

    /// Removes everything the finished job left. A pooled sandbox goes back
    /// to the pool, which resets it in the background (or destroys it when
    /// it is used up or the reset fails); an owned one is destroyed.
    pub async fn remove_job(self) {
        match self {
            Held::Leased { lease, restore } => {
                if let Some(limits) = restore {
                    if let Err(e) = lease.resize((&limits).into()) {
                        tracing::debug!("restoring a pooled sandbox's limits failed ({e})");
                        return lease.discard();
                    }
                }
                lease.recycle();
            }
            Held::Own(j) => j.destroy().await,
        }
    }
}

/// The spec of a sandbox sized for `limits`.
pub fn spec_for(limits: &Limits, runtime: &str) -> SandboxSpec {
    SandboxSpec::for_job(limits, runtime)
}

/// Whether a pooled sandbox made with `template` can serve a job with
/// `limits`: the work directory's size is fixed when the sandbox is made;
/// memory, pids and CPU are cgroup limits and can be changed on lease.
pub fn fits(template: &SandboxSpec, limits: &Limits) -> bool {
    template.disk_mb == limits.disk_mb
}

/// Whether a job with `limits` needs a sandbox of `template` resized.
pub fn needs_resize(template: &SandboxSpec, limits: &Limits) -> bool {
    template.memory_mb != limits.memory_mb
        || template.pids != limits.pids
        || template.cpu_millis != limits.cpu_millis
}

/// The limits a sandbox of `template` has when it is made.
pub fn template_limits(template: &SandboxSpec) -> Limits {
    Limits {
        memory_mb: template.memory_mb,
        pids: template.pids,
        cpu_millis: template.cpu_millis,
        disk_mb: template.disk_mb,
        ..Limits::default()
    }
}

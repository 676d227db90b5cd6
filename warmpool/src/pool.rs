//! The pool itself: per-template state behind one short-held lock each, the
//! background refill, the lease path (hit, miss, wait), the end of a lease
//! (destroy, return, recycle) and shutdown.
//!
//! Every create, health check, recycle and destroy happens outside the
//! locks, and creates, recycles and destroys run in their own spawned tasks
//! so that cancelling a lease never strands an item or a counter. The
//! counters always add up: `idle + busy + creating + recycling + destroying`
//! is what exists, and it never exceeds `max_total`.
//!
//! A recycle (~3 ms) is much cheaper than a create (30-50 ms), so a lease
//! that finds no idle item waits for an item being recycled rather than
//! create one, but only as many leases as there are items recycling
//! (`awaiting_recycle <= recycling` when they claim); the others create as
//! before. The refill likewise counts recycling items that no lease claimed
//! as on their way to idle.

use std::collections::{HashMap, VecDeque};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::runtime::Handle;
use tokio::sync::{oneshot, Notify};
use tokio::time::{timeout_at, Instant};
use tracing::{debug, info, warn};

use crate::lease::{Acquire, End, Lease};
use crate::metrics::{Metrics, Series, TemplateLabel};
use crate::{Factory, PoolError, SettingsError, TemplateKey, TemplateSettings};

/// A pool of ready items per template, generic over the [`Factory`] that
/// makes them. Cheap to clone: clones share one pool.
///
/// Call [`shutdown`](Pool::shutdown) before dropping the last clone: only it
/// destroys idle items through the factory.
pub struct Pool<F: Factory> {
    inner: Arc<Inner<F>>,
}

impl<F: Factory> Clone for Pool<F> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<F: Factory> std::fmt::Debug for Pool<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let templates = self.inner.lock_templates();
        f.debug_struct("Pool")
            .field("templates", &templates.by_key.keys().collect::<Vec<_>>())
            .field("shutting_down", &templates.shutting_down)
            .finish_non_exhaustive()
    }
}

/// A snapshot of one template's counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TemplateStats {
    /// Ready and waiting.
    pub idle: usize,
    /// Leased out, or being health-checked for a lease.
    pub busy: usize,
    /// Being created (by the refill or by a miss).
    pub creating: usize,
    /// Handed to [`Factory::recycle`] after their lease and not finished yet.
    pub recycling: usize,
    /// Handed to [`Factory::destroy`] and not finished yet.
    pub destroying: usize,
    /// Leases served warm.
    pub hits: u64,
    /// Leases that created their item on the spot.
    pub misses: u64,
    /// Items created.
    pub creates: u64,
    /// Creates that failed.
    pub create_failures: u64,
    /// Idle items that failed their health check.
    pub check_failures: u64,
    /// Recycles that made the item fresh (it went back to idle unless it
    /// aged out or shutdown began meanwhile).
    pub recycles: u64,
    /// Recycles that failed (the item was destroyed).
    pub recycle_failures: u64,
    /// Items destroyed.
    pub destroyed: u64,
}

impl TemplateStats {
    /// Items that exist now: `idle + busy + creating + recycling +
    /// destroying`.
    pub fn live(&self) -> usize {
        self.idle + self.busy + self.creating + self.recycling + self.destroying
    }
}

/// What [`Pool::shutdown`] left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Items still leased, being created, recycled or destroyed when the
    /// grace ran out. They are destroyed whenever they come back, if the
    /// runtime still runs.
    pub outstanding: usize,
}

impl ShutdownReport {
    /// Everything was destroyed within the grace.
    pub fn is_clean(&self) -> bool {
        self.outstanding == 0
    }
}

/// Why an item is destroyed; logged.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Retire {
    RemoveOnExit,
    MaxUses,
    MaxAge,
    CheckFailed,
    RecycleFailed,
    AboveMaxTotal,
    Shutdown,
}

/// An item with the facts that decide when it retires.
pub(crate) struct Pooled<I> {
    pub(crate) item: I,
    pub(crate) created_at: Instant,
    /// Leases served, including the current one.
    pub(crate) uses: u32,
}

pub(crate) struct Inner<F: Factory> {
    pub(crate) factory: F,
    handle: Handle,
    templates: Mutex<Templates<F::Item>>,
    /// Woken whenever an item stops existing; shutdown waits on it.
    drained: Notify,
    metrics: Metrics,
}

struct Templates<I> {
    by_key: HashMap<TemplateKey, Arc<Template<I>>>,
    shutting_down: bool,
}

pub(crate) struct Template<I> {
    pub(crate) key: TemplateKey,
    /// Its metric series (see [`Series`]).
    series: Series,
    state: Mutex<TemplateState<I>>,
    /// Woken when an item becomes idle or capacity frees up (and on
    /// shutdown); waiting leases re-check.
    available: Notify,
    /// Wakes the refill task (keeps a permit, so no wake-up is lost).
    refill: Notify,
}

struct TemplateState<I> {
    settings: TemplateSettings,
    idle: VecDeque<Pooled<I>>,
    busy: usize,
    creating: usize,
    /// The part of `creating` started by the refill (destined for idle).
    refilling: usize,
    /// Items in [`Factory::recycle`], destined for idle if it succeeds.
    recycling: usize,
    /// Leases waiting for a recycling item instead of creating one; a lease
    /// may only claim while this is below `recycling`.
    awaiting_recycle: usize,
    destroying: usize,
    hits: u64,
    misses: u64,
    creates: u64,
    create_failures: u64,
    check_failures: u64,
    recycles: u64,
    recycle_failures: u64,
    destroyed: u64,
    failure_streak: u32,
    backoff_until: Option<Instant>,
    /// Latched once `min_idle` was reached, so readiness does not flap
    /// while leases drain the idle set.
    warmed: bool,
    shutting_down: bool,
}

impl<I> TemplateState<I> {
    fn live(&self) -> usize {
        self.idle.len() + self.busy + self.creating + self.recycling + self.destroying
    }

    fn stats(&self) -> TemplateStats {
        TemplateStats {
            idle: self.idle.len(),
            busy: self.busy,
            creating: self.creating,
            recycling: self.recycling,
            destroying: self.destroying,
            hits: self.hits,
            misses: self.misses,
            creates: self.creates,
            create_failures: self.create_failures,
            check_failures: self.check_failures,
            recycles: self.recycles,
            recycle_failures: self.recycle_failures,
            destroyed: self.destroyed,
        }
    }

    fn expired(&self, pooled: &Pooled<I>, now: Instant) -> bool {
        now.saturating_duration_since(pooled.created_at) >= self.settings.max_age
    }

    /// Why an item whose lease ended may not serve again, if it may not.
    fn retirement(&self, pooled: &Pooled<I>, now: Instant) -> Option<Retire> {
        if self.shutting_down {
            Some(Retire::Shutdown)
        } else if pooled.uses >= self.settings.max_uses {
            Some(Retire::MaxUses)
        } else if self.expired(pooled, now) {
            Some(Retire::MaxAge)
        } else {
            None
        }
    }
}

impl<I> Template<I> {
    fn lock(&self) -> MutexGuard<'_, TemplateState<I>> {
        // The state is consistent between statements; a panic elsewhere
        // while holding the lock must not take the pool down with it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A waiting lease's place in `awaiting_recycle`: while held, the lease
/// waits for a recycling item instead of creating one. Taken and given back
/// under the template lock on every look; if the lease future is dropped
/// (cancelled, or returning after a timeout) while holding it, `Drop` gives
/// it back, so the count cannot leak.
struct RecycleClaim<'a, I> {
    template: &'a Template<I>,
    held: bool,
}

impl<'a, I> RecycleClaim<'a, I> {
    fn new(template: &'a Template<I>) -> Self {
        Self {
            template,
            held: false,
        }
    }

    /// Claims a recycling item; `state` is this template's, locked.
    fn hold(&mut self, state: &mut TemplateState<I>) {
        debug_assert!(!self.held && state.awaiting_recycle < state.recycling);
        state.awaiting_recycle += 1;
        self.held = true;
    }

    /// Gives the claim back, if held; `state` is this template's, locked.
    fn release(&mut self, state: &mut TemplateState<I>) {
        if self.held {
            state.awaiting_recycle -= 1;
            self.held = false;
        }
    }
}

impl<I> Drop for RecycleClaim<'_, I> {
    fn drop(&mut self) {
        if self.held {
            // Only reached outside the lock: every look releases the claim
            // first, so it is held only across the wait.
            self.template.lock().awaiting_recycle -= 1;
        }
    }
}

/// Who asked for a create, and so where the item goes.
enum CreateFor<F: Factory> {
    Refill,
    Lease {
        reply: oneshot::Sender<Result<Lease<F>, PoolError<F::Error>>>,
        started: Instant,
    },
}

/// What a lease does after looking at the state.
enum Step<I> {
    Check(Pooled<I>),
    Create,
    Wait,
}

impl<F: Factory> Pool<F> {
    /// A pool with no templates, spawning its tasks on the current tokio
    /// runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime; use [`Pool::with_handle`] there.
    pub fn new(factory: F) -> Self {
        Self::with_handle(factory, Handle::current())
    }

    /// A pool with no templates, spawning its tasks on `handle`.
    pub fn with_handle(factory: F, handle: Handle) -> Self {
        Self {
            inner: Arc::new(Inner {
                factory,
                handle,
                templates: Mutex::new(Templates {
                    by_key: HashMap::new(),
                    shutting_down: false,
                }),
                drained: Notify::new(),
                metrics: Metrics::default(),
            }),
        }
    }

    /// Adds a template, or changes the settings of one (items already out
    /// keep going; the refill adapts, trimming idle items above a lowered
    /// `max_total`). Starts the template's background refill.
    pub fn set_template(
        &self,
        key: TemplateKey,
        settings: TemplateSettings,
    ) -> Result<(), SettingsError> {
        settings.validate()?;
        let mut templates = self.inner.lock_templates();
        if let Some(template) = templates.by_key.get(&key) {
            let mut state = template.lock();
            state.settings = settings;
            self.inner.changed(template, &mut state);
            drop(state);
            template.refill.notify_one();
            return Ok(());
        }
        let shutting_down = templates.shutting_down;
        let template = Arc::new(Template {
            series: self.inner.metrics.series(&TemplateLabel::new(&key)),
            key: key.clone(),
            state: Mutex::new(TemplateState {
                warmed: settings.min_idle == 0,
                settings,
                idle: VecDeque::new(),
                busy: 0,
                creating: 0,
                refilling: 0,
                recycling: 0,
                awaiting_recycle: 0,
                destroying: 0,
                hits: 0,
                misses: 0,
                creates: 0,
                create_failures: 0,
                check_failures: 0,
                recycles: 0,
                recycle_failures: 0,
                destroyed: 0,
                failure_streak: 0,
                backoff_until: None,
                shutting_down,
            }),
            available: Notify::new(),
            refill: Notify::new(),
        });
        self.inner.publish(&template, &template.lock());
        templates.by_key.insert(key, Arc::clone(&template));
        if !shutting_down {
            self.inner
                .handle
                .spawn(refill(Arc::downgrade(&self.inner), template));
        }
        Ok(())
    }

    /// Leases an item of `key`, waiting at most the template's
    /// `lease_timeout` for capacity. See [`Pool::lease_within`].
    pub async fn lease(&self, key: &TemplateKey) -> Result<Lease<F>, PoolError<F::Error>> {
        let template = self.inner.template(key)?;
        let timeout = template.lock().settings.lease_timeout;
        self.lease_from(template, timeout).await
    }

    /// Leases an item of `key`:
    /// - a healthy idle item if there is one (warm; unhealthy ones are
    ///   destroyed on the way);
    /// - else, if items are being recycled that no other lease is waiting
    ///   for, waits for one of them (warm); if that recycle fails it decides
    ///   again, and if `timeout` passes first it decides again without
    ///   waiting for recycles;
    /// - else a new one created on the spot if the template is under
    ///   `max_total` (cold; the create runs to completion even past
    ///   `timeout`, since abandoning it would waste the work);
    /// - else waits up to `timeout` for an item to come back or capacity to
    ///   free up.
    ///
    /// Cancel-safe: dropping the future never loses an item or a claim on a
    /// recycling one.
    pub async fn lease_within(
        &self,
        key: &TemplateKey,
        timeout: Duration,
    ) -> Result<Lease<F>, PoolError<F::Error>> {
        let template = self.inner.template(key)?;
        self.lease_from(template, timeout).await
    }

    async fn lease_from(
        &self,
        template: Arc<Template<F::Item>>,
        timeout: Duration,
    ) -> Result<Lease<F>, PoolError<F::Error>> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut failed_checks = 0;
        let mut claim = RecycleClaim::new(&template);
        // Off once the deadline passed while waiting for a recycle: the
        // last look creates if there is room rather than fail the lease.
        let mut may_await_recycle = true;
        loop {
            // Registered before looking, so a wake-up between the look and
            // the wait is not lost.
            let mut available = pin!(template.available.notified());
            available.as_mut().enable();
            let (step, max_total) = {
                let mut state = template.lock();
                // Each look decides afresh whether to wait for a recycle.
                claim.release(&mut state);
                if state.shutting_down {
                    return Err(PoolError::ShuttingDown);
                }
                let now = Instant::now();
                let mut step = Step::Wait;
                let mut retired = false;
                while let Some(pooled) = state.idle.pop_front() {
                    if state.expired(&pooled, now) {
                        retired = true;
                        self.inner
                            .retire(&template, &mut state, pooled, Retire::MaxAge);
                    } else {
                        state.busy += 1;
                        step = Step::Check(pooled);
                        break;
                    }
                }
                if matches!(step, Step::Wait) {
                    if may_await_recycle && state.awaiting_recycle < state.recycling {
                        // A recycle is due in milliseconds, a create takes
                        // tens of them.
                        claim.hold(&mut state);
                    } else if state.live() < state.settings.max_total {
                        state.creating += 1;
                        state.misses += 1;
                        template.series.misses.inc();
                        step = Step::Create;
                    }
                }
                // Only a real change notifies: waking the other waiters (and
                // this lease's own registered wake-up) for nothing would spin.
                // A claim on a recycle is not such a change: no lease waits
                // for the claim count to move.
                if retired || !matches!(step, Step::Wait) {
                    self.inner.changed(&template, &mut state);
                }
                (step, state.settings.max_total)
            };
            match step {
                Step::Check(pooled) => {
                    // While the check runs the item is owned by a lease that
                    // returns it to idle if this future is dropped.
                    let mut lease = Lease::new(
                        Arc::clone(&self.inner),
                        Arc::clone(&template),
                        pooled,
                        Acquire::Warm,
                    );
                    lease.set_remove_on_exit(false);
                    template.refill.notify_one();
                    if self.inner.factory.check(&mut *lease).await {
                        return self.inner.confirm_hit(lease, started.elapsed());
                    }
                    failed_checks += 1;
                    self.inner.fail_check(lease);
                    if failed_checks >= max_total {
                        return Err(PoolError::Unhealthy {
                            template: template.key.clone(),
                            failed: failed_checks,
                        });
                    }
                }
                Step::Create => {
                    template.refill.notify_one();
                    let (reply, answer) = oneshot::channel();
                    self.inner
                        .spawn_create(&template, CreateFor::Lease { reply, started });
                    // The sender is only dropped unsent if the runtime
                    // stopped the create task.
                    return answer.await.unwrap_or(Err(PoolError::ShuttingDown));
                }
                Step::Wait => {
                    if timeout_at(deadline, available).await.is_err() {
                        if claim.held {
                            may_await_recycle = false;
                            continue;
                        }
                        return Err(PoolError::CapacityTimeout {
                            template: template.key.clone(),
                            waited: started.elapsed(),
                            max_total,
                        });
                    }
                }
            }
        }
    }

    /// A snapshot of one template's counts; `None` for an unknown key.
    pub fn stats(&self, key: &TemplateKey) -> Option<TemplateStats> {
        let template = self.inner.template(key).ok()?;
        let stats = template.lock().stats();
        Some(stats)
    }

    /// Every template has reached its `min_idle` at least once since it was
    /// added, and shutdown has not begun. Meant for `/readyz`: it latches per
    /// template so that a busy pool does not flap between ready and not.
    pub fn ready(&self) -> bool {
        let templates = self.inner.lock_templates();
        !templates.shutting_down && templates.by_key.values().all(|t| t.lock().warmed)
    }

    /// Registers the pool's metrics (per-template series) in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        self.inner.metrics.register(registry);
    }

    /// Stops the refill, refuses new leases, destroys every idle item, and
    /// waits up to `grace` for leased items, and creates and recycles in
    /// flight, to come back and be destroyed. Idempotent.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let deadline = Instant::now() + grace;
        let templates: Vec<_> = {
            let mut templates = self.inner.lock_templates();
            templates.shutting_down = true;
            templates.by_key.values().cloned().collect()
        };
        for template in &templates {
            let mut state = template.lock();
            state.shutting_down = true;
            while let Some(pooled) = state.idle.pop_front() {
                self.inner
                    .retire(template, &mut state, pooled, Retire::Shutdown);
            }
            self.inner.changed(template, &mut state);
            drop(state);
            template.refill.notify_one();
        }
        loop {
            let mut drained = pin!(self.inner.drained.notified());
            drained.as_mut().enable();
            let outstanding: usize = templates.iter().map(|t| t.lock().live()).sum();
            if outstanding == 0 {
                info!("sandbox pool shut down cleanly");
                return ShutdownReport { outstanding };
            }
            if timeout_at(deadline, drained).await.is_err() {
                let outstanding = templates.iter().map(|t| t.lock().live()).sum();
                warn!(
                    outstanding,
                    ?grace,
                    "sandbox pool shutdown grace ran out with sandboxes still out"
                );
                return ShutdownReport { outstanding };
            }
        }
    }
}

impl<F: Factory> Inner<F> {
    fn lock_templates(&self) -> MutexGuard<'_, Templates<F::Item>> {
        self.templates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn template(&self, key: &TemplateKey) -> Result<Arc<Template<F::Item>>, PoolError<F::Error>> {
        self.lock_templates()
            .by_key
            .get(key)
            .cloned()
            .ok_or_else(|| PoolError::UnknownTemplate {
                template: key.clone(),
            })
    }

    /// Publishes the gauges, latches readiness and wakes whoever waits for
    /// the state to change. Call after every change, under the lock.
    fn changed(&self, template: &Template<F::Item>, state: &mut TemplateState<F::Item>) {
        if state.idle.len() >= state.settings.min_idle {
            state.warmed = true;
        }
        self.publish(template, state);
        template.available.notify_waiters();
        self.drained.notify_waiters();
    }

    fn publish(&self, template: &Template<F::Item>, state: &TemplateState<F::Item>) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        template.series.idle.set(gauge(state.idle.len()));
        template.series.busy.set(gauge(state.busy));
        template.series.recycling.set(gauge(state.recycling));
    }

    /// Hands an item to the factory for destruction, in its own task.
    fn retire(
        self: &Arc<Self>,
        template: &Arc<Template<F::Item>>,
        state: &mut TemplateState<F::Item>,
        pooled: Pooled<F::Item>,
        reason: Retire,
    ) {
        state.destroying += 1;
        debug!(template = %template.key, ?reason, uses = pooled.uses, "destroying sandbox");
        let inner = Arc::clone(self);
        let template = Arc::clone(template);
        self.handle.spawn(async move {
            inner.factory.destroy(pooled.item).await;
            let mut state = template.lock();
            state.destroying -= 1;
            state.destroyed += 1;
            template.series.destroys.inc();
            inner.changed(&template, &mut state);
            drop(state);
            template.refill.notify_one();
        });
    }

    /// Takes back a leased item as its lease ended: to destruction if asked
    /// or if it may not serve again, else to idle, directly or through a
    /// recycle.
    pub(crate) fn give_back(
        self: &Arc<Self>,
        template: &Arc<Template<F::Item>>,
        pooled: Pooled<F::Item>,
        end: End,
    ) {
        let mut state = template.lock();
        state.busy -= 1;
        let retire = match end {
            End::Destroy => Some(Retire::RemoveOnExit),
            End::Return | End::Recycle => state.retirement(&pooled, Instant::now()),
        };
        match (retire, end) {
            (Some(reason), _) => self.retire(template, &mut state, pooled, reason),
            (None, End::Recycle) => self.spawn_recycle(template, &mut state, pooled),
            (None, _) => state.idle.push_back(pooled),
        }
        self.changed(template, &mut state);
        drop(state);
        template.refill.notify_one();
    }

    /// Resets an item in its own task, so that neither a lock nor a
    /// cancellation is involved while the factory works, then puts it back
    /// to idle (at the back, like a returned item) or, if the reset failed
    /// or the item aged out or shutdown began meanwhile, destroys it.
    fn spawn_recycle(
        self: &Arc<Self>,
        template: &Arc<Template<F::Item>>,
        state: &mut TemplateState<F::Item>,
        mut pooled: Pooled<F::Item>,
    ) {
        state.recycling += 1;
        debug!(template = %template.key, uses = pooled.uses, "recycling sandbox");
        let inner = Arc::clone(self);
        let template = Arc::clone(template);
        self.handle.spawn(async move {
            let begun = Instant::now();
            let fresh = inner.factory.recycle(&template.key, &mut pooled.item).await;
            let took = begun.elapsed();
            let mut state = template.lock();
            state.recycling -= 1;
            if fresh {
                state.recycles += 1;
                template.series.recycles.inc();
                template.series.recycle_seconds.observe(took.as_secs_f64());
                debug!(template = %template.key, ?took, "recycled sandbox");
                // `uses` is unchanged since `give_back` chose to recycle, so
                // of the retirements only shutdown and age can apply now.
                match state.retirement(&pooled, Instant::now()) {
                    Some(reason) => inner.retire(&template, &mut state, pooled, reason),
                    None => state.idle.push_back(pooled),
                }
            } else {
                state.recycle_failures += 1;
                template.series.recycle_failures.inc();
                // The factory says why (the pool only learns that it failed).
                debug!(
                    template = %template.key,
                    ?took,
                    "recycling a sandbox failed; destroying it"
                );
                inner.retire(&template, &mut state, pooled, Retire::RecycleFailed);
            }
            // Wakes the leases waiting for this recycle, which take the item
            // or, if it is gone, decide again.
            inner.changed(&template, &mut state);
            drop(state);
            template.refill.notify_one();
        });
    }

    fn confirm_hit(
        &self,
        mut lease: Lease<F>,
        waited: Duration,
    ) -> Result<Lease<F>, PoolError<F::Error>> {
        let template = Arc::clone(lease.template_state());
        let mut state = template.lock();
        if state.shutting_down {
            drop(state);
            // Dropped with remove_on_exit off: give_back destroys it.
            return Err(PoolError::ShuttingDown);
        }
        state.hits += 1;
        template.series.hits.inc();
        drop(state);
        lease.start(waited);
        Ok(lease)
    }

    fn fail_check(self: &Arc<Self>, mut lease: Lease<F>) {
        let template = Arc::clone(lease.template_state());
        let pooled = lease.take();
        let mut state = template.lock();
        warn!(template = %template.key, "idle sandbox failed its health check");
        state.busy -= 1;
        state.check_failures += 1;
        self.retire(&template, &mut state, pooled, Retire::CheckFailed);
        self.changed(&template, &mut state);
    }

    /// Creates an item in its own task, so that neither a cancelled lease
    /// nor a lock is involved while the factory works. The caller has
    /// already counted it in `creating` (and `refilling`).
    fn spawn_create(self: &Arc<Self>, template: &Arc<Template<F::Item>>, purpose: CreateFor<F>) {
        let inner = Arc::clone(self);
        let template = Arc::clone(template);
        self.handle.spawn(async move {
            let begun = Instant::now();
            let result = inner.factory.create(&template.key).await;
            // Whatever happens next changes what the refill should do.
            template.refill.notify_one();
            let mut state = template.lock();
            state.creating -= 1;
            if matches!(purpose, CreateFor::Refill) {
                state.refilling -= 1;
            }
            let item = match result {
                Ok(item) => item,
                Err(error) => {
                    state.create_failures += 1;
                    state.failure_streak = state.failure_streak.saturating_add(1);
                    let backoff = state.settings.backoff(state.failure_streak);
                    state.backoff_until = Some(Instant::now() + backoff);
                    template.series.create_failures.inc();
                    warn!(
                        template = %template.key,
                        %error,
                        streak = state.failure_streak,
                        ?backoff,
                        "creating a sandbox failed"
                    );
                    inner.changed(&template, &mut state);
                    drop(state);
                    template.refill.notify_one();
                    if let CreateFor::Lease { reply, .. } = purpose {
                        let _ = reply.send(Err(PoolError::CreateFailed {
                            template: template.key.clone(),
                            source: error,
                        }));
                    }
                    return;
                }
            };
            let took = begun.elapsed();
            state.creates += 1;
            state.failure_streak = 0;
            state.backoff_until = None;
            template.series.creates.inc();
            template.series.create_seconds.observe(took.as_secs_f64());
            debug!(template = %template.key, ?took, "created sandbox");
            let pooled = Pooled {
                item,
                created_at: Instant::now(),
                uses: 0,
            };
            if state.shutting_down {
                inner.retire(&template, &mut state, pooled, Retire::Shutdown);
                inner.changed(&template, &mut state);
                drop(state);
                if let CreateFor::Lease { reply, .. } = purpose {
                    let _ = reply.send(Err(PoolError::ShuttingDown));
                }
                return;
            }
            match purpose {
                CreateFor::Refill => {
                    state.idle.push_back(pooled);
                    inner.changed(&template, &mut state);
                }
                CreateFor::Lease { reply, started } => {
                    state.busy += 1;
                    inner.changed(&template, &mut state);
                    drop(state);
                    let mut lease = Lease::new(
                        Arc::clone(&inner),
                        Arc::clone(&template),
                        pooled,
                        Acquire::Cold,
                    );
                    lease.start(started.elapsed());
                    if let Err(Ok(unclaimed)) = reply.send(Ok(lease)) {
                        // The lease was cancelled: the fresh item goes idle.
                        unclaimed.into_idle();
                    }
                }
            }
        });
    }
}

impl<F: Factory> Drop for Inner<F> {
    fn drop(&mut self) {
        let templates = self
            .templates
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let idle: usize = templates.by_key.values().map(|t| t.lock().idle.len()).sum();
        if idle > 0 {
            warn!(
                idle,
                "sandbox pool dropped without shutdown: idle sandboxes are dropped, not destroyed by the factory"
            );
        }
    }
}

/// The background refill of one template: keeps `idle + refilling +
/// recycling >= min_idle` within `max_total`, at most
/// `replenish_concurrency` creates at once, pausing after create failures;
/// retires idle items past `max_age` and idle items above a lowered
/// `max_total`. Holds the pool weakly, so it
/// ends with the pool or at shutdown.
async fn refill<F: Factory>(pool: Weak<Inner<F>>, template: Arc<Template<F::Item>>) {
    loop {
        let wake = template.refill.notified();
        let next = {
            let Some(inner) = pool.upgrade() else { return };
            let mut state = template.lock();
            if state.shutting_down {
                return;
            }
            let now = Instant::now();
            let excess = state.live().saturating_sub(state.settings.max_total);
            for _ in 0..excess {
                let Some(pooled) = state.idle.pop_front() else {
                    break;
                };
                inner.retire(&template, &mut state, pooled, Retire::AboveMaxTotal);
            }
            let (expired, fresh): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut state.idle)
                .into_iter()
                .partition(|pooled| state.expired(pooled, now));
            state.idle = fresh;
            for pooled in expired {
                inner.retire(&template, &mut state, pooled, Retire::MaxAge);
            }

            let backing_off = state.backoff_until.filter(|until| *until > now);
            let wanted = state
                .settings
                .min_idle
                // A recycle that a waiting lease has claimed goes to that
                // lease, not to idle. (Claims are given back after their
                // recycle ended, so for a moment they can outnumber it.)
                .saturating_sub(
                    state.idle.len()
                        + state.refilling
                        + state.recycling.saturating_sub(state.awaiting_recycle),
                );
            let starts = if backing_off.is_some() {
                0
            } else {
                wanted
                    .min(
                        state
                            .settings
                            .replenish_concurrency
                            .saturating_sub(state.refilling),
                    )
                    .min(state.settings.max_total.saturating_sub(state.live()))
            };
            for _ in 0..starts {
                state.creating += 1;
                state.refilling += 1;
                inner.spawn_create(&template, CreateFor::Refill);
            }
            inner.changed(&template, &mut state);

            let oldest_expiry = state
                .idle
                .iter()
                .map(|pooled| pooled.created_at + state.settings.max_age)
                .min();
            let backoff_end = backing_off.filter(|_| wanted > 0);
            match (oldest_expiry, backoff_end) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        match next {
            Some(at) => {
                let _ = timeout_at(at, wake).await;
            }
            None => wake.await,
        }
    }
}

//! A leased item. The guard cannot be forgotten: dropping it destroys the
//! item or returns it to the pool, as `remove_on_exit` says, so no code path
//! leaks a sandbox. Ending it with [`Lease::recycle`] asks the pool to reset
//! the item and keep it instead.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use crate::pool::{Inner, Pooled, Template};
use crate::{Factory, TemplateKey};

/// How a lease got its item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// A healthy idle item (a hit).
    Warm,
    /// Created on the spot because none was idle (a miss).
    Cold,
}

/// How a lease ends, and so where its item goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Destroyed, whatever the settings say.
    Destroy,
    /// Back to idle as it is, unless it is retired (used up, too old,
    /// shutting down).
    Return,
    /// Reset by [`Factory::recycle`] in the background, then back to idle,
    /// unless it is retired first or the reset fails.
    Recycle,
}

/// An item leased from a [`Pool`](crate::Pool); derefs to the item.
///
/// A lease ends in one of three ways:
/// - dropped or [`release`](Lease::release)d: the item is destroyed if
///   `remove_on_exit` is set (the default), else it goes back to idle as it
///   is;
/// - [`discard`](Lease::discard)ed: the item is destroyed;
/// - [`recycle`](Lease::recycle)d: the item is reset by
///   [`Factory::recycle`] in the background and then goes back to idle
///   (destroyed if the reset fails).
///
/// Either way an item that has served `max_uses` leases or outlived
/// `max_age`, or whose pool is shutting down, is destroyed instead of being
/// kept. Destruction and recycling run in spawned tasks, never in `Drop`
/// itself.
#[must_use = "dropping a Lease at once destroys the sandbox (or returns it to the pool)"]
pub struct Lease<F: Factory> {
    /// `Some` for the whole life of the lease; taken when it ends.
    pooled: Option<Pooled<F::Item>>,
    inner: Arc<Inner<F>>,
    template: Arc<Template<F::Item>>,
    acquire: Acquire,
    acquire_duration: Duration,
    remove_on_exit: bool,
}

impl<F: Factory> Lease<F> {
    pub(crate) fn new(
        inner: Arc<Inner<F>>,
        template: Arc<Template<F::Item>>,
        pooled: Pooled<F::Item>,
        acquire: Acquire,
    ) -> Self {
        Self {
            pooled: Some(pooled),
            inner,
            template,
            acquire,
            acquire_duration: Duration::ZERO,
            remove_on_exit: true,
        }
    }

    /// Marks the item handed out: one more use, remove-on-exit by default.
    pub(crate) fn start(&mut self, acquire_duration: Duration) {
        self.pooled_mut().uses += 1;
        self.acquire_duration = acquire_duration;
        self.remove_on_exit = true;
    }

    /// Puts a just-created item that nobody claimed into idle, unused.
    pub(crate) fn into_idle(mut self) {
        let pooled = self.pooled_mut();
        pooled.uses = pooled.uses.saturating_sub(1);
        self.remove_on_exit = false;
    }

    pub(crate) fn template_state(&self) -> &Arc<Template<F::Item>> {
        &self.template
    }

    /// Ends the lease without giving the item back; the caller accounts
    /// for it.
    pub(crate) fn take(&mut self) -> Pooled<F::Item> {
        self.pooled
            .take()
            .expect("a lease holds its item until it ends")
    }

    fn pooled(&self) -> &Pooled<F::Item> {
        self.pooled
            .as_ref()
            .expect("a lease holds its item until it ends")
    }

    fn pooled_mut(&mut self) -> &mut Pooled<F::Item> {
        self.pooled
            .as_mut()
            .expect("a lease holds its item until it ends")
    }

    /// The template the item belongs to.
    pub fn template(&self) -> &TemplateKey {
        &self.template.key
    }

    /// Whether the item was idle (warm) or created for this lease (cold).
    pub fn acquire(&self) -> Acquire {
        self.acquire
    }

    /// From the call to `lease` until the item was handed out, including
    /// waiting, health checks and a cold create.
    pub fn acquire_duration(&self) -> Duration {
        self.acquire_duration
    }

    /// Leases this item has served, this one included.
    pub fn uses(&self) -> u32 {
        self.pooled().uses
    }

    /// Time since the item was created.
    pub fn age(&self) -> Duration {
        self.pooled().created_at.elapsed()
    }

    /// Whether dropping or releasing the lease destroys the item (default
    /// `true`). [`discard`](Lease::discard) and [`recycle`](Lease::recycle)
    /// ignore it.
    pub fn remove_on_exit(&self) -> bool {
        self.remove_on_exit
    }

    /// `false` lets the item go back to idle as it is when the lease is
    /// dropped or released, within `max_uses` and `max_age`.
    pub fn set_remove_on_exit(&mut self, remove_on_exit: bool) {
        self.remove_on_exit = remove_on_exit;
    }

    /// Ends the lease: destroys the item if `remove_on_exit` is set or it is
    /// used up or too old, else returns it to idle as it is. Same as
    /// dropping it, said out loud.
    pub fn release(self) {}

    /// Ends the lease and destroys the item, whatever `remove_on_exit` says
    /// (e.g. the job broke the sandbox).
    pub fn discard(mut self) {
        self.end(End::Destroy);
    }

    /// Ends the lease and has the item reset for the next one, whatever
    /// `remove_on_exit` says: [`Factory::recycle`] runs in a task the pool
    /// spawns and the item goes back to idle when it succeeds. It is
    /// destroyed instead, without a reset, if it has served `max_uses`
    /// leases, outlived `max_age` or the pool is shutting down; and after
    /// the reset if that failed or the item aged out or shutdown began
    /// meanwhile. Returns at once.
    pub fn recycle(mut self) {
        self.end(End::Recycle);
    }

    /// Gives the item back to the pool, once.
    fn end(&mut self, end: End) {
        if let Some(pooled) = self.pooled.take() {
            self.inner.give_back(&self.template, pooled, end);
        }
    }
}

impl<F: Factory> Deref for Lease<F> {
    type Target = F::Item;

    fn deref(&self) -> &F::Item {
        &self.pooled().item
    }
}

impl<F: Factory> DerefMut for Lease<F> {
    fn deref_mut(&mut self) -> &mut F::Item {
        &mut self.pooled_mut().item
    }
}

impl<F: Factory> Drop for Lease<F> {
    fn drop(&mut self) {
        let end = if self.remove_on_exit {
            End::Destroy
        } else {
            End::Return
        };
        self.end(end);
    }
}

impl<F: Factory> fmt::Debug for Lease<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("template", &self.template.key)
            .field("acquire", &self.acquire)
            .field("acquire_duration", &self.acquire_duration)
            .field("uses", &self.pooled.as_ref().map(|p| p.uses))
            .field("remove_on_exit", &self.remove_on_exit)
            .finish_non_exhaustive()
    }
}

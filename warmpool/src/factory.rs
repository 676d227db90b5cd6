//! What the pool asks of a backend: make a ready item for a template, check it
//! is still healthy just before it is handed out, reset it after a lease so
//! it can serve another (optional), and destroy it. The pool never sees a
//! jail or a microVM, only this trait, so its bookkeeping is tested once, in
//! the crate's tests, with a small factory of numbered items.

use std::fmt;
use std::future::Future;

/// Names a template: the pool keeps a separate set of items, settings and
/// metrics per key (e.g. `python-3.12`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TemplateKey(String);

impl TemplateKey {
    /// Wraps a template name.
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The template name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TemplateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for TemplateKey {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl From<String> for TemplateKey {
    fn from(name: String) -> Self {
        Self(name)
    }
}

/// Makes, checks, recycles and destroys the pooled items. The executor
/// implements it over a sandbox backend.
///
/// Contract:
/// - `create`, `recycle` and `destroy` run in tasks the pool spawns on its
///   runtime ([`Pool::new`](crate::Pool::new)); `check` runs in the task that
///   called [`Pool::lease`](crate::Pool::lease). Calls for the same template
///   run concurrently, on up to `max_total` items at once, but never two
///   calls on the same item.
/// - Every item returned by [`create`](Factory::create) is eventually passed
///   to [`destroy`](Factory::destroy) exactly once, whether or not it was
///   recycled in between, unless the pool is dropped without
///   [`Pool::shutdown`](crate::Pool::shutdown) or the runtime stops first
///   (then the item is simply dropped).
/// - The pool never cancels `create`, `recycle` or `destroy` once started
///   (they run in their own tasks), so a half-made or half-reset item cannot
///   leak through cancellation.
/// - [`recycle`](Factory::recycle) is only called for an item whose lease
///   ended with [`Lease::recycle`](crate::Lease::recycle) and that is not
///   due to retire (`max_uses`, `max_age`, shutdown). While it runs the item
///   counts towards `max_total` and nobody else holds it. A recycled item
///   keeps its age and its use count, and is health-checked by
///   [`check`](Factory::check) like any idle item before its next lease.
pub trait Factory: Send + Sync + 'static {
    /// The pooled thing, e.g. a started sandbox with its agent connected.
    type Item: Send + 'static;
    /// Why `create` failed; handed to the caller of a cold lease as the
    /// source of [`PoolError::CreateFailed`](crate::PoolError::CreateFailed).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Makes a ready item for `template`. Called by the background refill and
    /// by a lease that finds no idle item (a miss).
    fn create(
        &self,
        template: &TemplateKey,
    ) -> impl Future<Output = Result<Self::Item, Self::Error>> + Send;

    /// A cheap health check right before an idle item is handed out (e.g. an
    /// agent ping). `false` makes the pool destroy the item and try the next
    /// one. It must bound its own time: the pool waits for the answer.
    fn check(&self, item: &mut Self::Item) -> impl Future<Output = bool> + Send;

    /// Makes an item whose lease ended as fresh as a newly created one: the
    /// previous lease's traces (processes, files, memory, network state) are
    /// gone. `true` when it did, and the item goes back to idle; `false`
    /// makes the pool destroy it. Runs in a task the pool spawns; it must
    /// bound its own time, since the item (and any lease waiting for it) is
    /// held until it answers.
    ///
    /// `max_uses` above 1 is only safe because of this guarantee: answer
    /// `true` only if the reset was verified.
    ///
    /// The default answers `false`: a factory that cannot reset has every
    /// recycled item destroyed.
    fn recycle(
        &self,
        template: &TemplateKey,
        item: &mut Self::Item,
    ) -> impl Future<Output = bool> + Send {
        let _ = (template, item);
        async { false }
    }

    /// Destroys an item and everything it left on the host. It cannot fail:
    /// the factory logs what it could not clean up.
    fn destroy(&self, item: Self::Item) -> impl Future<Output = ()> + Send;
}

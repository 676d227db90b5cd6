//! Why a lease failed.

use std::time::Duration;

use crate::TemplateKey;

/// Why [`Pool::lease`](crate::Pool::lease) returned no item. `E` is the
/// factory's create error.
#[derive(Debug, thiserror::Error)]
pub enum PoolError<E: std::error::Error + 'static> {
    /// The template was never configured.
    #[error(
        "no template `{template}` is configured in the pool: call Pool::set_template for it first"
    )]
    UnknownTemplate {
        /// The key asked for.
        template: TemplateKey,
    },
    /// Every item of the template stayed out (leased, being created or being
    /// destroyed) for the whole wait.
    #[error("no sandbox of template `{template}` became free within {waited:?}: all {max_total} (max_total) are in use; raise max_total or lease_timeout, or admit fewer jobs")]
    CapacityTimeout {
        /// The template asked for.
        template: TemplateKey,
        /// How long the lease waited.
        waited: Duration,
        /// The bound that was reached.
        max_total: usize,
    },
    /// No idle item and creating one on the spot failed.
    #[error("creating a sandbox of template `{template}` on the spot failed")]
    CreateFailed {
        /// The template asked for.
        template: TemplateKey,
        /// What the factory said.
        #[source]
        source: E,
    },
    /// So many idle items failed their health check in a row (as many as
    /// `max_total`) that the pool stopped trying for this lease.
    #[error("{failed} idle sandboxes of template `{template}` failed their health check in a row; the template or its backend is likely broken")]
    Unhealthy {
        /// The template asked for.
        template: TemplateKey,
        /// Items destroyed for this lease.
        failed: usize,
    },
    /// [`Pool::shutdown`](crate::Pool::shutdown) has begun.
    #[error("the sandbox pool is shutting down and hands out no more sandboxes")]
    ShuttingDown,
}

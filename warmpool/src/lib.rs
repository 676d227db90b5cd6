//! A pool of ready sandboxes per template, generic over the backend that
//! makes them: it knows a [`Factory`], not a jail or a microVM.
//!
//! Per template ([`TemplateSettings`]) the pool keeps `min_idle` items ready
//! in the background, never lets more than `max_total` exist, retires items
//! by `max_age` and `max_uses`, and backs off when the factory keeps failing.
//! [`Pool::lease`] hands out a health-checked idle item (warm) or creates one
//! on the spot (cold) and says which; the [`Lease`] guard destroys or returns
//! the item when it ends, by `remove_on_exit`. Pool events feed Prometheus
//! metrics ([`Pool::register`]) and [`Pool::stats`].

mod error;
mod factory;
mod lease;
mod metrics;
mod pool;
mod settings;

pub use error::PoolError;
pub use factory::{Factory, TemplateKey};
pub use lease::{Acquire, Lease};
pub use pool::{Pool, ShutdownReport, TemplateStats};
pub use settings::{SettingsError, TemplateSettings};

#[cfg(test)]
mod tests;

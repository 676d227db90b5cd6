//! A pool of ready sandboxes per template, generic over the backend that
//! makes them: it knows a [`Factory`], not a jail or a microVM.
//!
//! Per template ([`TemplateSettings`]) the pool keeps `min_idle` items ready
//! in the background, never lets more than `max_total` exist, retires items
//! by `max_age` and `max_uses`, and backs off when the factory keeps failing.
//! [`Pool::lease`] hands out a health-checked idle item (warm) or creates one
//! on the spot (cold) and says which. The [`Lease`] guard ends in one of
//! three ways: the item is destroyed or returned to idle as it is (as
//! `remove_on_exit` says, or [`Lease::discard`]), or it is recycled:
//! [`Lease::recycle`] has the factory reset it in the background
//! ([`Factory::recycle`], a few ms against tens for a create) and puts it
//! back to idle, so a sandbox can serve several jobs without carrying
//! anything from one to the next. A lease that finds no idle item waits for
//! a recycling one rather than create. Pool events feed Prometheus metrics
//! ([`Pool::register`]) and [`Pool::stats`].

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

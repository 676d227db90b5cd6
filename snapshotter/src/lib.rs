//! Kiln's snapshot memory engine: a userfaultfd page server that speaks
//! Firecracker's `Uffd` snapshot-load contract, a REAP-style working-set
//! recorder and prefetcher, and an immutable snapshot store.
//!
//! It exists as its own crate so that the Firecracker backend (or an operator
//! with a hand-started Firecracker, via `kiln snapshot serve-pages`) can hand
//! restores to it without the engine knowing anything about VMMs beyond the
//! one handshake message. See `README.md` for the design.

pub mod cli;
pub mod guest;
pub mod handshake;
pub mod memory;
pub mod metrics;
mod restore;
mod server;
pub mod store;
mod sys;
pub mod working_set;

pub use cli::{run_serve_pages, ServePagesArgs};
pub use restore::{RestoreEnd, RestoreError};
pub use server::{
    PageServer, PageServerConfig, RestoreId, RestoreInfo, RestoreOutcome, RestoreReport, ServeMode,
    ServerError, SnapshotSource,
};

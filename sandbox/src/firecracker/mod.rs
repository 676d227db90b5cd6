//! Firecracker in Kiln: the `firecracker` backend (`backend`, `boot`,
//! `restore`, `template`, `sandbox`: Kiln's sandboxes as Firecracker
//! microVMs, booted or restored from templates through Kiln's page server)
//! over the VMM layer below the `Backend`/`Sandbox` contract, which drives
//! a real Firecracker. One Firecracker
//! process per VM, directly or under Firecracker's jailer (chroot, a uid
//! and gid per sandbox, cgroup limits, its own pid and network
//! namespaces), driven over its HTTP API on a unix socket; the guest's
//! serial console on the VMM's stdin and stdout; a record per VM so that a
//! later process can remove what a SIGKILLed one left; snapshots, and
//! restores whose memory comes from a file or, lazily, from Kiln's
//! userfaultfd page server (`kiln_snapshotter::PageServer`).
//!
//! ```text
//!  FirecrackerVm::start(config, BootSpec)        FirecrackerVm::restore(config, RestoreSpec)
//!        │                                             │
//!        └────────────── process::launch ──────────────┘
//!              record, root (chroot) with files linked in,
//!              jailer/firecracker spawn, pidfd, API socket up
//!        │                                             │
//!   api: metrics, machine-config, boot-source,    api: metrics,
//!        drives, vsock, entropy, InstanceStart         snapshot/load (File | Uffd, vsock_override)
//!        │                                             │
//!        └── pause / resume / snapshot / metrics / destroy (teardown::Remains::teardown)
//! ```
//!
//! The backend's files: `backend` (settings, start-up checks, the step from
//! a running VM to a connected agent, the `Backend` impl), `boot`,
//! `restore` (and the page server's sockets), `template` (inputs, builds,
//! publication), `sandbox` (the `Sandbox` impl).
//!
//! The layer's files: `config` (settings and the preflight check), `api` and `models`
//! (the HTTP client and its bodies), `process` (the launch), `jailer` (uid
//! claims, chroot, cgroups), `console`, `metrics` (Firecracker's metrics
//! lines), `snapshot`, `teardown` (removal of what a VM holds, from Kiln's
//! crash record, and orphan reaping), `sys` (what `kiln-sys` lacks: pidfd
//! signals and reaping, namespaces). What was verified on which host, and
//! what is not covered yet, is in `docs/firecracker.md`.

mod api;
mod backend;
mod boot;
mod config;
mod console;
mod jailer;
mod metrics;
mod models;
mod process;
mod restore;
mod sandbox;
mod snapshot;
mod sys;
mod teardown;
mod template;
mod vm;

use std::path::Path;

pub use api::{ApiClient, ApiError};
pub use backend::{FirecrackerBackend, FirecrackerBackendConfig, SetupError, WORKDIR};
pub use config::{
    kvm_usable, Binaries, FirecrackerConfig, IdRange, JailerConfig, PreflightError, VmResources,
    FIRECRACKER_BIN_VAR, JAILER_BIN_VAR,
};
pub use console::{Console, ConsoleError};
pub use jailer::JailError;
pub use metrics::{
    parse_line as parse_metrics_line, Fleet, FleetTicket, FleetTotals, LatenciesLine, MetricsError,
    MetricsLine, MetricsReader, SeccompLine, SignalsLine, UartLine, VcpuLine, VmmLine, VmmMetrics,
};
pub use models::{
    ActionType, BootSource, Drive, EntropyDevice, FirecrackerVersion, HugePages, InstanceInfo,
    InstanceState, LogLevel, Logger, MachineConfig, MemoryBackendParams, MemoryBackendType,
    MetricsConfig, NetworkInterface, NetworkInterfaceUpdate, RateLimiter, SnapshotCreateParams,
    SnapshotLoadParams, SnapshotType, TokenBucket, VmConfig, VmState, Vsock, VsockOverride,
};
pub use process::{LaunchError, VmPaths};
pub use restore::{reap_page_sockets, MemorySource, RestoredVm};
pub use sandbox::FirecrackerSandbox;
pub use snapshot::{
    MachineSummary, MemoryBackend, RestoreError, RestoreSpec, Snapshot, SnapshotError,
};
pub use teardown::TeardownReport;
pub use template::BuildError;
pub use vm::{
    BootSpec, BootTimings, FirecrackerVm, RestoreTimings, StartError, VmMetricsError, VmNic,
};

use crate::ReapReport;

/// Destroys the Firecracker VMs recorded under `state_dir` whose owning
/// process is dead (call at start-up, like the other backends' reaping):
/// their VMMs and every process in their cgroups or chroots are killed,
/// and their cgroups, files, uid claims and records removed.
pub fn reap_orphans(state_dir: &Path) -> ReapReport {
    teardown::reap_orphans(state_dir)
}

/// Makes this process adopt the VMMs it starts under the jailer with
/// `--new-pid-ns`. The jailer forks Firecracker and exits, so Firecracker is
/// reparented: to init, unless this process is a child subreaper
/// (`PR_SET_CHILD_SUBREAPER`), in which case it becomes our child and
/// teardown reaps it. Without this, a killed VMM stays a zombie until init
/// reaps it, and an init that does not reap (some containers, this CI
/// machine's) keeps it forever. Process-wide: every orphaned descendant is
/// adopted, so the owner must reap what it adopts (teardown and
/// [`reap_orphans`] reap the VMMs).
pub fn adopt_orphaned_vmms() -> std::io::Result<()> {
    sys::set_child_subreaper()
}

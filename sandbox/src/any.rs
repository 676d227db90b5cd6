//! A backend chosen at run time: [`AnyBackend`] dispatches to the jail,
//! the qemu or the firecracker backend, so that the CLI and the daemon can take the backend
//! from configuration while the pool and the scheduler stay generic over
//! one concrete type.

use crate::firecracker::{FirecrackerBackend, FirecrackerSandbox};
use crate::jail::{Jail, JailBackend};
use crate::qemu::{QemuBackend, QemuVm};
use crate::{
    AgentConn, Backend, ReapReport, Sandbox, SandboxError, SandboxId, SandboxSpec, SandboxStats,
};

/// One of the sandbox backends.
#[derive(Clone)]
pub enum AnyBackend {
    Jail(JailBackend),
    Qemu(QemuBackend),
    Firecracker(FirecrackerBackend),
}

/// A sandbox of an [`AnyBackend`].
pub enum AnySandbox {
    Jail(Jail),
    Qemu(QemuVm),
    Firecracker(FirecrackerSandbox),
}

impl From<JailBackend> for AnyBackend {
    fn from(b: JailBackend) -> Self {
        Self::Jail(b)
    }
}

impl From<QemuBackend> for AnyBackend {
    fn from(b: QemuBackend) -> Self {
        Self::Qemu(b)
    }
}

impl From<FirecrackerBackend> for AnyBackend {
    fn from(b: FirecrackerBackend) -> Self {
        Self::Firecracker(b)
    }
}

macro_rules! each {
    ($value:expr, $s:ident => $body:expr) => {
        match $value {
            AnySandbox::Jail($s) => $body,
            AnySandbox::Qemu($s) => $body,
            AnySandbox::Firecracker($s) => $body,
        }
    };
}

impl Sandbox for AnySandbox {
    fn id(&self) -> &SandboxId {
        each!(self, s => s.id())
    }

    fn agent(&self) -> &AgentConn {
        each!(self, s => s.agent())
    }

    fn oom_kills(&self) -> u64 {
        each!(self, s => s.oom_kills())
    }

    fn oom_kills_seen(&self) -> u64 {
        each!(self, s => s.oom_kills_seen())
    }

    fn memory_peak_bytes(&self) -> Option<u64> {
        each!(self, s => s.memory_peak_bytes())
    }

    fn stats(&self) -> SandboxStats {
        each!(self, s => s.stats())
    }

    fn resize(&self, to: crate::Resources) -> Result<(), SandboxError> {
        each!(self, s => s.resize(to))
    }

    fn kill_now(&self) {
        each!(self, s => s.kill_now())
    }

    fn start_timings(&self) -> Option<kiln_protocol::SandboxTimings> {
        each!(self, s => s.start_timings())
    }

    fn set_background(&self, background: bool) {
        each!(self, s => s.set_background(background))
    }

    fn network_info(&self) -> Option<crate::network::NetworkInfo> {
        each!(self, s => s.network_info())
    }

    fn set_egress(&self, rules: crate::network::EgressRules) -> Result<(), SandboxError> {
        each!(self, s => s.set_egress(rules))
    }

    fn join_network(&self, name: &str) -> Result<(), SandboxError> {
        each!(self, s => s.join_network(name))
    }

    fn open_port(&self, port: u16) -> Result<std::net::TcpStream, SandboxError> {
        each!(self, s => s.open_port(port))
    }

    fn set_rate_mbit(&self, mbit: u32) -> Result<(), SandboxError> {
        each!(self, s => s.set_rate_mbit(mbit))
    }

    async fn reset(&self) -> Result<(), SandboxError> {
        each!(self, s => s.reset().await)
    }

    async fn destroy(self) {
        each!(self, s => s.destroy().await)
    }
}

impl Backend for AnyBackend {
    type Sandbox = AnySandbox;

    fn name(&self) -> &'static str {
        match self {
            Self::Jail(b) => b.name(),
            Self::Qemu(b) => b.name(),
            Self::Firecracker(b) => b.name(),
        }
    }

    fn capabilities(&self) -> crate::Capabilities {
        match self {
            Self::Jail(b) => b.capabilities(),
            Self::Qemu(b) => b.capabilities(),
            Self::Firecracker(b) => b.capabilities(),
        }
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<AnySandbox, SandboxError> {
        match self {
            Self::Jail(b) => b.create(spec).await.map(AnySandbox::Jail),
            Self::Qemu(b) => b.create(spec).await.map(AnySandbox::Qemu),
            Self::Firecracker(b) => b.create(spec).await.map(AnySandbox::Firecracker),
        }
    }

    fn reap_orphans(&self) -> ReapReport {
        match self {
            Self::Jail(b) => b.reap_orphans(),
            Self::Qemu(b) => b.reap_orphans(),
            Self::Firecracker(b) => b.reap_orphans(),
        }
    }

    async fn prepare_template(
        &self,
        spec: &SandboxSpec,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<crate::TemplateInfo, SandboxError> {
        match self {
            Self::Jail(b) => b.prepare_template(spec, progress).await,
            Self::Qemu(b) => b.prepare_template(spec, progress).await,
            Self::Firecracker(b) => b.prepare_template(spec, progress).await,
        }
    }

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        match self {
            Self::Jail(b) => b.register_metrics(registry),
            Self::Qemu(b) => b.register_metrics(registry),
            Self::Firecracker(b) => b.register_metrics(registry),
        }
    }

    fn templates(&self) -> Result<Vec<crate::TemplateInfo>, SandboxError> {
        match self {
            Self::Jail(b) => b.templates(),
            Self::Qemu(b) => b.templates(),
            Self::Firecracker(b) => b.templates(),
        }
    }

    fn remove_template(&self, id: &str) -> Result<(), SandboxError> {
        match self {
            Self::Jail(b) => b.remove_template(id),
            Self::Qemu(b) => b.remove_template(id),
            Self::Firecracker(b) => b.remove_template(id),
        }
    }
}

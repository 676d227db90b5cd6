//! A Firecracker sandbox as the pool and the scheduler see it: a VM with a
//! connected agent. What the host can tell about it comes from outside
//! the guest: the VMM's resident memory and CPU time from `/proc`, its
//! memory peak from the jail's cgroup, the guest kernel's OOM kills from
//! the serial console (which only the kernel and the agent write), and
//! Firecracker's own counters ([`FirecrackerSandbox::vmm_metrics`]).

use kiln_protocol::SandboxTimings;

use super::metrics::{Fleet, FleetTicket, VmmMetrics};
use super::vm::{FirecrackerVm, VmMetricsError};
use crate::jail::{Cgroup, CgroupLayout};
use crate::network::NetLease;
use crate::{AgentConn, Sandbox, SandboxError, SandboxId, SandboxStats};

/// How long teardown waits for Firecracker to write a last metrics line.
const FINAL_FLUSH: std::time::Duration = std::time::Duration::from_millis(200);

/// A running Firecracker microVM with a connected agent.
pub struct FirecrackerSandbox {
    id: SandboxId,
    // Declared before the VM: the connection goes first when dropped.
    agent: AgentConn,
    /// Boxed: a VM's handles are a kilobyte, and a sandbox moves through
    /// the pool's enums and futures.
    vm: Box<FirecrackerVm>,
    timings: SandboxTimings,
    template: Option<String>,
    /// The jail's cgroups, for the memory peak (jailed VMMs only).
    cgroup: Option<Cgroup>,
    /// Its place among the backend's VMs on `/metrics`; dropped (retired)
    /// with the sandbox.
    fleet: FleetTicket,
}

impl FirecrackerSandbox {
    pub(super) fn new(
        vm: FirecrackerVm,
        agent: AgentConn,
        timings: SandboxTimings,
        template: Option<String>,
        fleet: &Fleet,
    ) -> Self {
        let cgroup = (!vm.cgroups().is_empty())
            .then(|| CgroupLayout::detect(std::path::Path::new("/sys/fs/cgroup")).ok())
            .flatten()
            .map(|layout| Cgroup::from_dirs(&layout, vm.cgroups().to_vec()));
        let ticket = fleet.enroll(vm.metrics_reader());
        Self {
            id: vm.id().clone(),
            agent,
            vm: Box::new(vm),
            timings,
            template,
            cgroup,
            fleet: ticket,
        }
    }

    /// The VM underneath.
    pub fn vm(&self) -> &FirecrackerVm {
        &self.vm
    }

    /// The template it was restored from (`None`: booted).
    pub fn template(&self) -> Option<&str> {
        self.template.as_deref()
    }

    /// Firecracker's counters for this VM so far (vCPU exits, device
    /// traffic, seccomp and signal events).
    pub async fn vmm_metrics(&self) -> Result<VmmMetrics, VmMetricsError> {
        self.vm.metrics().await
    }

    /// vCPU exits the VMM handled so far, as far as Firecracker has
    /// written its metrics (every 60 s, and when flushed).
    fn vmm_exits(&self) -> u64 {
        let reader = self.vm.metrics_reader();
        let mut r = reader.lock().unwrap_or_else(|e| e.into_inner());
        let m = r.read_new().unwrap_or_else(|_| r.totals());
        m.vcpu.exit_io_in + m.vcpu.exit_io_out + m.vcpu.exit_mmio_read + m.vcpu.exit_mmio_write
    }

    /// The sandbox's network, or why there is none.
    fn networked(&self) -> Result<NetLease, SandboxError> {
        self.vm.network().ok_or_else(SandboxError::no_network)
    }

    pub(super) fn agent_conn(&self) -> &AgentConn {
        &self.agent
    }

    /// The VM without its agent connection (closed now).
    pub(super) fn into_vm(self) -> FirecrackerVm {
        drop(self.agent);
        *self.vm
    }
}

impl Sandbox for FirecrackerSandbox {
    fn id(&self) -> &SandboxId {
        &self.id
    }

    fn agent(&self) -> &AgentConn {
        &self.agent
    }

    /// OOM kills by the guest kernel, counted from its console: the guest's
    /// memory is its own, no host cgroup sees inside it.
    fn oom_kills(&self) -> u64 {
        self.vm.console().guest().oom_kills()
    }

    /// The peak of the jail's memory cgroup: the guest's RAM as far as it
    /// was touched, plus the VMM's own.
    fn memory_peak_bytes(&self) -> Option<u64> {
        self.cgroup.as_ref().and_then(Cgroup::memory_peak_bytes)
    }

    /// The host's view: the VMM's resident memory (the guest's touched RAM
    /// included) and CPU time, and a networked guest's traffic as its tap
    /// counts it (the VMM runs in the host side, where the tap is). The
    /// guest's disk is tmpfs inside its RAM.
    fn stats(&self) -> SandboxStats {
        let pid = self.vm.pid() as i32;
        let net = self
            .vm
            .network()
            .and_then(|n| crate::procfs::tap_bytes(pid, &n.slot().host_link()));
        SandboxStats {
            net_rx_bytes: net.map(|n| n.0),
            net_tx_bytes: net.map(|n| n.1),
            memory_bytes: crate::procfs::rss_bytes(pid).unwrap_or(0),
            memory_peak_bytes: self.memory_peak_bytes(),
            cpu_usage_us: Some(crate::procfs::cpu_us(&[pid], false)),
            oom_kills: self.oom_kills(),
            vmm_exits: Some(self.vmm_exits()),
            ..SandboxStats::default()
        }
    }

    fn network_info(&self) -> Option<crate::network::NetworkInfo> {
        self.vm.network().as_ref().map(NetLease::info)
    }

    fn set_egress(&self, rules: crate::network::EgressRules) -> Result<(), SandboxError> {
        self.networked()?
            .set_rules(rules)
            .map_err(|e| SandboxError::backend("firecracker", e))
    }

    fn join_network(&self, name: &str) -> Result<(), SandboxError> {
        self.networked()?
            .join(name)
            .map_err(|e| SandboxError::backend("firecracker", e))
    }

    /// Firecracker's rate limiters of the NIC, changed on the running VM.
    fn set_rate_mbit(&self, mbit: u32) -> Result<(), SandboxError> {
        self.networked()?;
        self.vm
            .set_rate_mbit(mbit)
            .map_err(|e| SandboxError::backend("firecracker", e))
    }

    fn open_port(&self, port: u16) -> Result<std::net::TcpStream, SandboxError> {
        self.networked()?
            .open_port(port)
            .map_err(|e| SandboxError::backend("firecracker", e))
    }

    fn start_timings(&self) -> Option<SandboxTimings> {
        Some(self.timings)
    }

    /// SIGKILLs the VMM (through its pidfd): every guest process stops at
    /// once.
    fn kill_now(&self) {
        self.vm.kill();
    }

    async fn destroy(self) {
        drop(self.agent);
        // A last metrics line, so the fleet's totals count this VM to its
        // end (bounded: a VMM that does not answer is killed regardless).
        if self.vm.is_running() {
            let _ = tokio::time::timeout(FINAL_FLUSH, self.vm.metrics()).await;
        }
        drop(self.fleet);
        let report = self.vm.destroy().await;
        if !report.is_clean() {
            tracing::warn!(sandbox = %self.id, leftovers = ?report.leftovers, "a destroyed Firecracker sandbox left things behind");
        }
    }
}

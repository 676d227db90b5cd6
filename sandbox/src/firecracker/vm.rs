//! A running Firecracker VM: booted from a kernel ([`FirecrackerVm::start`])
//! or restored from a snapshot ([`FirecrackerVm::restore`]), both over the
//! shared launch step, then paused, resumed, snapshotted and destroyed
//! through its API. Destroying (or dropping) it removes everything it had
//! on the host; a VM whose owner was SIGKILLed is removed by
//! [`reap_orphans`](super::reap_orphans) in a later process.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::api::{ApiClient, ApiError};
use super::config::{FirecrackerConfig, VmResources};
use super::console::Console;
use super::metrics::{MetricsError, MetricsReader, VmmMetrics};
use super::models::{
    ActionType, BootSource, Drive, EntropyDevice, InstanceInfo, MachineConfig, MemoryBackendParams,
    MemoryBackendType, MetricsConfig, NetworkInterface, NetworkInterfaceUpdate, RateLimiter,
    SnapshotCreateParams, SnapshotLoadParams, SnapshotType, VmState, Vsock, VsockOverride,
};
use super::process::{
    launch, names, LaunchError, LaunchPlan, Launched, NetnsPlan, RootFile, VmPaths,
};
use super::snapshot::{
    collect, MachineSummary, MemoryBackend, RestoreError, RestoreSpec, Snapshot, SnapshotError,
};
use super::sys;
use super::teardown::{Remains, TeardownReport};
use crate::network::{NetLease, Network};
use crate::SandboxId;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSpec {
    pub resources: VmResources,
    /// An uncompressed ELF kernel (`vmlinux`) or a bzImage.
    pub kernel: PathBuf,
    /// The kernel command line; Firecracker's default when `None`.
    pub boot_args: Option<String>,
    /// A read-only root disk (`/dev/vda` in a Linux guest).
    pub root_drive: Option<PathBuf>,
    /// Size of a per-sandbox writable disk, created empty (sparse) in the
    /// VM's root and removed with it.
    pub scratch_disk_mib: Option<u64>,
    /// A vsock device with this guest CID (3 or more); its host side is a
    /// hybrid-vsock unix socket in the VM's root ([`FirecrackerVm::vsock_uds`]).
    pub vsock_cid: Option<u32>,
    /// A virtio-rng device.
    pub entropy: bool,
    /// A virtio-net device on the sandbox's network.
    pub network: Option<VmNic>,
}

/// A VM's network interface, on `network`: the VM's lease (named by the
/// VM's id, with the default rules) is taken once the VM exists, and its
/// tap (`kn<slot>`, in the host side) made once the VMM's uid is known,
/// owned by it; the lease's bandwidth becomes the NIC's rate limiters
/// (Firecracker's, each way; no `tc` then). The VMM runs in the host
/// side's network namespace, not one of its own, to open the tap; the
/// lease is released once the VMM is dead ([`FirecrackerVm::network`]).
#[derive(Clone)]
pub struct VmNic {
    pub network: Arc<Network>,
}

impl std::fmt::Debug for VmNic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmNic")
            .field("pool", &self.network.pool())
            .finish()
    }
}

impl PartialEq for VmNic {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.network, &other.network)
    }
}

impl Eq for VmNic {}

impl BootSpec {
    /// A bare machine booting `kernel`: no disks, no vsock, no entropy.
    pub fn new(kernel: impl Into<PathBuf>, resources: VmResources) -> Self {
        Self {
            resources,
            kernel: kernel.into(),
            boot_args: None,
            root_drive: None,
            scratch_disk_mib: None,
            vsock_cid: None,
            entropy: false,
            network: None,
        }
    }
}

/// Why a VM could not be booted (the VMM is gone again when this is
/// returned).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The Firecracker process did not come up.
    #[error("starting Firecracker failed: {0}")]
    Launch(#[from] LaunchError),
    /// A configuration call was refused.
    #[error("configuring the VM's {step} failed: {source}")]
    Configure {
        step: &'static str,
        #[source]
        source: ApiError,
    },
    /// `InstanceStart` was refused.
    #[error("Firecracker could not boot the VM: {0}")]
    InstanceStart(#[source] ApiError),
    /// The VM's network interface could not be made.
    #[error("making the VM's network interface failed: {0}")]
    Network(String),
}

/// Why the VM's metrics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum VmMetricsError {
    /// `FlushMetrics` was refused.
    #[error("asking Firecracker to flush its metrics failed: {0}")]
    Flush(#[source] ApiError),
    /// The metrics file could not be read or parsed.
    #[error(transparent)]
    Read(#[from] MetricsError),
}

/// How long each phase of a boot took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootTimings {
    /// From spawning the process (the jailer when jailed) until the API
    /// socket accepted a connection.
    pub api_ready: Duration,
    /// The configuration calls (metrics, machine, boot source, drives,
    /// vsock, entropy).
    pub configure: Duration,
    /// `PUT /actions InstanceStart`.
    pub instance_start: Duration,
}

/// How long each phase of a restore took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreTimings {
    /// From spawning the process until the API socket accepted a connection.
    pub api_ready: Duration,
    /// `PUT /snapshot/load`, resume included when asked for.
    pub load: Duration,
}

/// A Firecracker VM.
///
/// Contract: the owner calls [`FirecrackerVm::destroy`] when done; dropping
/// it instead kills the VMM at once and finishes the cleanup on a
/// background thread.
#[must_use = "a dropped VM is killed"]
pub struct FirecrackerVm {
    id: SandboxId,
    api: ApiClient,
    console: Console,
    paths: VmPaths,
    pid: u32,
    ids: Option<(u32, u32)>,
    cgroups: Vec<PathBuf>,
    machine: MachineSummary,
    /// The host file of the read-only root disk, if the machine has one.
    root_drive: Option<PathBuf>,
    boot: Option<BootTimings>,
    restore: Option<RestoreTimings>,
    metrics: Arc<Mutex<MetricsReader>>,
    remains: Mutex<Option<Remains>>,
}

impl std::fmt::Debug for FirecrackerVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirecrackerVm")
            .field("id", &self.id)
            .field("pid", &self.pid)
            .field("root", &self.paths.root())
            .finish_non_exhaustive()
    }
}

impl FirecrackerVm {
    fn assemble(launched: Launched, machine: MachineSummary, root_drive: Option<PathBuf>) -> Self {
        Self {
            root_drive,
            id: launched.id,
            api: launched.api,
            console: launched.console,
            metrics: Arc::new(Mutex::new(MetricsReader::new(
                launched.paths.host(names::METRICS),
            ))),
            paths: launched.paths,
            pid: launched.pid,
            ids: launched.ids,
            cgroups: launched.remains.record.cgroups.clone(),
            machine,
            boot: None,
            restore: None,
            remains: Mutex::new(Some(launched.remains)),
        }
    }

    /// Starts Firecracker (jailed when configured), configures the machine
    /// of `spec` and boots it. Returns once `InstanceStart` succeeded; the
    /// guest is then running (what it does is the guest's business).
    pub async fn start(config: &FirecrackerConfig, spec: &BootSpec) -> Result<Self, StartError> {
        let mut vm = Self::configured(config, spec).await?;
        vm.instance_start().await?;
        Ok(vm)
    }

    /// Starts Firecracker and configures the machine of `spec` without
    /// booting it, so that the caller can prepare what the guest will
    /// reach for as soon as it runs (a listener on the vsock's
    /// `<uds>_<port>`), then call [`FirecrackerVm::instance_start`].
    pub async fn configured(
        config: &FirecrackerConfig,
        spec: &BootSpec,
    ) -> Result<Self, StartError> {
        let mut files = vec![RootFile {
            what: "the kernel",
            source: spec.kernel.clone(),
            name: names::KERNEL,
            socket: false,
        }];
        if let Some(root) = &spec.root_drive {
            files.push(RootFile {
                what: "the root disk",
                source: root.clone(),
                name: names::ROOTFS,
                socket: false,
            });
        }
        let launched = launch(LaunchPlan {
            config,
            id: SandboxId::random(),
            resources: spec.resources,
            files: files.clone(),
            scratch_mib: spec.scratch_disk_mib,
            netns: match &spec.network {
                None => NetnsPlan::Default,
                Some(nic) => NetnsPlan::Join(nic.network.host_netns()),
            },
        })
        .await?;
        let api_ready = launched.api_ready;
        let machine = MachineSummary {
            vcpus: spec.resources.vcpus,
            memory_mib: spec.resources.memory_mib,
            vsock_cid: spec.vsock_cid,
        };
        let mut vm = Self::assemble(launched, machine, spec.root_drive.clone());
        let configured = Instant::now();
        let nic = match &spec.network {
            None => None,
            Some(nic) => match vm.make_tap(nic).await {
                Ok(lease) => Some(lease),
                Err(e) => {
                    vm.destroy().await;
                    return Err(e);
                }
            },
        };
        let tap = nic.as_ref().map(|l| l.slot().host_link());
        let rate = nic.as_ref().map_or(0, |l| l.info().rate_mbit);
        drop(nic);
        if let Err(e) = vm.configure(spec, &files, tap.as_deref(), rate).await {
            vm.destroy().await;
            return Err(e);
        }
        vm.boot = Some(BootTimings {
            api_ready,
            configure: configured.elapsed(),
            instance_start: Duration::ZERO,
        });
        Ok(vm)
    }

    /// Boots a VM made by [`FirecrackerVm::configured`]
    /// (`PUT /actions InstanceStart`). On error the VM is still there, for
    /// the caller to destroy.
    pub async fn instance_start(&mut self) -> Result<(), StartError> {
        let started = Instant::now();
        self.api
            .action(ActionType::InstanceStart)
            .await
            .map_err(StartError::InstanceStart)?;
        if let Some(b) = &mut self.boot {
            b.instance_start = started.elapsed();
        }
        tracing::info!(vm = %self.id, pid = self.pid, jailed = self.paths.jailed(), "Firecracker VM booted");
        Ok(())
    }

    /// Takes the VM's lease on `nic`'s network and makes its tap, owned
    /// by the VMM's uid when jailed; the lease goes with the VM's remains
    /// (released after the VMM's death).
    async fn make_tap(&self, nic: &VmNic) -> Result<NetLease, StartError> {
        let net = nic.network.clone();
        let (id, ids) = (self.id.to_string(), self.ids);
        let lease = tokio::task::spawn_blocking(move || {
            let lease = net.lease(&id, None)?;
            lease.attach_tap(ids, false)?;
            Ok::<_, crate::network::NetworkError>(lease)
        })
        .await
        .map_err(|e| StartError::Network(e.to_string()))?
        .map_err(|e| StartError::Network(e.to_string()))?;
        if let Some(r) = self
            .remains
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            r.net = Some(lease.clone());
        }
        Ok(lease)
    }

    /// Sets the bandwidth of the VM's NIC, each way (0: unlimited), with
    /// Firecracker's rate limiters (`PATCH /network-interfaces/eth0`), and
    /// records it in its lease. Blocking: the call runs on a thread of its
    /// own with a connection of its own, so that it may be made from
    /// anywhere (the contract's `set_rate_mbit` is synchronous).
    pub fn set_rate_mbit(&self, mbit: u32) -> Result<(), StartError> {
        let lease = self
            .network()
            .ok_or_else(|| StartError::Network("the VM has no network interface".into()))?;
        let client = ApiClient::new(self.api.socket(), self.api.timeout());
        let update = NetworkInterfaceUpdate {
            iface_id: "eth0".into(),
            rx_rate_limiter: Some(RateLimiter::mbit_update(mbit)),
            tx_rate_limiter: Some(RateLimiter::mbit_update(mbit)),
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| StartError::Network(e.to_string()))?;
                rt.block_on(client.patch_network_interface(&update))
                    .map_err(|source| StartError::Configure {
                        step: "network interface's rate limiters",
                        source,
                    })
            })
            .join()
            .unwrap_or_else(|_| Err(StartError::Network("the API thread panicked".into())))
        })?;
        lease
            .set_rate(mbit)
            .map_err(|e| StartError::Network(e.to_string()))
    }

    /// The VM's network (a handle on its lease, which lives while any is
    /// held), when it has a NIC.
    pub fn network(&self) -> Option<NetLease> {
        let r = self.remains.lock().unwrap_or_else(|e| e.into_inner());
        r.as_ref()?.net.clone()
    }

    async fn configure(
        &self,
        spec: &BootSpec,
        files: &[RootFile],
        tap: Option<&str>,
        rate_mbit: u32,
    ) -> Result<(), StartError> {
        let step = |step: &'static str| move |source| StartError::Configure { step, source };
        let api = &self.api;
        api.put_metrics(&MetricsConfig {
            metrics_path: self.paths.vmm(names::METRICS),
        })
        .await
        .map_err(step("metrics"))?;
        api.put_machine_config(&MachineConfig {
            vcpu_count: spec.resources.vcpus,
            mem_size_mib: spec.resources.memory_mib,
            smt: false,
            track_dirty_pages: false,
            huge_pages: None,
        })
        .await
        .map_err(step("machine (vCPUs and memory)"))?;
        api.put_boot_source(&BootSource {
            kernel_image_path: self.vmm_path(&files[0]),
            boot_args: spec.boot_args.clone(),
            initrd_path: None,
        })
        .await
        .map_err(step("boot source"))?;
        if let Some(root) = files.iter().find(|f| f.name == names::ROOTFS) {
            api.put_drive(&Drive {
                drive_id: "rootfs".into(),
                path_on_host: self.vmm_path(root),
                is_root_device: true,
                is_read_only: true,
                rate_limiter: None,
            })
            .await
            .map_err(step("root disk"))?;
        }
        if spec.scratch_disk_mib.is_some() {
            api.put_drive(&Drive {
                drive_id: "scratch".into(),
                path_on_host: self.paths.vmm(names::SCRATCH),
                is_root_device: false,
                is_read_only: false,
                rate_limiter: None,
            })
            .await
            .map_err(step("writable disk"))?;
        }
        if let Some(cid) = spec.vsock_cid {
            api.put_vsock(&Vsock {
                guest_cid: cid,
                uds_path: self.paths.vmm(names::VSOCK_SOCKET),
            })
            .await
            .map_err(step("vsock device"))?;
        }
        if let Some(tap) = tap {
            let rate = RateLimiter::mbit(rate_mbit);
            api.put_network_interface(&NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: tap.to_owned(),
                guest_mac: None,
                rx_rate_limiter: rate.clone(),
                tx_rate_limiter: rate,
            })
            .await
            .map_err(step("network interface"))?;
        }
        if spec.entropy {
            api.put_entropy(&EntropyDevice {})
                .await
                .map_err(step("entropy device"))?;
        }
        Ok(())
    }

    /// The path Firecracker is given for a file of the launch: the link in
    /// the chroot when jailed, the host file itself otherwise.
    fn vmm_path(&self, file: &RootFile) -> PathBuf {
        if self.paths.jailed() {
            self.paths.vmm(file.name)
        } else {
            file.source.clone()
        }
    }

    /// Starts a fresh Firecracker and loads `spec.snapshot` into it with
    /// the memory backend asked for.
    pub async fn restore(
        config: &FirecrackerConfig,
        spec: &RestoreSpec,
    ) -> Result<Self, RestoreError> {
        let snapshot = &spec.snapshot;
        let mut files = vec![RootFile {
            what: "the snapshot's VM state",
            source: snapshot.vmstate.clone(),
            name: names::VMSTATE,
            socket: false,
        }];
        let backend_type = match &spec.backend {
            MemoryBackend::File => {
                files.push(RootFile {
                    what: "the snapshot's memory file",
                    source: snapshot.memory.clone(),
                    name: names::MEMORY,
                    socket: false,
                });
                MemoryBackendType::File
            }
            MemoryBackend::Uffd { socket } => {
                files.push(RootFile {
                    what: "the page server's socket",
                    source: socket.clone(),
                    name: names::PAGES_SOCKET,
                    socket: true,
                });
                MemoryBackendType::Uffd
            }
        };
        if let Some(root) = &snapshot.root_drive {
            // Firecracker reopens the disk where the snapshotted VM had it:
            // `/rootfs` in a chroot, the host path itself unjailed.
            files.push(RootFile {
                what: "the snapshotted VM's root disk",
                source: root.clone(),
                name: names::ROOTFS,
                socket: false,
            });
        }
        let launched = launch(LaunchPlan {
            config,
            id: SandboxId::random(),
            resources: VmResources {
                vcpus: snapshot.machine.vcpus,
                memory_mib: snapshot.machine.memory_mib,
                cpu_millis: spec.cpu_millis,
            },
            files: files.clone(),
            scratch_mib: None,
            netns: NetnsPlan::Default,
        })
        .await?;
        let api_ready = launched.api_ready;
        let mut vm = Self::assemble(launched, snapshot.machine, snapshot.root_drive.clone());
        if let Err(e) = vm
            .api
            .put_metrics(&MetricsConfig {
                metrics_path: vm.paths.vmm(names::METRICS),
            })
            .await
        {
            vm.destroy().await;
            return Err(RestoreError::Metrics(e));
        }
        let params = SnapshotLoadParams {
            snapshot_path: vm.vmm_path(&files[0]),
            mem_backend: MemoryBackendParams {
                backend_type,
                backend_path: vm.vmm_path(&files[1]),
            },
            resume_vm: spec.resume,
            track_dirty_pages: false,
            vsock_override: snapshot.machine.vsock_cid.map(|_| VsockOverride {
                uds_path: vm.paths.vmm(names::VSOCK_SOCKET),
            }),
        };
        let loading = Instant::now();
        if let Err(source) = vm.api.load_snapshot(&params).await {
            vm.destroy().await;
            return Err(RestoreError::Load {
                vmstate: snapshot.vmstate.clone(),
                source,
            });
        }
        vm.restore = Some(RestoreTimings {
            api_ready,
            load: loading.elapsed(),
        });
        tracing::info!(vm = %vm.id, pid = vm.pid, backend = ?backend_type, "Firecracker VM restored");
        Ok(vm)
    }

    pub fn id(&self) -> &SandboxId {
        &self.id
    }

    /// Firecracker's pid on the host.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The API client, for calls this type does not wrap.
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    /// The guest's serial console.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// Where the VM's files are.
    pub fn paths(&self) -> &VmPaths {
        &self.paths
    }

    /// The host side of the vsock device (Firecracker's hybrid vsock):
    /// connect and send `CONNECT <port>\n` for a guest port; the guest's
    /// connections to host port `p` arrive on `<this>_<p>`, where the host
    /// must listen (with a socket the jailed VMM's uid may connect to).
    pub fn vsock_uds(&self) -> Option<PathBuf> {
        self.machine
            .vsock_cid
            .map(|_| self.paths.host(names::VSOCK_SOCKET))
    }

    /// The jailed VMM's uid and gid.
    pub fn jail_ids(&self) -> Option<(u32, u32)> {
        self.ids
    }

    /// The jail's cgroup directories (empty when unjailed).
    pub fn cgroups(&self) -> &[PathBuf] {
        &self.cgroups
    }

    /// The machine as configured (or as snapshotted).
    pub fn machine(&self) -> MachineSummary {
        self.machine
    }

    /// Phases of the boot, for a booted VM.
    pub fn boot_timings(&self) -> Option<BootTimings> {
        self.boot
    }

    /// Phases of the restore, for a restored VM.
    pub fn restore_timings(&self) -> Option<RestoreTimings> {
        self.restore
    }

    /// Firecracker's log file on the host.
    pub fn log_path(&self) -> PathBuf {
        self.paths.host(names::LOG)
    }

    /// `GET /`: Firecracker's view of the VM.
    pub async fn info(&self) -> Result<InstanceInfo, ApiError> {
        self.api.instance_info().await
    }

    /// Stops the vCPUs.
    pub async fn pause(&self) -> Result<(), ApiError> {
        self.api.set_state(VmState::Paused).await
    }

    /// Lets the vCPUs run again.
    pub async fn resume(&self) -> Result<(), ApiError> {
        self.api.set_state(VmState::Resumed).await
    }

    /// Pauses the VM and writes a full snapshot into `dest` (`vmstate` and
    /// `memory`, root-owned, read-only). The VM stays paused.
    pub async fn snapshot(&self, dest: &Path) -> Result<Snapshot, SnapshotError> {
        let inside = self.snapshot_in_root().await?;
        std::fs::create_dir_all(dest).map_err(|source| SnapshotError::Collect {
            from: self.paths.host(names::SNAPSHOT_DIR),
            to: dest.to_owned(),
            source,
        })?;
        let snapshot = Snapshot {
            vmstate: dest.join("vmstate"),
            memory: dest.join("memory"),
            ..inside.clone()
        };
        collect(&inside.vmstate, &snapshot.vmstate)?;
        collect(&inside.memory, &snapshot.memory)?;
        Ok(snapshot)
    }

    /// Pauses the VM and writes a full snapshot inside its own root, where
    /// it goes with the VM: for a caller that copies the files elsewhere
    /// anyway (a template store) before destroying the VM. The VM stays
    /// paused.
    pub async fn snapshot_in_root(&self) -> Result<Snapshot, SnapshotError> {
        self.pause().await.map_err(SnapshotError::Pause)?;
        self.api
            .create_snapshot(&SnapshotCreateParams {
                snapshot_type: SnapshotType::Full,
                snapshot_path: self.paths.vmm(names::VMSTATE),
                mem_file_path: self.paths.vmm(names::MEMORY),
            })
            .await
            .map_err(SnapshotError::Create)?;
        Ok(Snapshot {
            vmstate: self.paths.host(names::VMSTATE),
            memory: self.paths.host(names::MEMORY),
            machine: self.machine,
            root_drive: self.root_drive.clone(),
        })
    }

    /// Asks Firecracker to write a metrics line now and returns the totals
    /// of every line so far.
    pub async fn metrics(&self) -> Result<VmmMetrics, VmMetricsError> {
        self.api
            .action(ActionType::FlushMetrics)
            .await
            .map_err(VmMetricsError::Flush)?;
        let mut reader = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        Ok(reader.read_new()?)
    }

    /// The reader of this VM's metrics file, shared with the backend's
    /// fleet (Kiln's `/metrics`) and the sandbox's live figures.
    pub fn metrics_reader(&self) -> Arc<Mutex<MetricsReader>> {
        Arc::clone(&self.metrics)
    }

    /// SIGKILLs the VMM now, through its pidfd (so never another process
    /// that got its pid); [`FirecrackerVm::destroy`] still removes the rest.
    pub fn kill(&self) {
        let remains = self.remains.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = remains.as_ref().and_then(|r| r.vmm.as_ref()) {
            let _ = sys::pidfd_kill(fd, libc::SIGKILL);
        }
    }

    /// Whether the VMM is still running.
    pub fn is_running(&self) -> bool {
        let remains = self.remains.lock().unwrap_or_else(|e| e.into_inner());
        remains
            .as_ref()
            .and_then(|r| r.vmm.as_ref())
            .is_some_and(|fd| !sys::pidfd_wait_exit(fd, Duration::ZERO))
    }

    /// Kills the VMM and removes everything the VM had on the host; says
    /// what, if anything, could not be removed.
    pub async fn destroy(self) -> TeardownReport {
        let remains = self
            .remains
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match remains {
            Some(mut r) => tokio::task::spawn_blocking(move || r.teardown())
                .await
                .unwrap_or_else(|e| TeardownReport {
                    leftovers: vec![format!("the teardown task failed: {e}")],
                }),
            None => TeardownReport::default(),
        }
    }
}

/// A VM is shared between tasks like any sandbox (the contract's `Sandbox`
/// is `Send + Sync`).
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<FirecrackerVm>();
};

impl Drop for FirecrackerVm {
    fn drop(&mut self) {
        let remains = self
            .remains
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut r) = remains {
            // Kill now; wait and clean up off the caller's thread.
            if let Some(fd) = &r.vmm {
                let _ = sys::pidfd_kill(fd, libc::SIGKILL);
            }
            std::thread::spawn(move || {
                let report = r.teardown();
                if !report.is_clean() {
                    tracing::warn!(leftovers = ?report.leftovers, "a dropped Firecracker VM left things behind");
                }
            });
        }
    }
}

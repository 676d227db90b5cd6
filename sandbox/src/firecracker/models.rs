//! The bodies of the Firecracker API requests and answers Kiln uses, as
//! typed values. Field names and enum spellings follow Firecracker's swagger
//! (`src/firecracker/swagger/firecracker.yaml`, v1.17); optional fields Kiln
//! does not set are left out of the JSON rather than sent as `null`, and
//! answers ignore fields Kiln does not read.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `PUT /machine-config`, `GET /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// 1 to 32 (Firecracker's range).
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    /// Needed for diff snapshots only.
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

/// Backing of guest memory (`MachineConfiguration.huge_pages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    None,
    Transparent,
    #[serde(rename = "2M")]
    Huge2M,
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// `PUT /drives/{drive_id}` (virtio-block).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: PathBuf,
    pub is_root_device: bool,
    pub is_read_only: bool,
    /// Bandwidth and operations per second of the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}` (virtio-net): the guest's NIC on
/// a tap device of the host's, opened by name in the VMM's network
/// namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// What the guest receives...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// ...and what it sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}`: new rate limiters of a running
/// VM's NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterfaceUpdate {
    pub iface_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// Firecracker's rate limiter of a device: a token bucket of bytes and
/// one of operations (either may be absent: unlimited).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// A bucket of `size` tokens refilled whole every `refill_time` ms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

impl RateLimiter {
    /// [`RateLimiter::mbit`] for an update, where no limit is a bucket of
    /// size 0 (Firecracker's "disabled"), not an absent one (unchanged).
    pub fn mbit_update(mbit: u32) -> Self {
        Self::mbit(mbit).unwrap_or(Self {
            bandwidth: Some(TokenBucket {
                size: 0,
                one_time_burst: None,
                refill_time: 100,
            }),
            ops: None,
        })
    }

    /// A bandwidth of `mbit` Mbit/s (0: `None`, unlimited): a bucket of
    /// 100 ms of traffic, refilled every 100 ms.
    pub fn mbit(mbit: u32) -> Option<Self> {
        if mbit == 0 {
            return None;
        }
        let bytes_per_s = u64::from(mbit) * 1_000_000 / 8;
        Some(Self {
            bandwidth: Some(TokenBucket {
                size: bytes_per_s / 10,
                one_time_burst: None,
                refill_time: 100,
            }),
            ops: None,
        })
    }
}

/// `PUT /vsock`: a virtio-vsock device whose host side is Firecracker's
/// hybrid vsock on `uds_path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    /// 3 or more.
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

/// `PUT /entropy`: a virtio-rng device (no rate limiter).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntropyDevice {}

/// Log levels of `PUT /logger` and `--level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "Error",
            LogLevel::Warning => "Warning",
            LogLevel::Info => "Info",
            LogLevel::Debug => "Debug",
            LogLevel::Trace => "Trace",
            LogLevel::Off => "Off",
        }
    }
}

/// `PUT /logger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logger {
    pub log_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(default)]
    pub show_level: bool,
    #[serde(default)]
    pub show_log_origin: bool,
}

/// `PUT /metrics`: where Firecracker writes its JSON metrics lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsConfig {
    pub metrics_path: PathBuf,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Boot the configured machine.
    InstanceStart,
    /// Write a metrics line now.
    FlushMetrics,
    /// Send Ctrl+Alt+Del to the guest (x86 only).
    SendCtrlAltDel,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct InstanceAction {
    pub action_type: ActionType,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct VmStateBody {
    pub state: VmState,
}

/// Full or diff (only memory dirtied since the last one) snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

/// `PUT /snapshot/create` (the VM must be paused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    pub snapshot_type: SnapshotType,
    /// The VM state file to write.
    pub snapshot_path: PathBuf,
    /// The guest memory file to write.
    pub mem_file_path: PathBuf,
}

/// How `PUT /snapshot/load` gets guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// Map the memory file privately (copy on write).
    File,
    /// Hand a userfaultfd to a page server listening on a unix socket.
    Uffd,
}

/// `SnapshotLoadParams.mem_backend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackendParams {
    pub backend_type: MemoryBackendType,
    /// The memory file (`File`) or the page server's socket (`Uffd`).
    pub backend_path: PathBuf,
}

/// `SnapshotLoadParams.vsock_override`: the restored vsock device's new
/// host socket (Firecracker 1.14 and later).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load` (on a fresh process, before any configuration but
/// the logger and metrics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    pub snapshot_path: PathBuf,
    pub mem_backend: MemoryBackendParams,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

/// The VM's state in `GET /`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The `--id` Firecracker was started with.
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
    pub app_name: String,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

/// `GET /vm/config`: the parts of the full configuration Kiln reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    #[serde(rename = "boot-source", default)]
    pub boot_source: Option<BootSource>,
    #[serde(default)]
    pub drives: Vec<Drive>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default)]
    pub vsock: Option<Vsock>,
    #[serde(default)]
    pub entropy: Option<EntropyDevice>,
}

/// The body of every error answer.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Fault {
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_render_as_the_swagger_spells_them() {
        let load = SnapshotLoadParams {
            snapshot_path: "/snapshot/vmstate".into(),
            mem_backend: MemoryBackendParams {
                backend_type: MemoryBackendType::Uffd,
                backend_path: "/run/pages.sock".into(),
            },
            resume_vm: true,
            track_dirty_pages: false,
            vsock_override: Some(VsockOverride {
                uds_path: "/run/vsock.sock".into(),
            }),
        };
        assert_eq!(
            serde_json::to_value(&load).unwrap(),
            serde_json::json!({
                "snapshot_path": "/snapshot/vmstate",
                "mem_backend": {"backend_type": "Uffd", "backend_path": "/run/pages.sock"},
                "resume_vm": true,
                "track_dirty_pages": false,
                "vsock_override": {"uds_path": "/run/vsock.sock"}
            })
        );
        let m = MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            smt: false,
            track_dirty_pages: false,
            huge_pages: Some(HugePages::Huge2M),
        };
        assert_eq!(serde_json::to_value(&m).unwrap()["huge_pages"], "2M");
        let b = BootSource {
            kernel_image_path: "/kernel".into(),
            boot_args: None,
            initrd_path: None,
        };
        assert_eq!(
            serde_json::to_string(&b).unwrap(),
            r#"{"kernel_image_path":"/kernel"}"#
        );
    }

    #[test]
    fn a_nics_rate_limiters_are_buckets_of_100_ms() {
        let nic = NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "kn3".into(),
            guest_mac: None,
            rx_rate_limiter: RateLimiter::mbit(8),
            tx_rate_limiter: RateLimiter::mbit(0),
        };
        assert_eq!(
            serde_json::to_string(&nic).unwrap(),
            r#"{"iface_id":"eth0","host_dev_name":"kn3","rx_rate_limiter":{"bandwidth":{"size":100000,"refill_time":100}}}"#
        );
        // An update says "no limit" with an empty bucket, not by leaving
        // the limiter out (that keeps it).
        assert_eq!(RateLimiter::mbit_update(0).bandwidth.unwrap().size, 0);
    }

    #[test]
    fn answers_parse_with_fields_kiln_does_not_read() {
        let info: InstanceInfo = serde_json::from_str(
            r#"{"id":"anonymous-instance","state":"Not started","vmm_version":"1.17.0-dev","app_name":"Firecracker"}"#,
        )
        .unwrap();
        assert_eq!(info.state, InstanceState::NotStarted);
        let cfg: VmConfig = serde_json::from_str(
            r#"{"balloon":null,"drives":[],"boot-source":{"kernel_image_path":"/k","initrd_path":null,"boot_args":null},
                "machine-config":{"vcpu_count":1,"mem_size_mib":128,"smt":false,"track_dirty_pages":false,"huge_pages":"None"},
                "vsock":null,"entropy":null,"pmem":[]}"#,
        )
        .unwrap();
        assert_eq!(cfg.machine_config.unwrap().mem_size_mib, 128);
        assert_eq!(
            cfg.boot_source.unwrap().kernel_image_path,
            PathBuf::from("/k")
        );
    }
}

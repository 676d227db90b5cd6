//! Booting a sandbox: a Firecracker VM of the sandbox's machine (vCPUs
//! from its CPU quota, RAM its memory plus the guest's overhead) boots
//! Kiln's guest kernel with the command line every sandbox shares, on the
//! read-only guest image, with a hybrid-vsock device and an entropy device.
//!
//! No writable disk: the guest agent puts `/work`, `/tmp`, `/dev/shm` and
//! the overlay over `/` on tmpfs, sized by the guest setup, so a job's
//! files live in guest RAM, which is bounded and goes with the VM. A disk
//! per sandbox would cost a file on the host per VM and, in a template, a
//! drive whose path and contents every restore would have to reproduce;
//! a restored tmpfs, by contrast, is just pages the page server serves.
//!
//! The agent says `ready` on host vsock port `READY_PORT` once it listens;
//! its connection arrives at `<uds>_<port>` in the VM's root, so the host
//! listens there before the guest runs ([`FirecrackerVm::configured`], then
//! `InstanceStart`), on a socket the jailed VMM's uid may connect to.

use std::time::Instant;

use kiln_protocol::SandboxStart;

use super::backend::{boot_err, vmm_alive, Inner, GUEST_CID, NAME};
use super::sandbox::FirecrackerSandbox;
use super::vm::{BootSpec, FirecrackerVm};
use crate::vm::{boot, vsock, ReadySignal, READY_PORT};
use crate::{SandboxError, SandboxSpec};

impl Inner {
    /// The machine a sandbox of `spec` boots.
    pub(super) fn boot_spec(&self, spec: &SandboxSpec) -> BootSpec {
        let network = match (&self.network, spec.allow_internet) {
            (Some(network), true) => Some(super::vm::VmNic {
                network: network.clone(),
            }),
            _ => None,
        };
        BootSpec {
            resources: self.resources(spec),
            kernel: self.cfg.kernel.clone(),
            boot_args: Some(boot::kernel_cmdline(self.cfg.verbose_console)),
            root_drive: Some(self.cfg.rootfs.clone()),
            scratch_disk_mib: None,
            vsock_cid: Some(GUEST_CID),
            entropy: true,
            network,
        }
    }

    /// Boots a sandbox: the VM, the agent's ready signal, the connection
    /// and the handshake.
    pub(super) async fn boot(
        &self,
        spec: &SandboxSpec,
    ) -> Result<FirecrackerSandbox, SandboxError> {
        let started = Instant::now();
        let (vm, ready) = self.start_vm(spec).await?;
        let deadline = started + self.cfg.boot_timeout;
        let heard = {
            let mut alive = vmm_alive(&vm);
            ready.wait(deadline, &mut alive, vm.console().guest()).await
        };
        if let Err(e) = heard {
            vm.destroy().await;
            return Err(boot_err(e));
        }
        let running = Instant::now();
        let times = super::backend::Times {
            started,
            running,
            deadline,
        };
        self.attach(vm, spec, SandboxStart::Boot, times, None).await
    }

    /// Starts the VM of `spec` with the host listening for its agent's
    /// ready signal.
    pub(super) async fn start_vm(
        &self,
        spec: &SandboxSpec,
    ) -> Result<(FirecrackerVm, ReadySignal), SandboxError> {
        let mut vm = FirecrackerVm::configured(&self.cfg.vmm, &self.boot_spec(spec))
            .await
            .map_err(|e| SandboxError::backend(NAME, e))?;
        let ready = match listen_for_ready(&vm) {
            Ok(r) => r,
            Err(e) => {
                vm.destroy().await;
                return Err(e);
            }
        };
        if let Err(e) = vm.instance_start().await {
            drop(ready);
            vm.destroy().await;
            return Err(SandboxError::backend(NAME, e));
        }
        Ok((vm, ready))
    }
}

/// Listens where the VM's guest announces its agent, on a socket its VMM
/// may connect to: a jailed Firecracker runs as the sandbox's own uid, so
/// the socket (made by root) is given to that uid.
fn listen_for_ready(vm: &FirecrackerVm) -> Result<ReadySignal, SandboxError> {
    let uds = vm
        .vsock_uds()
        .expect("a sandbox's machine has a vsock device");
    let ready = ReadySignal::listen(&uds).map_err(boot_err)?;
    if let Some((uid, gid)) = vm.jail_ids() {
        let path = vsock::guest_listener_path(&uds, READY_PORT);
        std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(|error| {
            SandboxError::Io {
                what: format!(
                    "giving the ready socket {} to the jailed VMM's uid {uid}",
                    path.display()
                ),
                error,
            }
        })?;
    }
    Ok(ready)
}

//! Booting a sandbox: a Firecracker VM of the sandbox's machine (vCPUs
//! from its CPU quota, RAM its memory plus the guest's overhead) boots
//! Kiln's guest kernel with the command line every sandbox shares, on the
//! read-only guest image (or, for a sandbox rooted in an OCI image, that
//! image's root disk, `crate::vm::image_disk`), with a hybrid-vsock device
//! and an entropy device.
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
    /// The machine a sandbox of `spec` boots; its image's root disk is
    /// built now if need be.
    pub(super) async fn boot_spec(&self, spec: &SandboxSpec) -> Result<BootSpec, SandboxError> {
        let root = match &spec.image {
            Some(image) => self.disks.disk(image).await?,
            None => self.cfg.rootfs.clone(),
        };
        Ok(self.boot_spec_on(spec, root))
    }

    /// The machine a sandbox of `spec` boots, on the root disk `root`.
    pub(super) fn boot_spec_on(&self, spec: &SandboxSpec, root: std::path::PathBuf) -> BootSpec {
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
            root_drive: Some(root),
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
        let mut vm = FirecrackerVm::configured(&self.cfg.vmm, &self.boot_spec(spec).await?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::image_disk::testing::{guest_image, image_root, scratch, static_elf};

    fn inner(dir: &std::path::Path) -> Inner {
        let rootfs = guest_image(dir, &static_elf());
        let cfg = super::super::backend::FirecrackerBackendConfig::new(
            super::super::config::FirecrackerConfig::from_env(),
            dir.join("vmlinux"),
            rootfs.clone(),
            kiln_protocol::RuntimeTable::default(),
        );
        Inner {
            cfg,
            templates: None,
            pages: None,
            fleet: Default::default(),
            disks: crate::vm::ImageDisks::new(rootfs),
            network: None,
        }
    }

    #[tokio::test]
    async fn a_sandbox_of_an_image_boots_from_its_disk_and_others_from_the_guest_image() {
        let dir = scratch("fc-image-root");
        let inner = inner(&dir);
        let mut spec = SandboxSpec::for_job(&kiln_protocol::Limits::default(), "python");
        let plain = inner.boot_spec(&spec).await.unwrap();
        assert_eq!(
            plain.root_drive.as_deref(),
            Some(inner.cfg.rootfs.as_path())
        );
        let image = image_root(&dir);
        spec.image = Some(image.clone());
        let boot = inner.boot_spec(&spec).await.unwrap();
        let disk = boot.root_drive.clone().unwrap();
        assert!(
            disk.starts_with(&image.store) && disk.extension().is_some_and(|e| e == "ext4"),
            "{}",
            disk.display()
        );
        assert!(disk.is_file());
        // The rest of the machine is the same: same kernel, command line
        // (init=/sbin/init is the image disk's agent), devices.
        assert_eq!(
            BootSpec {
                root_drive: plain.root_drive.clone(),
                ..boot
            },
            plain
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

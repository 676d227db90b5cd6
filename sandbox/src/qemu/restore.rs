//! A sandbox restored from a template instead of booted: a new QEMU with
//! the template's machine and devices (`command`), its RAM mapped
//! *privately* from the template's memory file (`share=off`: pages come
//! lazily through the page cache and are copied on the guest's first write
//! to each, so the published file is never written and clones share what
//! they only read), `-incoming defer`, `x-ignore-shared` (the stream holds
//! device state only: the RAM is already there), `migrate-incoming` from
//! the template's vmstate (a descriptor QEMU inherits), `cont`, then the
//! agent over the virtio-serial port and the handshake: `Hello` keeps the
//! warm interpreters, the guest setup brings this sandbox's entropy,
//! clock, hostname, id and limits.
//!
//! QEMU 7.2's `readonly=on` would map the file without write access, which
//! the guest's RAM cannot be; a private mapping of a file opened for
//! writing is what is left, and no write reaches the file through it.
//! With `-incoming`, QEMU does not copy the kernel image into RAM at reset
//! (`rom_reset` skips ROM blobs in the `inmigrate` state), so the
//! template's RAM is what the guest resumes on.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_protocol::{SandboxStart, SandboxTimings};
use kiln_snapshotter::store::Snapshot;
use serde_json::json;

use super::command::{Channel, Launch, Machine, Memory, INCOMING_FD};
use super::template::{await_migration, qmp_err};
use super::vm::{Origin, QemuVm, VmKind, AGENT_SOCK, QMP_SOCK};
use super::{io_err, ms, Inner};
use crate::vm::{boot, Console};
use crate::{Sandbox as _, SandboxError, SandboxSpec};

impl Inner {
    /// Restores a VM for `spec` from the template `snap` (whose key
    /// matches the spec's) and hands over its set-up agent.
    pub(super) async fn restore(
        &self,
        spec: &SandboxSpec,
        snap: &Snapshot,
    ) -> Result<QemuVm, SandboxError> {
        let template = snap.manifest().id.to_string();
        let (kernel, rootfs) = self.template_artefacts(snap).await?;
        let (id, dir, mut remains) = self.new_vm_dir(VmKind::Sandbox)?;
        let tap = self.attach_network(&id, spec, &mut remains).await?;
        let machine = Machine::of(self, spec);
        let launch = Launch {
            machine,
            channel: Channel::Port {
                socket: dir.join(AGENT_SOCK),
            },
            memory: Memory::File {
                path: snap.memory_path(),
                shared: false,
            },
            kernel,
            rootfs,
            cmdline: snap
                .manifest()
                .inputs
                .get("cmdline")
                .cloned()
                .unwrap_or_else(|| self.kernel_cmdline(true)),
            qmp: dir.join(QMP_SOCK),
            tap,
            incoming: Some(
                std::fs::File::open(snap.vmstate_path())
                    .map_err(io_err(format!("opening {}", snap.vmstate_path().display())))?,
            ),
        };
        let console = Arc::new(Console::default());
        let mut vm = self
            .start_qemu(id, dir, remains, console, &launch, &[])
            .await?;

        let deadline = vm.at + self.cfg.boot_timeout;
        let console = vm.console.clone();
        let qmp = &mut vm.qmp;
        vm.remains
            .watch(&console, "loading the template's device state", async {
                qmp.execute(
                    "migrate-set-capabilities",
                    Some(
                        json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
                    ),
                )
                .await
                .map_err(qmp_err("migrate-set-capabilities x-ignore-shared"))?;
                qmp.execute(
                    "migrate-incoming",
                    Some(json!({"uri": format!("fd:{INCOMING_FD}")})),
                )
                .await
                .map_err(qmp_err("migrate-incoming"))?;
                await_migration(qmp, deadline.saturating_duration_since(Instant::now())).await?;
                // The template was paused when saved, so the VM waits for this.
                qmp.execute("cont", None).await.map_err(qmp_err("cont"))?;
                Ok(())
            })
            .await?;

        let resumed = vm.at.elapsed();
        // Only once the state is loaded: the guest learns of its new host
        // from the port-open message QEMU sends when the host connects.
        let agent = self.connect_port(&mut vm, deadline).await?;
        let connected = vm.at.elapsed();
        tracing::info!(
            sandbox = %vm.id,
            template = %template,
            restore_ms = connected.as_millis() as u64,
            "guest restored"
        );
        let mut setup =
            boot::guest_setup(&vm.id, spec).map_err(io_err("drawing the guest's entropy"))?;
        setup.network = vm.remains.net.as_ref().map(crate::network::NetLease::guest);
        let hello = self.hello(spec);
        let within = self.cfg.hello_timeout;
        let shaken = vm
            .remains
            .watch(&console, "the restored agent answered", async {
                boot::handshake(&agent, hello, setup, within)
                    .await
                    .map_err(SandboxError::from)
            })
            .await;
        let setup_done = vm.at.elapsed();
        let qemu = QemuVm {
            id: vm.id,
            agent,
            remains: Mutex::new(Some(vm.remains)),
            console: vm.console,
            qemu_pid: vm.qemu_pid,
            uds: None,
            timings: SandboxTimings {
                how: SandboxStart::Restore,
                start_ms: ms(resumed),
                connect_ms: ms(connected - resumed),
                setup_ms: ms(setup_done - connected),
            },
            accel: self.accel,
            qmp: tokio::sync::Mutex::new(vm.qmp),
            origin: Origin::Restored { template },
        };
        match shaken {
            Ok(()) => Ok(qemu),
            Err(e) => {
                qemu.destroy().await;
                Err(e)
            }
        }
    }
}

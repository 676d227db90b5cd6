//! A sandbox booted from the kernel: `vhost-device-vsock` for the guest's
//! virtio-vsock device (the same hybrid-vsock bytes as Firecracker's), QEMU
//! with guest RAM in a shared memfd (vhost-user maps it too), the agent's
//! `ready` awaited on the vsock, then the handshake. What every create
//! does when no template serves the spec.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_protocol::{SandboxStart, SandboxTimings};

use super::command::{Channel, Launch, Machine, Memory};
use super::vm::{Origin, QemuVm, Remains, VmKind, QMP_SOCK, VHOST_SOCK, VSOCK_SOCK};
use super::{boot_err, io_err, ms, Inner, GUEST_CID};
use crate::network::NetLease;
use crate::vm::process::spawn_tied;
use crate::vm::{boot, Console, ReadySignal};
use crate::{AgentConn, Sandbox as _, SandboxError, SandboxId, SandboxSpec};

impl Inner {
    /// Boots a VM for `spec` and hands over its set-up agent.
    pub(super) async fn boot(&self, spec: &SandboxSpec) -> Result<QemuVm, SandboxError> {
        let rootfs = self.rootfs(spec).await?;
        let (id, dir, mut remains) = self.new_vm_dir(VmKind::Sandbox)?;
        let console = Arc::new(Console::default());
        let uds = dir.join(VSOCK_SOCK);
        // The network (its processes) while vhost-device-vsock starts.
        let (vhost, net) = tokio::join!(
            self.start_vhost(&id, &dir, &uds, &console, &mut remains),
            self.network_for(&id, spec)
        );
        let (lease, tap) = net?.unzip();
        remains.net = lease;
        let vhost_pid = vhost?;
        let ready = ReadySignal::listen(&uds).map_err(boot_err)?;
        let machine = Machine::of(self, spec);
        let launch = Launch {
            machine,
            channel: Channel::Vsock {
                vhost: dir.join(VHOST_SOCK),
            },
            memory: Memory::SharedMemfd,
            kernel: self.cfg.kernel.clone(),
            rootfs,
            cmdline: self.kernel_cmdline(false),
            qmp: dir.join(QMP_SOCK),
            tap,
            incoming: None,
        };
        let mut vm = self
            .start_qemu(id, dir, remains, console, &launch, &[vhost_pid])
            .await?;

        // Boot: wait for the agent's `ready`, then connect.
        let deadline = vm.at + self.cfg.boot_timeout;
        let mut alive = || vm.remains.exited();
        ready
            .wait(deadline, &mut alive, &vm.console)
            .await
            .map_err(boot_err)?;
        let booted = vm.at.elapsed();
        let stream = boot::connect_agent(&uds, deadline, &mut alive, &vm.console)
            .await
            .map_err(boot_err)?;
        let connected = vm.at.elapsed();
        tracing::info!(
            sandbox = %vm.id,
            accel = self.accel.as_str(),
            boot_ms = connected.as_millis() as u64,
            "guest agent is listening"
        );

        let mut setup =
            boot::guest_setup(&vm.id, spec).map_err(io_err("drawing the guest's entropy"))?;
        setup.network = vm.remains.net.as_ref().map(NetLease::guest);
        let mut qemu = QemuVm {
            id: vm.id,
            agent: AgentConn::new(stream),
            remains: Mutex::new(Some(vm.remains)),
            console: vm.console,
            qemu_pid: vm.qemu_pid,
            uds: Some(uds),
            timings: SandboxTimings {
                how: SandboxStart::Boot,
                start_ms: ms(booted),
                connect_ms: ms(connected - booted),
                setup_ms: 0.0,
            },
            accel: self.accel,
            qmp: tokio::sync::Mutex::new(vm.qmp),
            origin: Origin::Booted,
        };
        match boot::handshake(&qemu.agent, self.hello(spec), setup, self.cfg.hello_timeout).await {
            Ok(()) => {
                qemu.timings.setup_ms = ms(vm.at.elapsed() - connected);
                Ok(qemu)
            }
            Err(e) => {
                qemu.destroy().await;
                Err(e.into())
            }
        }
    }

    /// Starts vhost-device-vsock for the VM: it serves the guest's
    /// virtio-vsock device over vhost-user and exposes it to the host as
    /// the hybrid vsock `uds`. Returns its pid once its socket exists.
    async fn start_vhost(
        &self,
        id: &SandboxId,
        dir: &Path,
        uds: &Path,
        console: &Arc<Console>,
        remains: &mut Remains,
    ) -> Result<u32, SandboxError> {
        let mut vhost = Command::new(&self.vhost_vsock);
        vhost
            .arg("--guest-cid")
            .arg(GUEST_CID.to_string())
            .arg("--socket")
            .arg(dir.join(VHOST_SOCK))
            .arg("--uds-path")
            .arg(uds)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn_tied(vhost)
            .map_err(io_err(format!("starting {}", self.vhost_vsock.display())))?;
        if let Some(e) = child.stderr.take() {
            Console::follow(console, id, e);
        }
        let pid = child.id();
        remains.vhost = Some(child);
        let vhost_sock = dir.join(VHOST_SOCK);
        if !wait_for(Duration::from_secs(5), || vhost_sock.exists()).await {
            return Err(SandboxError::Unsupported(format!(
                "vhost-device-vsock did not create {} within 5 s: {}",
                vhost_sock.display(),
                console.tail()
            )));
        }
        Ok(pid)
    }
}

/// Polls `cond` every 10 ms until it holds or `within` passes.
async fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + within;
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

//! QEMU's command line for a sandbox's VM, in its three shapes: a VM booted
//! to serve one sandbox (the agent over vhost-user vsock, RAM in a shared
//! memfd as vhost-user needs), a template VM (the agent over a
//! virtio-serial port, RAM in a shared file that becomes the template's
//! memory), and a VM restored from a template (the same devices, RAM mapped
//! privately from the template's file, device state loaded from
//! `-incoming`). A restore must describe the very machine its template
//! was: same devices in the same order, same RAM size and backend id, same
//! kernel and image; everything here is shared by both so that they cannot
//! drift apart.

use std::fs::File;
use std::os::fd::{AsRawFd as _, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Accel, Inner};
use crate::vm::boot;
use crate::SandboxSpec;

/// The name of the agent's virtio-serial port (`kiln.vport=`).
pub const AGENT_PORT_NAME: &str = "kiln.agent";

/// The QEMU device id of that port, as `VSERPORT_CHANGE` events name it.
pub const AGENT_PORT_ID: &str = "agent-port";

/// What a template fixes about a VM's hardware. A version of the device
/// set below; bump it when the devices of template and restored VMs
/// change, so that no restore meets a template of other hardware.
pub const MACHINE_RECIPE: &str =
    "microvm acpi=off; virtio-serial-device + virtserialport kiln.agent; virtio-blk ro; virtio-rng; ttyS0; virtio-net net0 when networked, configured by the setup; v2";

/// The machine's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    /// Guest RAM: the job's memory plus the guest's overhead.
    pub mem_mb: u64,
    pub vcpus: u32,
    pub network: bool,
}

impl Machine {
    pub fn of(inner: &Inner, spec: &SandboxSpec) -> Self {
        Self {
            mem_mb: spec.memory_mb + inner.cfg.memory_overhead_mb,
            vcpus: (spec.cpu_millis.div_ceil(1000) as u32).clamp(1, inner.cfg.max_vcpus.max(1)),
            network: spec.allow_internet,
        }
    }
}

/// How the host reaches the agent.
#[derive(Debug, Clone)]
pub enum Channel {
    /// virtio-vsock through vhost-device-vsock listening on `vhost`.
    Vsock { vhost: PathBuf },
    /// A virtio-serial port on a chardev socket that QEMU listens on.
    Port { socket: PathBuf },
}

/// Where guest RAM lives.
#[derive(Debug, Clone)]
pub enum Memory {
    /// A shared memfd (vhost-user maps it too).
    SharedMemfd,
    /// A file: `shared` writes go to it (a template), else the file is
    /// mapped privately, copy-on-write (a restore; the file is never
    /// written).
    File { path: PathBuf, shared: bool },
}

/// A VM to start.
#[derive(Debug)]
pub struct Launch {
    pub machine: Machine,
    pub channel: Channel,
    pub memory: Memory,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub cmdline: String,
    pub qmp: PathBuf,
    /// The host-side tap device of a networked VM (`kn<slot>`, see
    /// `network::NetLease::attach_tap`); a networked machine without one
    /// (a template being built) has its NIC on a hub port that leads
    /// nowhere.
    pub tap: Option<String>,
    /// Wait for the device state (`-incoming defer`) instead of booting,
    /// to be read from this file, which QEMU inherits as [`INCOMING_FD`].
    pub incoming: Option<File>,
}

/// The descriptor number under which a restoring QEMU inherits its device
/// state (`migrate-incoming fd:3`): QEMU reads it directly, instead of
/// through a shell and `cat` that an `exec:` URI would start.
pub const INCOMING_FD: RawFd = 3;

impl Inner {
    /// The guest kernel's command line: the same for every sandbox of a
    /// kind (a snapshot freezes it); what is unique to one travels in its
    /// guest setup.
    /// A networked guest's address is no exception: its setup brings it.
    pub(super) fn kernel_cmdline(&self, port: bool) -> String {
        let mut c = boot::kernel_cmdline(self.cfg.verbose_console);
        if port {
            c.push_str(" kiln.vport=");
            c.push_str(AGENT_PORT_NAME);
        }
        c
    }

    pub(super) fn qemu_command(&self, l: &Launch) -> Command {
        let mem_mb = l.machine.mem_mb;
        let mut cmd = Command::new(&self.qemu);
        cmd.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-M")
        .arg("microvm,acpi=off,x-option-roms=off,memory-backend=mem")
        .arg("-object")
        .arg(match &l.memory {
            Memory::SharedMemfd => format!("memory-backend-memfd,id=mem,size={mem_mb}M,share=on"),
            Memory::File { path, shared } => format!(
                "memory-backend-file,id=mem,size={mem_mb}M,mem-path={},share={}",
                qemu_value(path),
                if *shared { "on" } else { "off" }
            ),
        })
        .arg("-m")
        .arg(format!("{mem_mb}M"))
        .arg("-smp")
        .arg(l.machine.vcpus.to_string());
        match self.accel {
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => cmd
                .arg("-accel")
                .arg(format!("tcg,tb-size={}", self.cfg.tcg_cache_mb))
                .args(["-cpu", "max"]),
        };
        cmd.arg("-kernel")
            .arg(&l.kernel)
            .arg("-append")
            .arg(&l.cmdline)
            .arg("-drive")
            .arg(format!(
                "id=root,file={},format=raw,if=none,read-only=on",
                qemu_value(&l.rootfs)
            ))
            .args(["-device", "virtio-blk-device,drive=root"]);
        match &l.channel {
            Channel::Vsock { vhost } => cmd
                .arg("-chardev")
                .arg(format!("socket,id=vsock,path={}", qemu_value(vhost)))
                .args(["-device", "vhost-user-vsock-device,chardev=vsock"]),
            Channel::Port { socket } => cmd
                .args(["-device", "virtio-serial-device,max_ports=2"])
                .arg("-chardev")
                .arg(format!(
                    "socket,id=agent,path={},server=on,wait=off",
                    qemu_value(socket)
                ))
                .arg("-device")
                .arg(format!(
                    "virtserialport,chardev=agent,name={AGENT_PORT_NAME},id={AGENT_PORT_ID}"
                )),
        };
        cmd.args(["-object", "rng-random,id=rng,filename=/dev/urandom"])
            .args(["-device", "virtio-rng-device,rng=rng"])
            .args([
                "-chardev",
                "stdio,id=console,signal=off",
                "-serial",
                "chardev:console",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qemu_value(&l.qmp)));
        if l.machine.network {
            // The tap is opened by name, in the host side's namespace
            // (QEMU is started there, see `start_qemu`).
            let netdev = match &l.tap {
                Some(tap) => format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
                None => "hubport,id=net0,hubid=0".to_owned(),
            };
            cmd.arg("-netdev")
                .arg(netdev)
                .args(["-device", "virtio-net-device,netdev=net0"]);
        }
        if let (Some(ns), true) = (self.host_netns(), l.tap.is_some()) {
            // The namespace's descriptor is the backend's, open until the
            // spawn returns.
            crate::network::command::spawn_in_netns(&mut cmd, ns);
        }
        if let Some(state) = &l.incoming {
            cmd.args(["-incoming", "defer"]);
            let fd = state.as_raw_fd();
            // SAFETY: dup2 and fcntl are async-signal-safe and touch no
            // memory; `fd` stays open until the spawn returns (the caller
            // holds `l`).
            unsafe {
                cmd.pre_exec(move || {
                    let r = if fd == INCOMING_FD {
                        libc::fcntl(fd, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(fd, INCOMING_FD)
                    };
                    if r == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd
    }
}

/// A path as a value inside QEMU's `key=value,...` option syntax, where a
/// comma is written twice.
fn qemu_value(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// A path inside a shell command (QEMU's `exec:` migration URIs run
/// `/bin/sh -c`), single-quoted.
pub fn shell_quoted(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_and_quotes_in_paths_cannot_change_options_or_commands() {
        assert_eq!(qemu_value(Path::new("/a,b/m")), "/a,,b/m");
        assert_eq!(shell_quoted(Path::new("/x/it's")), r"'/x/it'\''s'");
    }
}

//! Restoring a sandbox from its template: a fresh Firecracker loads the
//! template's VM state with `PUT /snapshot/load`, its guest memory served
//! by Kiln's page server (`Uffd`) or mapped from the template's memory file
//! (`File`, per `snapshot.memory`), its vsock device moved to the new VM's
//! own socket (`vsock_override`), and resumes. The restored agent already
//! listens (it was listening when the template was taken; Firecracker
//! resets the connections a snapshot held), so the host connects at once,
//! without a ready signal, and the handshake's guest setup gives this
//! guest its own entropy, clock, hostname and id.
//!
//! [`Pages`] is the backend's one page server: one listening socket per
//! template and serving mode, made on first use. A template's first
//! restores `Record` the pages its guest touches (the working set is
//! written next to the template when such a restore ends); once one is
//! there, later restores `Prefetch` it (`snapshot.memory = prefetch`), or
//! every restore serves lazily (`lazy`). Jailed, the sockets are
//! hard-linked into each VMM's chroot, so they live on the chroot base's
//! filesystem, in a root-only directory, open to every uid (each jailed
//! VMM has its own). The directory is named after the owning process, so
//! that the sockets of a crashed one are found and removed
//! ([`reap_page_sockets`]).

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use kiln_protocol::SandboxStart;
use kiln_snapshotter::store::Snapshot as Template;
use kiln_snapshotter::{PageServer, ServeMode, ServerError};
use sha2::{Digest as _, Sha256};

use super::backend::{Inner, Times, GUEST_CID, NAME};
use super::sandbox::FirecrackerSandbox;
use super::snapshot::{MachineSummary, MemoryBackend, RestoreSpec, Snapshot};
use super::vm::FirecrackerVm;
use crate::record::Owner;
use crate::settings::MemoryMode;
use crate::{ReapReport, SandboxError, SandboxSpec};

/// The page servers' socket directories of jailed VMMs, under the chroot
/// base.
pub(super) const PAGES_DIR: &str = "kiln-pages";
/// Likewise for unjailed VMMs, under the state directory.
pub(super) const UNJAILED_PAGES_DIR: &str = "firecracker-pages";

/// Where a restored VM's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySource {
    /// Firecracker maps the template's memory file (`snapshot.memory = file`).
    File,
    /// Kiln's page server serves it, in this mode.
    PageServer(ServeMode),
}

/// A template's VM restored and running, its agent not yet connected.
#[derive(Debug)]
#[must_use = "a dropped VM is killed"]
pub struct RestoredVm {
    pub vm: FirecrackerVm,
    /// The template's id.
    pub template: String,
    pub memory: MemorySource,
    /// When the new VMM was spawned.
    pub started: Instant,
}

/// The backend's page server and its sockets.
pub(super) struct Pages {
    /// `None` only while dropping (the server goes first, then its sockets'
    /// directory).
    server: Option<PageServer>,
    /// `<parent>/<pid>.<start time>`, this process's socket directory.
    dir: PathBuf,
    /// Sockets listening, by name.
    listening: Mutex<HashMap<String, PathBuf>>,
}

impl Pages {
    /// Makes this process's socket directory under `parent` (root-only).
    pub fn open(server: PageServer, parent: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(parent)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))?;
        let me = Owner::current()?;
        let dir = parent.join(format!("{}.{}", me.pid, me.start));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir)?;
        Ok(Self {
            server: Some(server),
            dir,
            listening: Mutex::new(HashMap::new()),
        })
    }

    pub fn server(&self) -> &PageServer {
        self.server
            .as_ref()
            .expect("the page server lives until drop")
    }

    /// The socket serving `template` in `mode`, listening from now on. The
    /// name is a hash of the template's directory, the digest of its
    /// memory and the mode: a template removed and built again with other
    /// memory gets a socket of its own (and short, for `sun_path`).
    pub fn socket(&self, template: &Template, mode: ServeMode) -> Result<PathBuf, ServerError> {
        let mut h = Sha256::new();
        h.update(template.dir().as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(template.manifest().memory.sha256.as_bytes());
        let digest = h.finalize();
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let name = format!(
            "{hex}-{}.sock",
            match mode {
                ServeMode::Lazy => "lazy",
                ServeMode::Record => "record",
                ServeMode::Prefetch => "prefetch",
            }
        );
        let mut listening = self.listening.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = listening.get(&name) {
            return Ok(p.clone());
        }
        let path = self.dir.join(&name);
        self.server().listen(&path, template.source(mode))?;
        listening.insert(name, path.clone());
        Ok(path)
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // Ends every restore (a recording one writes its working set) and
        // joins the server's threads before the sockets' directory goes.
        drop(self.server.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes the page servers' socket directories of dead kiln processes,
/// under `<state_dir>/firecracker-pages` and `<chroot_base>/kiln-pages`.
pub fn reap_page_sockets(state_dir: &Path, chroot_base: Option<&Path>) -> ReapReport {
    let mut report = ReapReport::default();
    let parents = [
        Some(state_dir.join(UNJAILED_PAGES_DIR)),
        chroot_base.map(|b| b.join(PAGES_DIR)),
    ];
    for parent in parents.into_iter().flatten() {
        for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let owner = name.split_once('.').and_then(|(pid, start)| {
                Some(Owner {
                    pid: pid.parse().ok()?,
                    start: start.parse().ok()?,
                })
            });
            // A directory not named after its owner is not ours to judge.
            let Some(owner) = owner else { continue };
            if owner.is_alive() {
                continue;
            }
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => report.reaped.push(format!("page server sockets {name}")),
                Err(err) => report.failed.push(format!("{}: {err}", e.path().display())),
            }
        }
    }
    report
}

impl Inner {
    /// The VMM half of a restore from `template` (a template of `spec`'s
    /// key, as [`Inner::usable_template`] found it).
    pub(super) async fn restore_vm(
        &self,
        template: &Template,
        spec: &SandboxSpec,
    ) -> Result<RestoredVm, SandboxError> {
        let pages_err = |e: ServerError| SandboxError::backend(NAME, e);
        let memory = match (self.cfg.memory, &self.pages) {
            (MemoryMode::File, _) | (_, None) => MemorySource::File,
            (MemoryMode::Lazy, Some(_)) => MemorySource::PageServer(ServeMode::Lazy),
            (MemoryMode::Prefetch, Some(_)) => {
                MemorySource::PageServer(if template.working_set_path().is_file() {
                    ServeMode::Prefetch
                } else {
                    ServeMode::Record
                })
            }
        };
        let backend = match (memory, &self.pages) {
            (MemorySource::PageServer(mode), Some(pages)) => MemoryBackend::Uffd {
                socket: pages.socket(template, mode).map_err(pages_err)?,
            },
            _ => MemoryBackend::File,
        };
        // The template's key matched this spec's, so its machine is this
        // spec's machine.
        let resources = self.resources(spec);
        let snapshot = Snapshot {
            vmstate: template.vmstate_path(),
            memory: template.memory_path(),
            machine: MachineSummary {
                vcpus: resources.vcpus,
                memory_mib: resources.memory_mib,
                vsock_cid: Some(GUEST_CID),
            },
            root_drive: Some(self.cfg.rootfs.clone()),
        };
        let started = Instant::now();
        let vm = FirecrackerVm::restore(
            &self.cfg.vmm,
            &RestoreSpec {
                snapshot,
                backend,
                resume: true,
                cpu_millis: spec.cpu_millis,
            },
        )
        .await
        .map_err(|e| SandboxError::backend(NAME, e))?;
        Ok(RestoredVm {
            vm,
            template: template.manifest().id.to_string(),
            memory,
            started,
        })
    }

    /// Restores a sandbox of `spec` from `template`: the VM, then the
    /// connection to its agent and the handshake.
    pub(super) async fn restore(
        &self,
        template: &Template,
        spec: &SandboxSpec,
    ) -> Result<FirecrackerSandbox, SandboxError> {
        let restored = self.restore_vm(template, spec).await?;
        let running = Instant::now();
        tracing::debug!(
            sandbox = %restored.vm.id(),
            template = %restored.template,
            memory = ?restored.memory,
            "restored; connecting to its agent"
        );
        let times = Times {
            started: restored.started,
            running,
            deadline: running + self.cfg.hello_timeout,
        };
        self.attach(
            restored.vm,
            spec,
            SandboxStart::Restore,
            times,
            Some(restored.template),
        )
        .await
    }
}

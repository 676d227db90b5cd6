//! Templates of the Firecracker backend: a sandbox's VM booted once with
//! Kiln's guest, its runtimes warmed by the agent, paused and snapshotted
//! (`Full`), its memory and VM state published in the template store with
//! the inputs it was made from. Restores (`restore`) start from it.
//!
//! Building one, step by step (each reported through `progress`):
//!
//! 1. the VM of the spec's machine boots and its agent shakes hands with
//!    `Hello` naming the runtimes to warm, as any sandbox's (`boot`);
//! 2. `AwaitWarm`: the agent answers once its warm interpreters wait;
//! 3. the host closes its connection (the agent goes back to accepting,
//!    and Firecracker resets whatever vsock connection a snapshot holds);
//! 4. pause and `PUT /snapshot/create` into the VM's own root;
//! 5. memory and VM state copied into the store under the template id
//!    (published whole or not at all), then the VM destroyed with its
//!    files. Any failure destroys the VM and publishes nothing.
//!
//! One build per template id at a time in a process: a second caller waits
//! for the first and finds the template published. The id is the hash of
//! the inputs ([`TemplateInputs`]): the kernel and image (by content), the
//! runtime table, `firecracker --version`, the machine (vCPUs, RAM, its
//! devices, the kernel command line, the root drive's path as the VMM saw
//! it, which a restore must reproduce) and the runtimes warmed.

use std::path::Path;
use std::sync::Mutex;

use kiln_snapshotter::store::{Snapshot as Template, StoreError};

use super::backend::{Inner, GUEST_CID, NAME};
use super::process::names;
use super::vm::FirecrackerVm;
use crate::template::{
    warmed_runtimes, BuildLocks, GuestInputs, GuestInputsError, TemplateError, TemplateInfo,
    TemplateInputs, TemplateKey, TemplateStore,
};
use crate::{SandboxError, SandboxSpec};

/// The machine's devices, as a template input: a change here must make
/// new templates.
const MACHINE_RECIPE: &str = "firecracker: smt off, no dirty-page tracking, PVH vmlinux, root drive read-only (no scratch disk), vsock, entropy, no network";

/// The backend's templates: the store, the inputs every template shares
/// (hashed once per process), a lock per template id being built.
pub(super) struct Templates {
    pub store: TemplateStore,
    base: tokio::sync::OnceCell<GuestInputs>,
    building: BuildLocks,
    /// The inputs of every spec seen, to flag current templates in lists.
    seen: Mutex<Vec<TemplateInputs>>,
}

/// Why a template could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The template's agent did not have its runtimes warm.
    #[error("the template's agent did not warm its runtimes: {0}")]
    Warm(#[source] crate::AgentError),
    /// Firecracker could not snapshot the template VM.
    #[error("snapshotting the template VM: {0}")]
    Snapshot(#[source] super::snapshot::SnapshotError),
    /// The store refused the template.
    #[error("publishing the template: {0}")]
    Publish(#[source] TemplateError),
    /// The kernel, the image or Firecracker's version could not be
    /// identified.
    #[error("identifying the template's inputs: {0}")]
    Inputs(#[source] GuestInputsError),
}

fn build_err(e: BuildError) -> SandboxError {
    SandboxError::backend(NAME, e)
}

impl Templates {
    pub fn open(root: &Path) -> Result<Self, TemplateError> {
        Ok(Self {
            store: TemplateStore::open(root, NAME)?,
            base: tokio::sync::OnceCell::new(),
            building: BuildLocks::default(),
            seen: Mutex::new(Vec::new()),
        })
    }

    fn remember(&self, inputs: &TemplateInputs) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.iter().any(|s| s.id() == inputs.id()) {
            seen.push(inputs.clone());
        }
    }

    /// Every template of this backend in the store.
    pub fn list(&self) -> Result<Vec<TemplateInfo>, TemplateError> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.store.list(&seen)
    }

    fn info(&self, id: &str) -> Result<TemplateInfo, SandboxError> {
        self.list()
            .map_err(|e| SandboxError::backend(NAME, e))?
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| {
                SandboxError::backend(
                    NAME,
                    TemplateError::Store(StoreError::NotFound(
                        kiln_snapshotter::store::SnapshotId::new(id)
                            .expect("ids of published templates are valid"),
                    )),
                )
            })
    }
}

impl Inner {
    fn templates(&self) -> Result<&Templates, SandboxError> {
        self.templates.as_ref().ok_or_else(|| {
            SandboxError::Unsupported(
                "templates are off for this backend ([snapshot] templates = false)".into(),
            )
        })
    }

    /// What every template shares: the kernel's and image's identities
    /// (their SHA-256, computed once per process, off the async threads),
    /// the runtime table and Firecracker's version.
    async fn base_inputs<'t>(&self, t: &'t Templates) -> Result<&'t GuestInputs, SandboxError> {
        t.base
            .get_or_try_init(|| async {
                let store = t.store.clone();
                let (kernel, rootfs) = (self.cfg.kernel.clone(), self.cfg.rootfs.clone());
                let firecracker = self.cfg.vmm.firecracker_bin.clone();
                let runtimes = self.cfg.runtimes.clone();
                tokio::task::spawn_blocking(move || {
                    GuestInputs::identify(&store, &kernel, &rootfs, &firecracker, &runtimes)
                })
                .await
                .map_err(|e| SandboxError::Io {
                    what: "identifying the guest kernel and image".into(),
                    error: std::io::Error::other(e),
                })?
                .map_err(|e| build_err(BuildError::Inputs(e)))
            })
            .await
    }

    /// The template inputs of sandboxes of `spec` (remembered, so that
    /// listings flag their template as current).
    pub(super) async fn template_inputs(
        &self,
        spec: &SandboxSpec,
    ) -> Result<TemplateInputs, SandboxError> {
        let t = self.templates()?;
        let base = self.base_inputs(t).await?;
        let machine = self.resources(spec);
        let key = TemplateKey {
            warm: warmed_runtimes(&self.cfg.runtimes, spec),
            vcpus: u32::from(machine.vcpus),
            memory_mb: machine.memory_mib,
            network: false,
            image: None,
        };
        let root_drive = if self.cfg.vmm.jailer.is_some() {
            Path::new("/").join(names::ROOTFS)
        } else {
            self.cfg.rootfs.clone()
        };
        let inputs = TemplateInputs::new(
            NAME,
            key,
            base.kernel.clone(),
            base.rootfs.clone(),
            &base.runtimes,
            &base.vmm,
        )
        .with(
            "agent",
            format!("kiln-agent {} (in the image)", env!("CARGO_PKG_VERSION")),
        )
        .with("machine", MACHINE_RECIPE)
        .with("vsock_cid", GUEST_CID.to_string())
        .with(
            "cmdline",
            crate::vm::boot::kernel_cmdline(self.cfg.verbose_console),
        )
        .with(
            "job_user",
            format!("{}:{}", self.cfg.job_uid, self.cfg.job_gid),
        )
        .with("root_drive", root_drive.to_string_lossy());
        t.remember(&inputs);
        Ok(inputs)
    }

    /// The template to restore sandboxes of `spec` from, if any is usable
    /// (the current one, or an older one of the same key while the current
    /// one is built).
    pub(super) async fn usable_template(
        &self,
        spec: &SandboxSpec,
    ) -> Result<Option<Template>, SandboxError> {
        let inputs = self.template_inputs(spec).await?;
        let store = self.templates()?.store.clone();
        tokio::task::spawn_blocking(move || store.usable(&inputs))
            .await
            .map_err(|e| SandboxError::Io {
                what: "looking for a template".into(),
                error: std::io::Error::other(e),
            })
    }

    /// Makes sure the current template of `spec` is published, building it
    /// if not.
    pub(super) async fn prepare_template(
        &self,
        spec: &SandboxSpec,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<TemplateInfo, SandboxError> {
        let t = self.templates()?;
        let inputs = self.template_inputs(spec).await?;
        let id = inputs.id().to_string();
        if t.store.current(&inputs).is_some() {
            return t.info(&id);
        }
        let lock = t.building.of(&id);
        let _building = match lock.try_lock() {
            Ok(g) => g,
            Err(_) => {
                progress(&format!("waiting for the build of {id} under way"));
                lock.lock().await
            }
        };
        if t.store.current(&inputs).is_some() {
            return t.info(&id);
        }
        let resources = self.resources(spec);
        progress(&format!(
            "building {id}: booting a VM ({} vCPU, {} MiB)",
            resources.vcpus, resources.memory_mib
        ));
        let sandbox = self.boot(spec).await?;
        progress(&format!(
            "warming {} in the guest",
            if spec.warm.is_empty() {
                "nothing".to_owned()
            } else {
                spec.warm.join(", ")
            }
        ));
        if let Err(e) = sandbox.agent_conn().await_warm(self.cfg.warm_timeout).await {
            crate::Sandbox::destroy(sandbox).await;
            return Err(build_err(BuildError::Warm(e)));
        }
        let vm = sandbox.into_vm();
        self.publish_template(&inputs, vm, progress).await
    }

    /// Snapshots `vm` (ready, warm, no connection held) and publishes it as
    /// the template of `inputs`; destroys the VM whatever happens.
    pub(super) async fn publish_template(
        &self,
        inputs: &TemplateInputs,
        vm: FirecrackerVm,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<TemplateInfo, SandboxError> {
        let t = match self.templates() {
            Ok(t) => t,
            Err(e) => {
                vm.destroy().await;
                return Err(e);
            }
        };
        let id = inputs.id().to_string();
        progress("pausing the VM and taking its snapshot");
        let snapshot = match vm.snapshot_in_root().await {
            Ok(s) => s,
            Err(e) => {
                vm.destroy().await;
                return Err(build_err(BuildError::Snapshot(e)));
            }
        };
        let size = std::fs::metadata(&snapshot.memory).map_or(0, |m| m.len());
        progress(&format!("publishing {id} ({} MiB of memory)", size >> 20));
        let (store, draft) = (t.store.clone(), inputs.clone());
        let published = tokio::task::spawn_blocking(move || {
            store.publish(&draft, &snapshot.memory, &snapshot.vmstate)
        })
        .await;
        let report = vm.destroy().await;
        if !report.is_clean() {
            tracing::warn!(template = %id, leftovers = ?report.leftovers, "the template VM left things behind");
        }
        match published {
            Ok(Ok(_)) => {}
            // Another process built the same template meanwhile: same
            // inputs, so as good as ours.
            Ok(Err(TemplateError::Store(StoreError::AlreadyPublished(_)))) => {}
            Ok(Err(e)) => return Err(build_err(BuildError::Publish(e))),
            Err(e) => {
                return Err(SandboxError::Io {
                    what: "publishing the template".into(),
                    error: std::io::Error::other(e),
                })
            }
        }
        progress(&format!("{id} published"));
        t.store.retire_superseded(inputs);
        t.info(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_build_per_template_id_at_a_time() {
        let dir = std::env::temp_dir().join(format!("kiln-fc-locks-{}", std::process::id()));
        let t = Templates::open(&dir).unwrap();
        let a = t.building.of("firecracker-a");
        let held = a.try_lock().unwrap();
        // The same id: the second builder waits; another id does not.
        assert!(t.building.of("firecracker-a").try_lock().is_err());
        assert!(t.building.of("firecracker-b").try_lock().is_ok());
        drop(held);
        assert!(t.building.of("firecracker-a").try_lock().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

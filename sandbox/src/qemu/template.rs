//! Templates of the qemu backend: a VM booted once with its agent on a
//! virtio-serial port and its RAM in a shared file, its runtimes warmed,
//! then paused and migrated to a file with `x-ignore-shared`, so that the
//! stream holds the device state only and the RAM file *is* the template's
//! memory. Restores (`restore`) map that file privately.
//!
//! Building one, step by step (each reported through `progress`):
//!
//! 1. QEMU with `memory-backend-file,share=on` on a file under
//!    `<store>/building/`, the agent served on the `kiln.agent` port;
//! 2. `Hello` with the spec's runtimes to warm, `HelloAck` within the boot
//!    timeout (QEMU holds the hello until the agent opens the port), then
//!    `AwaitWarm`, then until the guest is idle (its interpreters done
//!    starting: QEMU's CPU time stops growing);
//! 3. the host closes its connection and waits for QEMU's `VSERPORT_CHANGE`
//!    events: the agent closed the port and opened it again, so the
//!    snapshot holds an agent waiting for its next host (see the agent's
//!    `port` module);
//! 4. `stop`, `migrate-set-capabilities x-ignore-shared`, `migrate` to
//!    `exec:cat > vmstate`, `query-migrate` until `completed`;
//! 5. QEMU killed, memory and vmstate published in the store, the build
//!    files removed. Any failure removes everything of the build.
//!
//! One build per template id at a time: a second caller waits for the
//! first and finds the template published. A template's id is the hash of
//! its inputs ([`crate::template::TemplateInputs`]); the kernel and image
//! are hashed once per file version (remembered in the store).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_snapshotter::store::{ArtifactIdentity, Snapshot, StoreError};
use serde_json::json;

use super::command::{
    shell_quoted, Channel, Launch, Machine, Memory, AGENT_PORT_ID, MACHINE_RECIPE,
};
use super::qmp::QmpError;
use super::vm::{connect_when_there, Started, VmKind, AGENT_SOCK, QMP_SOCK};
use super::{io_err, Inner};
use crate::template::{
    warmed_runtimes, BuildLocks, GuestInputs, TemplateError, TemplateInfo, TemplateInputs,
    TemplateKey, TemplateStore,
};
use crate::vm::Console;
use crate::{AgentConn, SandboxError, SandboxSpec};

/// How long a template's guest may take to go idle once its interpreters
/// were started; past it the snapshot is taken anyway (a runtime that
/// never idles still makes a correct template, only a slower one).
const SETTLE_WITHIN: Duration = Duration::from_secs(30);
/// The window over which QEMU's CPU time is sampled.
const SETTLE_WINDOW: Duration = Duration::from_millis(200);
/// Idle: QEMU used less than this share of one CPU over a window.
const IDLE_CPU_SHARE: f64 = 0.10;

/// How long the agent gets to release the template's connection.
const RELEASE_WITHIN: Duration = Duration::from_secs(10);
/// How long saving the device state may take.
const SAVE_WITHIN: Duration = Duration::from_secs(60);

/// The backend's templates: the store, what it knows about inputs, and a
/// lock per template id being built.
pub(super) struct Templates {
    pub store: TemplateStore,
    root: PathBuf,
    /// Known once the first template inputs were asked for.
    base: Mutex<Option<Arc<GuestInputs>>>,
    building: BuildLocks,
}

/// Why a template could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A QMP command or event failed.
    #[error("{step}: {source}")]
    Qmp {
        step: &'static str,
        #[source]
        source: QmpError,
    },
    /// QEMU reported the migration failed.
    #[error("saving the device state failed: {0}")]
    Migration(String),
    /// The store refused the template.
    #[error("publishing the template: {0}")]
    Publish(#[source] TemplateError),
    /// An artefact the template was made from is gone or changed.
    #[error("template {template}: its {what} {path} is gone or changed since the template was made (it was {sha256}); rebuild the template")]
    Artefact {
        template: String,
        what: &'static str,
        path: String,
        sha256: String,
    },
}

fn build_err(e: BuildError) -> SandboxError {
    SandboxError::backend("qemu", e)
}

pub(super) fn qmp_err(step: &'static str) -> impl FnOnce(QmpError) -> SandboxError {
    move |source| build_err(BuildError::Qmp { step, source })
}

impl Templates {
    pub fn open(root: &Path) -> Result<Self, TemplateError> {
        Ok(Self {
            store: TemplateStore::open(root, "qemu")?,
            root: root.to_owned(),
            base: Mutex::new(None),
            building: BuildLocks::default(),
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

    /// The inputs all templates share, worked out on first use (blocking:
    /// hashes the kernel and image unless the store remembers them, runs
    /// `qemu --version`).
    fn base_inputs(&self) -> Result<Arc<GuestInputs>, SandboxError> {
        let t = self.templates()?;
        if let Some(b) = &*t.base.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(b.clone());
        }
        let base = GuestInputs::identify(
            &t.store,
            &self.cfg.kernel,
            &self.cfg.rootfs,
            &self.qemu,
            &self.cfg.runtimes,
        )
        .map(Arc::new)
        .map_err(|e| SandboxError::backend("qemu", e))?;
        *t.base.lock().unwrap_or_else(|e| e.into_inner()) = Some(base.clone());
        Ok(base)
    }

    /// The template inputs of sandboxes of `spec`, and the root disk they
    /// boot from (an image's is built now if need be, and identified).
    pub(super) async fn template_inputs(
        self: &Arc<Self>,
        spec: &SandboxSpec,
    ) -> Result<(TemplateInputs, PathBuf), SandboxError> {
        let me = self.clone();
        let base = tokio::task::spawn_blocking(move || me.base_inputs())
            .await
            .map_err(|e| SandboxError::Io {
                what: "identifying the guest kernel and image".into(),
                error: std::io::Error::other(e),
            })??;
        let Some(image) = &spec.image else {
            return Ok((self.inputs_with(&base, spec, None), self.cfg.rootfs.clone()));
        };
        let disk = self.disks.disk(image).await?;
        let (store, at) = (self.templates()?.store.clone(), disk.clone());
        let identity =
            tokio::task::spawn_blocking(move || store.identify_cached("image disk", &at))
                .await
                .map_err(|e| SandboxError::Io {
                    what: "identifying an image's root disk".into(),
                    error: std::io::Error::other(e),
                })?
                .map_err(|e| SandboxError::backend("qemu", e))?;
        let inputs = self.inputs_with(&base, spec, Some((&disk, identity)));
        Ok((inputs, disk))
    }

    /// The inputs of a template of `spec`; `image`: the root disk of its
    /// image and its identity.
    fn inputs_with(
        &self,
        base: &GuestInputs,
        spec: &SandboxSpec,
        image: Option<(&Path, ArtifactIdentity)>,
    ) -> TemplateInputs {
        let machine = Machine::of(self, spec);
        let key = TemplateKey {
            warm: warmed_runtimes(self.runtimes(spec), spec),
            vcpus: machine.vcpus,
            memory_mb: machine.mem_mb,
            network: machine.network,
            image: spec.image.as_ref().map(|i| i.digest.clone()),
        };
        let image_runtimes = spec
            .image
            .as_ref()
            .and_then(|i| i.runtimes.as_ref())
            .map(|t| serde_json::to_vec(t).expect("a runtime table serialises"));
        let (rootfs, rootfs_path) = match image {
            Some((disk, identity)) => (identity, disk.to_owned()),
            None => (base.rootfs.clone(), self.cfg.rootfs.clone()),
        };
        TemplateInputs::new(
            "qemu",
            key,
            base.kernel.clone(),
            rootfs,
            image_runtimes.as_deref().unwrap_or(&base.runtimes),
            &base.vmm,
        )
        .with(
            "agent",
            format!("kiln-agent {} (in the image)", env!("CARGO_PKG_VERSION")),
        )
        .with("accel", self.accel.as_str())
        .with("machine", MACHINE_RECIPE)
        .with("cmdline", self.kernel_cmdline(true))
        .with(
            "job_user",
            format!("{}:{}", self.cfg.job_uid, self.cfg.job_gid),
        )
        .with("kernel_path", self.cfg.kernel.to_string_lossy())
        .with("rootfs_path", rootfs_path.to_string_lossy())
    }

    /// The spec whose sandboxes a template of this key serves (the reverse
    /// of [`Machine::of`]), from the key's entries among its inputs; `None`
    /// for a template of an image (whose store this backend does not know
    /// until a sandbox of the image asks).
    fn spec_of_key(
        &self,
        inputs: &std::collections::BTreeMap<String, String>,
    ) -> Option<SandboxSpec> {
        if inputs.contains_key("image") {
            return None;
        }
        let num = |k: &str| inputs.get(k)?.parse::<u64>().ok();
        let warm = inputs.get("warm")?;
        Some(SandboxSpec {
            memory_mb: num("memory_mb")?.checked_sub(self.cfg.memory_overhead_mb)?,
            cpu_millis: num("vcpus")? * 1000,
            warm: warm
                .split(',')
                .filter(|w| !w.is_empty())
                .map(String::from)
                .collect(),
            allow_internet: inputs.get("network")? == "true",
            ..SandboxSpec::for_job(&kiln_protocol::Limits::default(), "")
        })
    }

    /// Every template of this backend in the store; `current` is set for
    /// those made from what this backend would make a template of their
    /// key from now (and for those of `known`: current inputs the caller
    /// worked out, such as an image's).
    pub(super) fn list_templates(
        &self,
        known: &[TemplateInputs],
    ) -> Result<Vec<TemplateInfo>, SandboxError> {
        let t = self.templates()?;
        let all = t
            .store
            .list(&[])
            .map_err(|e| SandboxError::backend("qemu", e))?;
        let base = self.base_inputs()?;
        let current: Vec<TemplateInputs> = all
            .iter()
            .filter_map(|i| self.spec_of_key(&i.inputs))
            .map(|spec| self.inputs_with(&base, &spec, None))
            .chain(known.iter().cloned())
            .collect();
        t.store
            .list(&current)
            .map_err(|e| SandboxError::backend("qemu", e))
    }

    fn template_info(&self, inputs: &TemplateInputs) -> Result<TemplateInfo, SandboxError> {
        let id = inputs.id().to_string();
        self.list_templates(std::slice::from_ref(inputs))?
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| {
                SandboxError::backend(
                    "qemu",
                    TemplateError::Store(StoreError::NotFound(
                        kiln_snapshotter::store::SnapshotId::new(&id)
                            .expect("ids of published templates are valid"),
                    )),
                )
            })
    }
}

impl Inner {
    /// The template to restore a sandbox of `spec` from, if any.
    pub(super) async fn usable_template(
        self: &Arc<Self>,
        spec: &SandboxSpec,
    ) -> Result<Option<Snapshot>, SandboxError> {
        let (inputs, _) = self.template_inputs(spec).await?;
        Ok(self.templates()?.store.usable(&inputs))
    }

    /// The kernel and image a template was made from: the backend's own
    /// when the template is current, else the files it names, checked
    /// (once per process) against the identities it recorded.
    pub(super) async fn template_artefacts(
        &self,
        snap: &Snapshot,
    ) -> Result<(PathBuf, PathBuf), SandboxError> {
        let t = self.templates()?;
        let base = self.base_inputs()?;
        let m = snap.manifest();
        let mut out = Vec::new();
        for (what, recorded, ours, path_input) in [
            ("kernel", &m.kernel, &base.kernel, "kernel_path"),
            ("image", &m.rootfs, &base.rootfs, "rootfs_path"),
        ] {
            let own = if what == "kernel" {
                &self.cfg.kernel
            } else {
                &self.cfg.rootfs
            };
            if recorded.sha256 == ours.sha256 {
                out.push(own.clone());
                continue;
            }
            let gone = || {
                build_err(BuildError::Artefact {
                    template: m.id.to_string(),
                    what,
                    path: m.inputs.get(path_input).cloned().unwrap_or_default(),
                    sha256: recorded.sha256.clone(),
                })
            };
            let path = PathBuf::from(m.inputs.get(path_input).ok_or_else(gone)?);
            let (store, p) = (t.store.clone(), path.clone());
            let sha = tokio::task::spawn_blocking(move || store.identify_cached(what, &p))
                .await
                .map_err(|_| gone())?
                .map_err(|_| gone())?
                .sha256;
            if sha != recorded.sha256 {
                return Err(gone());
            }
            out.push(path);
        }
        let rootfs = out.pop().expect("two artefacts");
        let kernel = out.pop().expect("two artefacts");
        Ok((kernel, rootfs))
    }

    /// See [`crate::Backend::prepare_template`].
    pub(super) async fn prepare_template(
        self: &Arc<Self>,
        spec: &SandboxSpec,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<TemplateInfo, SandboxError> {
        self.check_warm(spec)?;
        let t = self.templates()?;
        let (inputs, rootfs) = self.template_inputs(spec).await?;
        let id = inputs.id().to_string();
        if t.store.current(&inputs).is_some() {
            progress(&format!("template {id} is current"));
            return self.template_info(&inputs);
        }
        let lock = t.building.of(&id);
        let held = lock.lock().await;
        if t.store.current(&inputs).is_some() {
            progress(&format!("template {id} was built meanwhile"));
            return self.template_info(&inputs);
        }
        let started = Instant::now();
        progress(&format!(
            "building template {id} ({} MiB of guest RAM, {} vCPU, warm: {})",
            inputs.key().memory_mb,
            inputs.key().vcpus,
            if inputs.key().warm.is_empty() {
                "nothing".into()
            } else {
                inputs.key().warm.join(", ")
            }
        ));
        let built = self.build_template(spec, &inputs, &rootfs, progress).await;
        drop(held);
        t.building.release(&id);
        built?;
        progress(&format!(
            "template {id} published after {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        self.template_info(&inputs)
    }

    async fn build_template(
        &self,
        spec: &SandboxSpec,
        inputs: &TemplateInputs,
        rootfs: &Path,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), SandboxError> {
        let t = self.templates()?;
        let building = t.root.join("building");
        // The build's files live in the store's file system (the memory
        // file is as large as the guest's RAM) and go with the VM on any
        // failure, or with a reap after a crash (the record names them).
        let (id, dir, remains) = self.new_vm_dir(VmKind::Template)?;
        let files = building.join(id.as_str());
        let mut remains = remains;
        remains.extra.push(files.clone());
        self.write_record(&dir, &id, &[], &remains.extra)
            .map_err(io_err("writing the template VM's record"))?;
        fs::create_dir_all(&files).map_err(io_err(format!("creating {}", files.display())))?;
        let memory = files.join("memory");
        let vmstate = files.join("vmstate");
        let machine = Machine::of(self, spec);
        let launch = Launch {
            machine,
            channel: Channel::Port {
                socket: dir.join(AGENT_SOCK),
            },
            memory: Memory::File {
                path: memory.clone(),
                shared: true,
            },
            kernel: self.cfg.kernel.clone(),
            rootfs: rootfs.to_owned(),
            cmdline: self.kernel_cmdline(true),
            qmp: dir.join(QMP_SOCK),
            tap: None,
            incoming: None,
        };
        let console = Arc::new(Console::default());
        let mut vm = self
            .start_qemu(id, dir, remains, console, &launch, &[])
            .await?;
        progress(&format!("template VM started (QEMU pid {})", vm.qemu_pid));

        let deadline = vm.at + self.cfg.boot_timeout;
        let agent = self.connect_port(&mut vm, deadline).await?;
        let mut hello = self.hello(spec);
        hello.warm.clone_from(&inputs.key().warm);
        let within = deadline.saturating_duration_since(Instant::now());
        let console = vm.console.clone();
        vm.remains
            .watch(&console, "the template's agent came up", async {
                agent.hello(hello, within).await.map_err(SandboxError::from)
            })
            .await?;
        progress(&format!(
            "agent answered {:.0} ms after QEMU started",
            vm.at.elapsed().as_secs_f64() * 1000.0
        ));
        vm.remains
            .watch(&console, "the template's runtimes were warmed", async {
                agent
                    .await_warm(self.cfg.boot_timeout)
                    .await
                    .map_err(SandboxError::from)
            })
            .await?;
        let idle = settle(&mut vm).await?;
        progress(&match idle {
            Some(after) => format!(
                "warm interpreters started; guest idle {:.0} ms later",
                after.as_secs_f64() * 1000.0
            ),
            None => format!(
                "warm interpreters started; guest still busy after {SETTLE_WITHIN:?}, snapshotting anyway"
            ),
        });

        // Let go of the agent: it closes the port and opens it again, and
        // the snapshot holds it waiting for its next host.
        vm.qmp
            .forget_events()
            .await
            .map_err(qmp_err("reading QEMU's events"))?;
        drop(agent);
        for open in [false, true] {
            let qmp = &mut vm.qmp;
            vm.remains
                .watch(&console, "the agent released its connection", async {
                    qmp.wait_event("VSERPORT_CHANGE", RELEASE_WITHIN, |d| {
                        d["id"] == AGENT_PORT_ID && d["open"] == open
                    })
                    .await
                    .map_err(qmp_err("waiting for the agent to reopen its port"))
                })
                .await?;
        }
        progress("agent released the connection and waits for its next host");

        let saved_at = Instant::now();
        let stats = save_device_state(&mut vm, &vmstate).await?;
        let vmstate_bytes = fs::metadata(&vmstate)
            .map_err(io_err(format!("reading {}", vmstate.display())))?
            .len();
        progress(&format!(
            "paused; device state saved in {:.0} ms: {} KiB, with {} KiB of the {} KiB of RAM QEMU does not share (firmware); the guest's {} MiB stay in the memory file",
            saved_at.elapsed().as_secs_f64() * 1000.0,
            vmstate_bytes / 1024,
            stats.ram_transferred / 1024,
            stats.ram_total / 1024,
            machine.mem_mb,
        ));

        // QEMU is done; its RAM is in the file (a shared mapping writes
        // through the page cache).
        if let Some(mut q) = vm.remains.qemu.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
        progress(&format!(
            "publishing {} MiB of memory",
            fs::metadata(&memory).map(|m| m.len() >> 20).unwrap_or(0)
        ));
        let store = t.store.clone();
        let draft = inputs.clone();
        let published =
            tokio::task::spawn_blocking(move || store.publish(&draft, &memory, &vmstate))
                .await
                .map_err(|e| SandboxError::Io {
                    what: "publishing the template".into(),
                    error: std::io::Error::other(e),
                })?;
        let mut remains = vm.remains;
        tokio::task::spawn_blocking(move || remains.teardown())
            .await
            .ok();
        match published {
            Ok(_) => {}
            // Another process built the same inputs first: same template.
            Err(TemplateError::Store(StoreError::AlreadyPublished(id))) => {
                progress(&format!("template {id} was published by another process"));
            }
            Err(e) => return Err(build_err(BuildError::Publish(e))),
        }
        t.store.retire_superseded(inputs);
        Ok(())
    }

    /// Connects to the agent's port socket of a started VM.
    pub(super) async fn connect_port(
        &self,
        vm: &mut Started,
        deadline: Instant,
    ) -> Result<AgentConn, SandboxError> {
        let console = vm.console.clone();
        let stream = connect_when_there(
            &vm.dir.join(AGENT_SOCK),
            deadline,
            &mut vm.remains,
            &console,
            |p| async move { tokio::net::UnixStream::connect(p).await },
            "connecting to the agent's port",
        )
        .await?;
        Ok(AgentConn::new(stream))
    }
}

/// Waits until QEMU's CPU time stops growing (two windows in a row below
/// [`IDLE_CPU_SHARE`]); `None` if it does not within [`SETTLE_WITHIN`].
async fn settle(vm: &mut Started) -> Result<Option<Duration>, SandboxError> {
    let pid = vm.qemu_pid as i32;
    let start = Instant::now();
    let console = vm.console.clone();
    vm.remains
        .watch(&console, "the template's guest settled", async {
            let mut quiet = 0;
            let mut before = crate::procfs::cpu_us(&[pid], false);
            while start.elapsed() < SETTLE_WITHIN {
                tokio::time::sleep(SETTLE_WINDOW).await;
                let now = crate::procfs::cpu_us(&[pid], false);
                let share = now.saturating_sub(before) as f64 / SETTLE_WINDOW.as_micros() as f64;
                before = now;
                quiet = if share < IDLE_CPU_SHARE { quiet + 1 } else { 0 };
                if quiet == 2 {
                    return Ok(Some(start.elapsed()));
                }
            }
            Ok(None)
        })
        .await
}

/// What `query-migrate` said once the migration completed.
pub(super) struct MigrationStats {
    /// Bytes of RAM pages written to the stream.
    pub ram_transferred: u64,
    /// Bytes of RAM that are migrated at all: the blocks `x-ignore-shared`
    /// does not skip (on `microvm`, the 64 KiB `pc.bios`).
    pub ram_total: u64,
}

/// `stop`, then the device state (and no RAM: `x-ignore-shared`) into
/// `to`; returns once QEMU says the migration completed.
async fn save_device_state(vm: &mut Started, to: &Path) -> Result<MigrationStats, SandboxError> {
    let console = vm.console.clone();
    let qmp = &mut vm.qmp;
    vm.remains
        .watch(&console, "the device state was saved", async {
            qmp.execute("stop", None).await.map_err(qmp_err("stop"))?;
            qmp.execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
            )
            .await
            .map_err(qmp_err("migrate-set-capabilities x-ignore-shared"))?;
            qmp.execute(
                "migrate",
                Some(json!({"uri": format!("exec:cat > {}", shell_quoted(to))})),
            )
            .await
            .map_err(qmp_err("migrate"))?;
            let info = await_migration(qmp, SAVE_WITHIN).await?;
            Ok(MigrationStats {
                ram_transferred: info["ram"]["transferred"].as_u64().unwrap_or(0),
                ram_total: info["ram"]["total"].as_u64().unwrap_or(0),
            })
        })
        .await
}

/// Polls `query-migrate` until the migration (outgoing or incoming) has
/// completed, and returns its answer; a failed one is an error naming
/// QEMU's reason.
pub(super) async fn await_migration(
    qmp: &mut super::Qmp,
    within: Duration,
) -> Result<serde_json::Value, SandboxError> {
    let deadline = Instant::now() + within;
    loop {
        let info = qmp
            .execute("query-migrate", None)
            .await
            .map_err(qmp_err("query-migrate"))?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => return Ok(info),
            "failed" | "cancelled" => {
                return Err(build_err(BuildError::Migration(
                    info["error-desc"]
                        .as_str()
                        .unwrap_or("QEMU gave no reason")
                        .to_owned(),
                )))
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(build_err(BuildError::Migration(format!(
                "not completed within {within:?} (last status: {info})"
            ))));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

//! Templates: a microVM booted once, its runtimes warmed by the agent,
//! paused and snapshotted, so that sandboxes are restored from it instead
//! of booted. What a template is made from is its *inputs* (guest kernel
//! and image, agent build, runtime table, VMM version, machine
//! configuration, runtimes warmed); their hash is its id, so a change in
//! any input makes a new template and never alters a published one.
//!
//! Templates live in a `kiln_snapshotter` store (one immutable directory
//! each: memory, VMM state, manifest with the inputs, and the working set
//! once one was recorded). A backend asks [`TemplateStore::current`] for
//! the template of exactly its current inputs, and falls back to the newest
//! one of the same [`TemplateKey`] whose agent speaks this protocol
//! ([`TemplateStore::usable`]) while the current one is being built.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_protocol::RuntimeTable;

use kiln_snapshotter::store::{
    ArtifactIdentity, Snapshot, SnapshotDraft, SnapshotId, SnapshotStore, StoreError,
};
use sha2::{Digest as _, Sha256};

use crate::SandboxSpec;

/// The default store of templates.
pub const DEFAULT_STORE: &str = "/var/lib/kiln/templates";

/// What a template must match to restore a sandbox: the devices and sizes
/// a snapshot fixes. Everything else (disk size, task cap, identity) comes
/// with the guest setup after the restore.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TemplateKey {
    /// Runtimes warmed in it, by canonical name, sorted.
    pub warm: Vec<String>,
    pub vcpus: u32,
    /// Guest RAM, in MiB (the sandbox's memory plus the guest's overhead).
    pub memory_mb: u64,
    /// Whether it has a network device.
    pub network: bool,
    /// The manifest digest of the OCI image its root is, if any: a
    /// template of one image restores sandboxes of that image only.
    pub image: Option<String>,
}

/// The inputs that make a [`TemplateKey`] (`image` only where there is
/// one, so that templates made before images existed keep their key).
const KEY_ENTRIES: [&str; 5] = ["warm", "vcpus", "memory_mb", "network", "image"];

impl TemplateKey {
    /// The key's entries, as they appear among a template's inputs.
    fn entries(&self) -> Vec<(&'static str, String)> {
        let mut warm = self.warm.clone();
        warm.sort();
        let mut e = vec![
            ("warm", warm.join(",")),
            ("vcpus", self.vcpus.to_string()),
            ("memory_mb", self.memory_mb.to_string()),
            ("network", self.network.to_string()),
        ];
        if let Some(i) = &self.image {
            e.push(("image", i.clone()));
        }
        e
    }

    /// A short human name (`python-1cpu-192m`).
    pub fn name(&self) -> String {
        let mut warm = self.warm.clone();
        warm.sort();
        format!(
            "{}-{}cpu-{}m{}",
            if warm.is_empty() {
                "none".into()
            } else {
                warm.join("+")
            },
            self.vcpus,
            self.memory_mb,
            if self.network { "-net" } else { "" }
        ) + &self
            .image
            .as_deref()
            .map(|d| {
                let hex = d.strip_prefix("sha256:").unwrap_or(d);
                format!("-img{}", hex.get(..12).unwrap_or(hex))
            })
            .unwrap_or_default()
    }
}

/// Everything a template is made from, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateInputs {
    backend: &'static str,
    key: TemplateKey,
    kernel: ArtifactIdentity,
    rootfs: ArtifactIdentity,
    /// Other inputs: `agent` (the agent binary's SHA-256), `protocol`,
    /// `runtimes` (the runtime table's SHA-256), `vmm` (its version), and
    /// whatever the backend adds.
    more: BTreeMap<String, String>,
}

impl TemplateInputs {
    /// Inputs of a template of `backend` for `key`, booted from `kernel`
    /// and `rootfs` with the runtime table `runtimes` (its TOML or JSON
    /// text) under `vmm` (the VMM's version line).
    pub fn new(
        backend: &'static str,
        key: TemplateKey,
        kernel: ArtifactIdentity,
        rootfs: ArtifactIdentity,
        runtimes: &[u8],
        vmm: &str,
    ) -> Self {
        let mut more = BTreeMap::new();
        more.insert(
            "protocol".into(),
            kiln_protocol::PROTOCOL_VERSION.to_string(),
        );
        more.insert("runtimes".into(), hex(&Sha256::digest(runtimes)));
        more.insert("vmm".into(), vmm.trim().to_owned());
        Self {
            backend,
            key,
            kernel,
            rootfs,
            more,
        }
    }

    /// Adds an input (e.g. a machine setting of the backend's own).
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.more.insert(name.to_owned(), value.into());
        self
    }

    pub fn key(&self) -> &TemplateKey {
        &self.key
    }

    /// The inputs as the manifest records them (the kernel and image are
    /// recorded in fields of their own as well).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = self.more.clone();
        m.insert("backend".into(), self.backend.into());
        for (k, v) in self.key.entries() {
            m.insert(k.into(), v);
        }
        m.insert("kernel".into(), self.kernel.sha256.clone());
        m.insert("rootfs".into(), self.rootfs.sha256.clone());
        m
    }

    /// The template's id: `<backend>-<key name>-<16 hex digits of the
    /// inputs' hash>`.
    pub fn id(&self) -> SnapshotId {
        let mut h = Sha256::new();
        for (k, v) in self.to_map() {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([0]);
        }
        let digest = hex(&h.finalize());
        SnapshotId::new(format!(
            "{}-{}-{}",
            self.backend,
            self.key.name(),
            &digest[..16]
        ))
        .expect("ids built from names and hex digits are valid")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A published template as `kiln template ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TemplateInfo {
    pub id: String,
    pub backend: String,
    /// Publication time, seconds since the Unix epoch.
    pub created_unix: u64,
    pub memory_bytes: u64,
    /// Whether a working set has been recorded (restores prefetch it).
    pub working_set: bool,
    /// Whether it is made from the current inputs (new sandboxes restore
    /// from it); an outdated one serves only until its successor is built.
    pub current: bool,
    pub inputs: BTreeMap<String, String>,
    pub dir: PathBuf,
}

/// Why a template could not be stored or found.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The snapshot store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An input could not be read to identify it.
    #[error("identifying {what} {path}: {source}")]
    Input {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: StoreError,
    },
}

/// What every template of a microVM backend is made from besides its
/// key: the guest kernel and image (by content), the runtime table and the
/// VMM's version line.
#[derive(Debug, Clone)]
pub struct GuestInputs {
    pub kernel: ArtifactIdentity,
    pub rootfs: ArtifactIdentity,
    /// The runtime table, serialised.
    pub runtimes: Vec<u8>,
    /// The first line of `VMM --version`.
    pub vmm: String,
}

/// Why the inputs every template shares could not be worked out.
#[derive(Debug, thiserror::Error)]
pub enum GuestInputsError {
    /// The kernel or image could not be identified.
    #[error(transparent)]
    Identify(#[from] TemplateError),
    /// `VMM --version` could not be run.
    #[error("running {path} --version: {source}")]
    Version {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl GuestInputs {
    /// Identifies the kernel and image (through the store's cache of
    /// identities, so a file is hashed once per version) and asks the VMM
    /// its version. Blocking: run it off the async threads.
    pub fn identify(
        store: &TemplateStore,
        kernel: &Path,
        rootfs: &Path,
        vmm: &Path,
        runtimes: &RuntimeTable,
    ) -> Result<Self, GuestInputsError> {
        let kernel = store.identify_cached("guest kernel", kernel)?;
        let rootfs = store.identify_cached("guest image", rootfs)?;
        let version = std::process::Command::new(vmm)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| GuestInputsError::Version {
                path: vmm.to_owned(),
                source,
            })?;
        Ok(Self {
            kernel,
            rootfs,
            runtimes: serde_json::to_vec(runtimes).expect("a runtime table serialises"),
            vmm: String::from_utf8_lossy(&version.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        })
    }
}

/// The runtimes a sandbox of `spec` warms, by canonical name, sorted, as a
/// [`TemplateKey`] holds them (names the table does not know are left out:
/// the sandbox's creation refuses them).
pub fn warmed_runtimes(runtimes: &RuntimeTable, spec: &SandboxSpec) -> Vec<String> {
    let mut warm: Vec<String> = spec
        .warm
        .iter()
        .filter_map(|w| runtimes.resolve(w).ok().map(|r| r.name.clone()))
        .collect();
    warm.sort();
    warm.dedup();
    warm
}

/// One build per template id at a time in a process: a second caller of
/// [`BuildLocks::of`] the same id waits for the first.
#[derive(Debug, Default)]
pub struct BuildLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl BuildLocks {
    /// The lock that a build of template `id` holds.
    pub fn of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(id.to_owned()).or_default().clone()
    }

    /// Forgets the lock of `id` once its build is over (held by nobody
    /// else, or a waiter keeps its own handle).
    pub fn release(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// The templates of one backend in a snapshot store.
#[derive(Debug, Clone)]
pub struct TemplateStore {
    store: SnapshotStore,
    root: PathBuf,
    backend: &'static str,
}

/// The file, under the store's root, where [`TemplateStore::identify_cached`]
/// remembers the identities of inputs.
const IDENTITIES: &str = "identities.json";

/// A remembered identity and the file version it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct KnownIdentity {
    size: u64,
    modified_ns: u128,
    inode: u64,
    identity: ArtifactIdentity,
}

impl KnownIdentity {
    fn version_of(path: &Path) -> std::io::Result<(u64, u128, u64)> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(path)?;
        let modified = m
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok((m.len(), modified, m.ino()))
    }
}

impl TemplateStore {
    /// Opens (creating) the store at `root` for `backend`'s templates.
    pub fn open(root: &Path, backend: &'static str) -> Result<Self, TemplateError> {
        Ok(Self {
            store: SnapshotStore::open(root)?,
            root: root.to_owned(),
            backend,
        })
    }

    /// Identifies a file input (kernel, image) by its SHA-256.
    pub fn identify(what: &'static str, path: &Path) -> Result<ArtifactIdentity, TemplateError> {
        ArtifactIdentity::of_file(path).map_err(|source| TemplateError::Input {
            what,
            path: path.to_owned(),
            source,
        })
    }

    /// [`identify`](Self::identify), remembered in the store by path, size,
    /// modification time and inode: a guest image is hundreds of MiB, and
    /// every process that opens a backend would hash it again. A file
    /// rewritten in place gets a new modification time and is hashed anew.
    pub fn identify_cached(
        &self,
        what: &'static str,
        path: &Path,
    ) -> Result<ArtifactIdentity, TemplateError> {
        let key = path.to_string_lossy().into_owned();
        let file = self.root.join(IDENTITIES);
        let mut known: BTreeMap<String, KnownIdentity> = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let version = KnownIdentity::version_of(path);
        if let (Ok((size, modified_ns, inode)), Some(k)) = (&version, known.get(&key)) {
            if (k.size, k.modified_ns, k.inode) == (*size, *modified_ns, *inode) {
                return Ok(k.identity.clone());
            }
        }
        let identity = Self::identify(what, path)?;
        if let Ok((size, modified_ns, inode)) = version {
            known.insert(
                key,
                KnownIdentity {
                    size,
                    modified_ns,
                    inode,
                    identity: identity.clone(),
                },
            );
            // Best effort: a cache that cannot be written costs a hash.
            let tmp = self
                .root
                .join(format!(".{IDENTITIES}.{}", std::process::id()));
            let written = serde_json::to_vec(&known)
                .map_err(std::io::Error::other)
                .and_then(|b| std::fs::write(&tmp, b))
                .and_then(|()| std::fs::rename(&tmp, &file));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                tracing::debug!("remembering the identity of {}: {e}", path.display());
            }
        }
        Ok(identity)
    }

    /// The template made from exactly `inputs`, if published.
    pub fn current(&self, inputs: &TemplateInputs) -> Option<Snapshot> {
        self.store.get(&inputs.id()).ok()
    }

    /// The template to restore from for `inputs`: the current one, else the
    /// newest of the same key whose agent speaks this protocol (an outdated
    /// template serves until its successor is published).
    pub fn usable(&self, inputs: &TemplateInputs) -> Option<Snapshot> {
        if let Some(s) = self.current(inputs) {
            return Some(s);
        }
        let want = inputs.to_map();
        let same = |s: &Snapshot| {
            let have = &s.manifest().inputs;
            ["backend", "protocol"]
                .iter()
                .chain(&KEY_ENTRIES)
                .all(|k| have.get(*k) == want.get(*k))
        };
        self.store
            .list()
            .ok()?
            .into_iter()
            .filter(same)
            .max_by_key(|s| s.manifest().created_unix)
    }

    /// Retires what `current` supersedes ([`prune`](Self::prune)), logging
    /// each; a failure is logged, never fatal: the new template serves.
    pub fn retire_superseded(&self, current: &TemplateInputs) {
        match self.prune(std::slice::from_ref(current)) {
            Ok(removed) => {
                for id in removed {
                    tracing::info!(template = %id, superseded_by = %current.id(), "template retired");
                }
            }
            Err(e) => tracing::warn!("retiring superseded templates: {e}"),
        }
    }

    /// Publishes a template made from `inputs` (the files are copied in).
    pub fn publish(
        &self,
        inputs: &TemplateInputs,
        memory: &Path,
        vmstate: &Path,
    ) -> Result<Snapshot, TemplateError> {
        Ok(self.store.publish(&SnapshotDraft {
            id: inputs.id(),
            template: inputs.key.name(),
            memory,
            vmstate,
            kernel: inputs.kernel.clone(),
            rootfs: inputs.rootfs.clone(),
            inputs: inputs.to_map(),
        })?)
    }

    /// This backend's templates; `current` is set for those of `current`.
    pub fn list(&self, current: &[TemplateInputs]) -> Result<Vec<TemplateInfo>, TemplateError> {
        let current: Vec<SnapshotId> = current.iter().map(TemplateInputs::id).collect();
        Ok(self
            .store
            .list()?
            .into_iter()
            .filter(|s| {
                s.manifest().inputs.get("backend").map(String::as_str) == Some(self.backend)
            })
            .map(|s| {
                let m = s.manifest();
                TemplateInfo {
                    id: m.id.to_string(),
                    backend: self.backend.into(),
                    created_unix: m.created_unix,
                    memory_bytes: m.memory.size,
                    working_set: s.working_set_path().exists(),
                    current: current.contains(&m.id),
                    inputs: m.inputs.clone(),
                    dir: s.dir().to_owned(),
                }
            })
            .collect())
    }

    /// Removes a template of this backend.
    pub fn remove(&self, id: &str) -> Result<(), TemplateError> {
        let id = SnapshotId::new(id)?;
        let snap = self.store.get(&id)?;
        if snap.manifest().inputs.get("backend").map(String::as_str) != Some(self.backend) {
            return Err(StoreError::NotFound(id).into());
        }
        Ok(self.store.remove(&id)?)
    }

    /// Removes this backend's templates that are neither current nor the
    /// newest of their key; returns their ids. Called after a template is
    /// published, it retires the ones it supersedes (sandboxes restored
    /// from them keep the files they have open).
    pub fn prune(&self, current: &[TemplateInputs]) -> Result<Vec<String>, TemplateError> {
        let mut all = self.list(current)?;
        all.sort_by_key(|t| std::cmp::Reverse(t.created_unix));
        let mut seen_keys = std::collections::HashSet::new();
        let mut removed = Vec::new();
        for t in all {
            let key: Vec<Option<&String>> = KEY_ENTRIES.iter().map(|k| t.inputs.get(*k)).collect();
            let newest_of_key = seen_keys.insert(format!("{key:?}"));
            if !t.current && !newest_of_key {
                self.remove(&t.id)?;
                removed.push(t.id);
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(name: &str, sha: char) -> ArtifactIdentity {
        ArtifactIdentity {
            name: name.into(),
            size: 1,
            sha256: sha.to_string().repeat(64),
        }
    }

    fn inputs(agent: &str, memory_mb: u64) -> TemplateInputs {
        inputs_of_image(agent, memory_mb, None)
    }

    fn inputs_of_image(agent: &str, memory_mb: u64, image: Option<&str>) -> TemplateInputs {
        TemplateInputs::new(
            "qemu",
            TemplateKey {
                warm: vec!["python".into()],
                vcpus: 1,
                memory_mb,
                network: false,
                image: image.map(String::from),
            },
            ident("vmlinux", 'a'),
            ident("rootfs.ext4", 'b'),
            b"[runtime.python]",
            "QEMU emulator version 7.2.22\n",
        )
        .with("agent", agent)
    }

    #[test]
    fn any_changed_input_makes_another_id_and_the_same_inputs_the_same() {
        let a = inputs("agent-1", 192);
        assert_eq!(a.id(), inputs("agent-1", 192).id());
        assert_ne!(a.id(), inputs("agent-2", 192).id());
        assert_ne!(a.id(), inputs("agent-1", 256).id());
        assert!(
            a.id().as_str().starts_with("qemu-python-1cpu-192m-"),
            "{}",
            a.id()
        );
        let m = a.to_map();
        assert_eq!(m["vmm"], "QEMU emulator version 7.2.22");
        assert_eq!(m["warm"], "python");
        assert_eq!(m["kernel"], "a".repeat(64));
    }

    #[test]
    fn identities_are_remembered_until_the_file_changes() {
        let root = std::env::temp_dir().join(format!("kiln-identities-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let store = TemplateStore::open(&root.join("store"), "qemu").unwrap();
        let image = root.join("rootfs.ext4");
        std::fs::write(&image, b"one").unwrap();
        let first = store.identify_cached("guest image", &image).unwrap();
        assert_eq!(
            first,
            TemplateStore::identify("guest image", &image).unwrap()
        );
        assert!(root.join("store").join(IDENTITIES).exists());
        // Remembered: the same answer from another handle on the store.
        let again = TemplateStore::open(&root.join("store"), "qemu").unwrap();
        assert_eq!(again.identify_cached("guest image", &image).unwrap(), first);
        // Rewritten (another size, time and inode): hashed anew.
        std::fs::remove_file(&image).unwrap();
        std::fs::write(&image, b"other").unwrap();
        let changed = again.identify_cached("guest image", &image).unwrap();
        assert_ne!(changed.sha256, first.sha256);
        assert!(store
            .identify_cached("kernel", &root.join("missing"))
            .is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_outdated_template_serves_until_the_current_one_is_published() {
        let root = std::env::temp_dir().join(format!("kiln-templates-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let (mem, vm) = (root.join("m"), root.join("v"));
        std::fs::write(&mem, [1u8; 4096]).unwrap();
        std::fs::write(&vm, b"state").unwrap();
        let store = TemplateStore::open(&root.join("store"), "qemu").unwrap();
        let old = inputs("agent-1", 192);
        let new = inputs("agent-2", 192);
        let other_key = inputs("agent-2", 256);
        assert!(store.usable(&new).is_none());
        store.publish(&old, &mem, &vm).unwrap();
        assert!(store.current(&new).is_none());
        assert_eq!(store.usable(&new).unwrap().manifest().id, old.id());
        assert!(
            store.usable(&other_key).is_none(),
            "another size never serves"
        );
        store.publish(&new, &mem, &vm).unwrap();
        assert_eq!(store.usable(&new).unwrap().manifest().id, new.id());
        let listed = store.list(std::slice::from_ref(&new)).unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed.iter().filter(|t| t.current).count(), 1);
        assert_eq!(
            store.prune(std::slice::from_ref(&new)).unwrap(),
            vec![old.id().to_string()]
        );
        assert_eq!(store.list(&[]).unwrap().len(), 1);
        store.remove(new.id().as_str()).unwrap();
        assert!(store.list(&[]).unwrap().is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_template_of_an_image_serves_sandboxes_of_that_image_only() {
        let root = std::env::temp_dir().join(format!("kiln-templates-img-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let (mem, vm) = (root.join("m"), root.join("v"));
        std::fs::write(&mem, [1u8; 4096]).unwrap();
        std::fs::write(&vm, b"state").unwrap();
        let store = TemplateStore::open(&root.join("store"), "qemu").unwrap();
        let (a, b) = (
            format!("sha256:{}", "a".repeat(64)),
            format!("sha256:{}", "b".repeat(64)),
        );
        let of_a = inputs_of_image("agent-1", 192, Some(&a));
        let plain = inputs("agent-1", 192);
        assert!(
            of_a.id()
                .as_str()
                .starts_with("qemu-python-1cpu-192m-imgaaaaaaaaaaaa-"),
            "{}",
            of_a.id()
        );
        assert_eq!(of_a.to_map()["image"], a);
        assert!(
            !plain.to_map().contains_key("image"),
            "keys of templates without images stay as they were"
        );
        store.publish(&of_a, &mem, &vm).unwrap();
        assert_eq!(store.usable(&of_a).unwrap().manifest().id, of_a.id());
        // Outdated (another agent) but of the same image: it serves.
        let newer = inputs_of_image("agent-2", 192, Some(&a));
        assert_eq!(store.usable(&newer).unwrap().manifest().id, of_a.id());
        // Never for another image, nor for the guest image's own root.
        assert!(store
            .usable(&inputs_of_image("agent-2", 192, Some(&b)))
            .is_none());
        assert!(store.usable(&inputs("agent-2", 192)).is_none());
        store.publish(&plain, &mem, &vm).unwrap();
        assert!(store
            .usable(&inputs_of_image("agent-2", 192, Some(&b)))
            .is_none());
        // Each is the newest of its own key: pruning keeps both.
        assert!(store.prune(&[]).unwrap().is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}

//! Images for jobs and sandboxes: a job's or a sandbox's `image` resolved
//! against the store (kiln-images), unpacked on first use off the async
//! threads, checked to hold the runtime's interpreter, and handed to the
//! backend as the sandbox's root. The image's `Env` becomes the job's
//! environment under what the job sets itself.
//!
//! With `[images] pull_on_use`, an image that is not stored but that
//! `allowed` lists is pulled when a job or sandbox first names it: once
//! (concurrent askers wait for the same pull), bounded by
//! `pull_timeout_s`, on the asking job's time before it takes a run slot,
//! so other jobs go on meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_images::{Image, ImageStore, StoreError};
use kiln_protocol::{Runtime, RuntimeTable};
use kiln_sandbox::settings::ImagesSettings;
use kiln_sandbox::ImageRoot;

/// Why a job or sandbox cannot have the image it asked for.
#[derive(Debug, thiserror::Error)]
pub enum ImageRefusal {
    /// Not in the store: the caller's mistake (4xx).
    #[error("image: {0}")]
    Unknown(#[source] Box<StoreError>),
    /// The configuration does not allow the image (4xx).
    #[error("image: {0} is not allowed here (images.allowed); use one of GET /v1/images that is")]
    NotAllowed(String),
    /// The image lacks what the runtime runs (4xx).
    #[error("image: {image} has no {interpreter} (the interpreter of runtime {runtime}; looked for there and under its name in /usr/local/bin, /usr/bin and /bin); use an image that has it, or another runtime")]
    NoInterpreter {
        image: String,
        runtime: String,
        interpreter: String,
    },
    /// Pulling it on first use failed: the registry does not have it,
    /// refused, or did not answer in time (4xx: the name is the caller's).
    #[error("image: pulling {image} failed: {message}")]
    Pull { image: String, message: String },
    /// The store failed (5xx).
    #[error("image {image}: {source}")]
    Store {
        image: String,
        #[source]
        source: Box<StoreError>,
    },
}

impl ImageRefusal {
    /// Whether the request was at fault (not Kiln).
    pub fn is_callers(&self) -> bool {
        !matches!(self, ImageRefusal::Store { .. })
    }
}

/// The image store as the executor uses it, opened (its directory made)
/// only when an image is first asked for. Cheap to clone.
#[derive(Clone)]
pub struct Images {
    /// The backend's runtime table, whose commands an image may need
    /// relocated.
    table: Arc<RuntimeTable>,
    dir: Arc<PathBuf>,
    allowed: Arc<Vec<String>>,
    defaults: Arc<BTreeMap<String, String>>,
    /// Pulls on first use, when configured.
    pull: Option<Arc<PullOnUse>>,
    /// The largest archive the API imports, in bytes.
    import_max_bytes: u64,
}

/// How images are pulled on first use, and the pulls under way.
struct PullOnUse {
    opts: kiln_images::PullOptions,
    timeout: Duration,
    /// One lock per reference being pulled: the first asker pulls, the
    /// others wait and then find it stored.
    under_way: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// An image ready to root a sandbox in, with what jobs in it inherit.
#[derive(Debug, Clone)]
pub struct Ready {
    pub root: ImageRoot,
    pub env: BTreeMap<String, String>,
}

impl Images {
    /// The store and rules of `[images]`.
    pub fn new(settings: &ImagesSettings, table: &RuntimeTable) -> Self {
        Self {
            table: Arc::new(table.clone()),
            dir: Arc::new(settings.dir.clone()),
            allowed: Arc::new(settings.allowed.clone()),
            defaults: Arc::new(settings.defaults.clone()),
            import_max_bytes: settings.import_max_mb.saturating_mul(1 << 20),
            pull: settings.pull_on_use.then(|| {
                Arc::new(PullOnUse {
                    opts: kiln_images::PullOptions {
                        insecure: settings.pull_insecure,
                        // The daemon's own, as for `kiln image pull`.
                        username: std::env::var("KILN_REGISTRY_USER").ok(),
                        password: std::env::var("KILN_REGISTRY_PASSWORD").ok(),
                    },
                    timeout: Duration::from_secs(settings.pull_timeout_s.max(1)),
                    under_way: Mutex::default(),
                })
            }),
        }
    }

    /// Whether `reference`, not stored yet, is pulled when named: pulls
    /// on first use are on and `allowed` lists it (never with an empty
    /// `allowed`: any name of any registry would be fetched for anyone).
    fn pulls(&self, reference: &str) -> bool {
        self.pull.is_some() && self.listed(reference, None)
    }

    /// Whether an entry of `allowed` names `name` (exactly, or by a prefix
    /// ending in `*`) or is `digest`.
    fn listed(&self, name: &str, digest: Option<&str>) -> bool {
        self.allowed.iter().any(|a| match a.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => a == name || Some(a.as_str()) == digest,
        })
    }

    /// What admission checks of a job's image: [`Self::check`], except
    /// that an image that is not stored but will be pulled on first use
    /// passes.
    pub fn admit(&self, reference: &str, runtime: &Runtime) -> Result<(), ImageRefusal> {
        match self.check(reference, runtime) {
            Err(ImageRefusal::Unknown(_)) if self.pulls(reference) => Ok(()),
            r => r.map(drop),
        }
    }

    /// Pulls `reference` if it is not stored and [`Self::pulls`] says so;
    /// otherwise nothing (what is missing is then refused as unknown).
    async fn pull_if_missing(&self, reference: &str) -> Result<(), ImageRefusal> {
        let Some(pull) = &self.pull else {
            return Ok(());
        };
        let store = self.open(reference)?;
        if store.resolve(reference).is_ok() || !self.pulls(reference) {
            return Ok(());
        }
        let lock = {
            let mut m = pull.under_way.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(reference.to_owned()).or_default().clone()
        };
        let _held = lock.lock().await;
        // Whoever held it before may have pulled it.
        let result = if store.resolve(reference).is_ok() {
            Ok(())
        } else {
            tracing::info!(image = reference, "pulling an image on first use");
            let (s, r, opts) = (store.clone(), reference.to_owned(), pull.opts.clone());
            // On a task of its own: a job that is cancelled does not cut
            // the pull short halfway through a blob.
            let task = tokio::spawn(async move { kiln_images::pull(&s, &r, &opts).await });
            match tokio::time::timeout(pull.timeout, task).await {
                Ok(Ok(Ok(image))) => {
                    tracing::info!(image = reference, digest = %image.digest, "pulled");
                    Ok(())
                }
                Ok(Ok(Err(e))) => Err(ImageRefusal::Pull {
                    image: reference.to_owned(),
                    message: crate::error_chain(&e),
                }),
                Ok(Err(e)) => Err(ImageRefusal::Pull {
                    image: reference.to_owned(),
                    message: e.to_string(),
                }),
                Err(_) => Err(ImageRefusal::Pull {
                    image: reference.to_owned(),
                    message: format!(
                        "no answer within {} s (images.pull_timeout_s)",
                        pull.timeout.as_secs()
                    ),
                }),
            }
        };
        pull.under_way
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(reference);
        result
    }

    /// The largest archive `POST /v1/images/import` takes, in bytes.
    pub fn import_max_bytes(&self) -> u64 {
        self.import_max_bytes
    }

    /// The image a job or sandbox of `runtime` gets when it names none.
    pub fn default_for(&self, runtime: &str) -> Option<String> {
        self.defaults.get(runtime).cloned()
    }

    fn allows(&self, image: &Image) -> bool {
        self.allowed.is_empty() || self.listed(&image.name, Some(image.digest.as_str()))
    }

    /// The store, its roots owned by the jail's id range (its directory
    /// made if missing).
    pub fn store(&self) -> Result<ImageStore, StoreError> {
        Ok(ImageStore::open(self.dir.as_path())?.with_id_base(kiln_sandbox::jail::DEFAULT_ID_BASE))
    }

    /// Every stored image; none (and no store made) when the store's
    /// directory does not exist yet.
    pub fn list(&self) -> Result<Vec<Image>, StoreError> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        self.store()?.list()
    }

    /// Resolves `reference` at once (a cheap read of the index): unknown
    /// images are refused before a job is admitted. When the image is
    /// already unpacked, its interpreter is checked too.
    pub fn check(&self, reference: &str, runtime: &Runtime) -> Result<Image, ImageRefusal> {
        let store = self.open(reference)?;
        let image = self.resolve(&store, reference)?;
        let root = store.dir().join("roots").join(image.digest.hex());
        if root.is_dir() {
            check_interpreter(&image, &root, runtime)?;
        }
        Ok(image)
    }

    /// The store, its failure named by the image asked for.
    fn open(&self, reference: &str) -> Result<ImageStore, ImageRefusal> {
        self.store().map_err(|source| ImageRefusal::Store {
            image: reference.to_owned(),
            source: Box::new(source),
        })
    }

    /// The stored image `reference` names, if `allowed` admits it.
    fn resolve(&self, store: &ImageStore, reference: &str) -> Result<Image, ImageRefusal> {
        let image = store
            .resolve(reference)
            .map_err(|e| ImageRefusal::Unknown(Box::new(e)))?;
        if !self.allows(&image) {
            return Err(ImageRefusal::NotAllowed(reference.to_owned()));
        }
        Ok(image)
    }

    /// The image's root (unpacked now if it is not yet, on a blocking
    /// thread) and environment, its interpreter checked.
    /// An image that is not stored is pulled first when
    /// `[images] pull_on_use` allows it.
    pub async fn ready(&self, reference: &str, runtime: &Runtime) -> Result<Ready, ImageRefusal> {
        self.pull_if_missing(reference).await?;
        let this = self.clone();
        let (reference, runtime) = (reference.to_owned(), runtime.clone());
        tokio::task::spawn_blocking(move || this.ready_blocking(&reference, &runtime))
            .await
            .map_err(|e| ImageRefusal::Store {
                image: String::new(),
                source: Box::new(StoreError::Io {
                    what: "the unpacking task".into(),
                    source: std::io::Error::other(e.to_string()),
                }),
            })?
    }

    /// [`Self::ready`] on the calling thread (which may block for the
    /// unpacking).
    pub fn ready_blocking(
        &self,
        reference: &str,
        runtime: &Runtime,
    ) -> Result<Ready, ImageRefusal> {
        // One store and one index read; the interpreter checked once, in
        // the root as it is now unpacked.
        let store = self.open(reference)?;
        let image = self.resolve(&store, reference)?;
        let (root, config) = store
            .root(&image)
            .and_then(|root| Ok((root, store.config(&image)?)))
            .map_err(|source| ImageRefusal::Store {
                image: image.name.clone(),
                source: Box::new(source),
            })?;
        let program = check_interpreter(&image, &root, runtime)?;
        let runtimes = relocated(runtime, &program).map(|r| self.table.with_replaced(r));
        let env = config
            .config()
            .as_ref()
            .and_then(|c| c.env().clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect();
        Ok(Ready {
            root: ImageRoot {
                digest: image.digest.to_string(),
                dir: root,
                store: self.dir.as_ref().clone(),
                runtimes,
            },
            env,
        })
    }
}

/// The interpreter a runtime runs: its command's program.
fn interpreter(runtime: &Runtime) -> Option<&str> {
    runtime.command.first().map(String::as_str)
}

/// Where an image may keep an interpreter the runtime table names by
/// another path: its command's own path first, then the usual `bin`
/// directories (official language images install theirs under
/// `/usr/local/bin`).
const INTERPRETER_DIRS: [&str; 3] = ["/usr/local/bin", "/usr/bin", "/bin"];

/// Finds the runtime's interpreter in the image: the path to run it by.
fn check_interpreter(
    image: &Image,
    root: &Path,
    runtime: &Runtime,
) -> Result<String, ImageRefusal> {
    let Some(program) = interpreter(runtime) else {
        return Ok(String::new());
    };
    let name = program.rsplit('/').next().unwrap_or(program);
    let candidates = program
        .starts_with('/')
        .then(|| program.to_owned())
        .into_iter()
        .chain(INTERPRETER_DIRS.iter().map(|d| format!("{d}/{name}")));
    for c in candidates {
        if kiln_images::lookup(root, &c).is_some_and(|p| p.is_file()) {
            return Ok(c);
        }
    }
    Err(ImageRefusal::NoInterpreter {
        image: image.name.clone(),
        runtime: runtime.name.clone(),
        interpreter: program.to_owned(),
    })
}

/// `runtime` with its interpreter at `program` instead, when that is
/// elsewhere than its commands say.
fn relocated(runtime: &Runtime, program: &str) -> Option<Runtime> {
    let old = interpreter(runtime)?;
    if old == program || program.is_empty() {
        return None;
    }
    let mut r = runtime.clone();
    r.command[0] = program.to_owned();
    if let Some(w) = r.warm.as_mut() {
        if w.command.first().map(String::as_str) == Some(old) {
            w.command[0] = program.to_owned();
        }
    }
    Some(r)
}

/// Lays the image's environment under the job's own.
pub fn merge_env(job: &mut BTreeMap<String, String>, image: &BTreeMap<String, String>) {
    for (k, v) in image {
        job.entry(k.clone()).or_insert_with(|| v.clone());
    }
}

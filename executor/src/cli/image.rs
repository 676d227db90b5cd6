//! `kiln image import|ls|rm|gc`: the OCI images sandboxes can be rooted
//! in (docs/images.md). Images are kept in `images.dir`
//! (`--images-dir`), shared with `kiln serve` and `kiln run`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use kiln_images::{Image, ImageStore};
use kiln_sandbox::BackendFlags;

use crate::images::Images;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Pull an image from an OCI distribution registry and unpack it.
    Pull(PullArgs),
    /// Import images from a `docker save` archive or an OCI image layout
    /// (a directory or a tar of one), and unpack them.
    Import(ImportArgs),
    /// List the stored images.
    Ls(StoreArgs),
    /// Forget an image by name, or every name of a digest (its blobs stay
    /// until `kiln image gc`).
    Rm(RmArgs),
    /// Remove the blobs and unpacked roots no image refers to.
    Gc(StoreArgs),
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The archive or layout directory.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Store the image under this name instead of the one the archive
    /// gives it.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// registry/repository:tag or registry/repository@sha256:...
    #[arg(value_name = "REF")]
    reference: String,
    /// Plain HTTP, for a registry on loopback only.
    #[arg(long)]
    insecure: bool,
    /// User name for the registry (basic auth, or what its token service
    /// is asked with).
    #[arg(long, env = "KILN_REGISTRY_USER", value_name = "NAME")]
    username: Option<String>,
    /// The password (better: the environment variable than the flag).
    #[arg(
        long,
        env = "KILN_REGISTRY_PASSWORD",
        value_name = "SECRET",
        hide_env_values = true
    )]
    password: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// A name (registry/repo:tag) or a manifest digest (sha256:...).
    #[arg(value_name = "REF")]
    reference: String,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    backend: BackendFlags,
}

impl StoreArgs {
    fn open(&self) -> anyhow::Result<ImageStore> {
        let settings = self.backend.settings().images;
        Images::new(&settings, &kiln_protocol::RuntimeTable::default())
            .store()
            .with_context(|| format!("opening the image store {}", settings.dir.display()))
    }
}

fn print(images: &[Image], store: &ImageStore, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(images).expect("images serialise")
        );
        return;
    }
    for i in images {
        let unpacked = store.dir().join("roots").join(i.digest.hex()).is_dir();
        println!(
            "{}\t{}\t{} layers\t{:.1} MiB{}",
            i.name,
            i.digest,
            i.layers.len(),
            i.size_bytes as f64 / (1 << 20) as f64,
            if unpacked { "\tunpacked" } else { "" }
        );
    }
}

pub async fn run(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    if let ImageCommand::Pull(a) = cmd {
        let store = a.store.open()?;
        let opts = kiln_images::PullOptions {
            insecure: a.insecure,
            username: a.username.clone(),
            password: a.password.clone(),
        };
        let image = kiln_images::pull(&store, &a.reference, &opts)
            .await
            .with_context(|| format!("pulling {}", a.reference))?;
        let unpack = store.clone();
        let i = image.clone();
        tokio::task::spawn_blocking(move || unpack.root(&i))
            .await?
            .with_context(|| format!("unpacking {}", image.name))?;
        print(std::slice::from_ref(&image), &store, a.store.json);
        return Ok(ExitCode::SUCCESS);
    }
    tokio::task::spawn_blocking(move || run_blocking(cmd)).await?
}

fn run_blocking(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::Pull(_) => unreachable!("pulled in run"),
        ImageCommand::Import(a) => {
            let store = &a.store.open()?;
            let got = kiln_images::import(store, &a.file, a.name.as_deref())
                .with_context(|| format!("importing {}", a.file.display()))?;
            for i in &got {
                store
                    .root(i)
                    .with_context(|| format!("unpacking {}", i.name))?;
            }
            print(&got, store, a.store.json);
        }
        ImageCommand::Ls(a) => {
            let store = a.open()?;
            print(&store.list()?, &store, a.json);
        }
        ImageCommand::Rm(a) => {
            let store = a.store.open()?;
            let gone = store.remove(&a.reference)?;
            print(&gone, &store, a.store.json);
        }
        ImageCommand::Gc(a) => {
            let r = a.open()?.gc()?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "removed {} blobs ({:.1} MiB), {} unpacked roots and {} microVM disks",
                    r.blobs_removed,
                    r.bytes_freed as f64 / (1 << 20) as f64,
                    r.roots_removed,
                    r.disks_removed
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

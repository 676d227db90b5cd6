//! Root disks of microVM sandboxes rooted in an OCI image
//! ([`crate::SandboxSpec::image`]): the image as an ext4 with `kiln-agent`
//! as its init, built by kiln-images' store (`ImageStore::disk`) once per
//! image and agent, and attached read-only instead of the guest image. The
//! agent as PID 1 lays its tmpfs overlay over it as over Kiln's own guest
//! image, so each sandbox writes to its own copy.
//!
//! The agent put into the disks is the one in the backend's guest image
//! (`/sbin/kiln-agent`, read with `debugfs`, no mount): it is static, as a
//! guest of another distribution's libraries needs, and it is the very
//! build the backend's other sandboxes run, so the host speaks one
//! protocol to all of them. A new guest image with another agent makes new
//! disks (their name carries the agent's hash).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use kiln_images::{GuestAgent, ImageStore, StoreError};
use tokio::sync::OnceCell;

use crate::{ImageRoot, SandboxError};

/// Where Kiln's guest image keeps the agent (deploy/guest/build-rootfs.sh).
pub const AGENT_IN_GUEST: &str = "/sbin/kiln-agent";

/// Why an image's disk could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ImageDiskError {
    /// The agent could not be read out of the guest image.
    #[error("reading {AGENT_IN_GUEST} out of the guest image {rootfs} with debugfs (e2fsprogs): {reason}")]
    Agent { rootfs: PathBuf, reason: String },
    /// The image store failed (unknown image, unpacking, mkfs).
    #[error("the root disk of image {digest}: {source}")]
    Store {
        digest: String,
        #[source]
        source: Box<StoreError>,
    },
}

/// The disks of one backend: the agent of its guest image, read once.
#[derive(Debug, Clone)]
pub struct ImageDisks {
    rootfs: PathBuf,
    agent: Arc<OnceCell<GuestAgent>>,
}

impl ImageDisks {
    /// Disks whose agent comes from the guest image `rootfs`.
    pub fn new(rootfs: PathBuf) -> Self {
        Self {
            rootfs,
            agent: Arc::default(),
        }
    }

    /// The agent of the guest image (read on first use).
    pub async fn agent(&self) -> Result<GuestAgent, SandboxError> {
        let rootfs = self.rootfs.clone();
        self.agent
            .get_or_try_init(|| async move {
                let read = tokio::task::spawn_blocking(move || agent_of(&rootfs))
                    .await
                    .map_err(|e| SandboxError::Io {
                        what: "reading the guest's agent".into(),
                        error: std::io::Error::other(e),
                    })?;
                read.map_err(|e| SandboxError::backend("image disk", e))
            })
            .await
            .cloned()
    }

    /// The disk of `image`, built now (off the async threads) if it does
    /// not exist yet.
    pub async fn disk(&self, image: &ImageRoot) -> Result<PathBuf, SandboxError> {
        let agent = self.agent().await?;
        let (store, digest) = (image.store.clone(), image.digest.clone());
        let built = tokio::task::spawn_blocking(move || {
            let store = ImageStore::open(store)?;
            let image = store.resolve(&digest)?;
            store.disk(&image, &agent)
        })
        .await
        .map_err(|e| SandboxError::Io {
            what: "building an image's root disk".into(),
            error: std::io::Error::other(e),
        })?;
        built.map_err(|source| {
            SandboxError::backend(
                "image disk",
                ImageDiskError::Store {
                    digest: image.digest.clone(),
                    source: Box::new(source),
                },
            )
        })
    }
}

/// Reads the static agent out of the ext4 guest image `rootfs`.
fn agent_of(rootfs: &Path) -> Result<GuestAgent, ImageDiskError> {
    let fail = |reason: String| ImageDiskError::Agent {
        rootfs: rootfs.to_owned(),
        reason,
    };
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {AGENT_IN_GUEST}"))
        .arg(rootfs)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !crate::jail::is_static_elf(&out.stdout) {
        let said = String::from_utf8_lossy(&out.stderr);
        return Err(fail(format!(
            "no static executable there (debugfs: {})",
            said.trim()
        )));
    }
    Ok(GuestAgent::new(out.stdout))
}

#[cfg(test)]
pub(crate) mod testing {
    //! A guest image and an image store small enough for unit tests.

    use std::path::{Path, PathBuf};
    use std::process::Command;

    use crate::ImageRoot;

    /// The smallest ELF64 executable header without program headers:
    /// static as far as `is_static_elf` can tell (it is never run).
    pub fn static_elf() -> Vec<u8> {
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(64, 0);
        elf
    }

    /// An ext4 guest image under `dir` whose `/sbin/kiln-agent` is `agent`.
    pub fn guest_image(dir: &Path, agent: &[u8]) -> PathBuf {
        let tree = dir.join("guest-tree");
        std::fs::create_dir_all(tree.join("sbin")).unwrap();
        std::fs::write(tree.join("sbin/kiln-agent"), agent).unwrap();
        let img = dir.join("rootfs.ext4");
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&img)
            .arg("4M")
            .output()
            .expect("running mkfs.ext4");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        img
    }

    /// A store under `dir` holding one image (`kiln.test/disk:1`, a
    /// marker file), as a sandbox spec names it.
    pub fn image_root(dir: &Path) -> ImageRoot {
        let layout = dir.join("layout");
        kiln_images::layout::write_layout(
            &layout,
            &[kiln_images::layout::LayoutImage {
                name: "kiln.test/disk:1",
                layers: vec![kiln_tests::images::file_layer(
                    "/etc/marker",
                    "of the image\n",
                )],
                env: vec![],
                working_dir: None,
            }],
        )
        .unwrap();
        let store = kiln_images::ImageStore::open(dir.join("images")).unwrap();
        let image = kiln_images::import(&store, &layout, None)
            .unwrap()
            .remove(0);
        ImageRoot {
            digest: image.digest.to_string(),
            dir: PathBuf::new(),
            store: store.dir().to_owned(),
            runtimes: None,
        }
    }

    /// What `debugfs -R "cat PATH"` reads out of `disk`.
    pub fn cat(disk: &Path, path: &str) -> Vec<u8> {
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat {path}"))
            .arg(disk)
            .output()
            .expect("running debugfs")
            .stdout
    }

    /// A fresh scratch directory.
    pub fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn a_guest_image_without_a_static_agent_is_refused_naming_it() {
        let dir = scratch("image-disk-dynamic");
        // A script: not what a foreign root can run as init.
        let img = guest_image(&dir, b"#!/bin/sh\n");
        let e = agent_of(&img).unwrap_err().to_string();
        assert!(
            e.contains("/sbin/kiln-agent") && e.contains("rootfs.ext4") && e.contains("static"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_image_disk_holds_the_image_and_the_guest_images_agent_as_init() {
        let dir = scratch("image-disk");
        let disks = ImageDisks::new(guest_image(&dir, &static_elf()));
        let image = image_root(&dir);
        let disk = disks.disk(&image).await.unwrap();
        assert!(
            disk.starts_with(dir.join("images/disks")),
            "{}",
            disk.display()
        );
        assert_eq!(cat(&disk, "/etc/marker"), b"of the image\n");
        assert_eq!(cat(&disk, "/sbin/kiln-agent"), static_elf());
        // Built once: asked again, the same file.
        assert_eq!(disks.disk(&image).await.unwrap(), disk);
        let unknown = ImageRoot {
            digest: format!("sha256:{}", "0".repeat(64)),
            ..image
        };
        let e = disks.disk(&unknown).await.unwrap_err().to_string();
        assert!(e.contains(&unknown.digest), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Finding the guest's kernel and root image. `deploy/guest/build-*.sh`
//! leave them in a cache directory as `kernel-<key>/vmlinux` and
//! `rootfs-<key>/rootfs.ext4`; a path given in configuration wins over the
//! cache, and the newest build in the cache over older ones.

use std::path::{Path, PathBuf};

/// The default cache of the guest build scripts.
pub const DEFAULT_CACHE: &str = "/var/cache/kiln/guest";

/// A guest kernel and root image that exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// Uncompressed `vmlinux` (PVH / ELF entry), booted by QEMU and
    /// Firecracker alike.
    pub kernel: PathBuf,
    /// ext4 root image with `kiln-agent` as `/sbin/init`.
    pub rootfs: PathBuf,
}

/// Why no guest image was found.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A configured file does not exist.
    #[error("the guest {what} {path} does not exist (from {setting}); build it with deploy/guest/{script}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        setting: &'static str,
        script: &'static str,
    },
    /// Nothing configured, and nothing built in the cache.
    #[error("no guest {what} in {cache}: build it with deploy/guest/{script}, or set {setting}")]
    NotBuilt {
        what: &'static str,
        cache: PathBuf,
        setting: &'static str,
        script: &'static str,
    },
}

/// The newest `<prefix>*/<file>` in `cache`, as the build scripts leave
/// them.
fn newest_in_cache(cache: &Path, prefix: &str, file: &str) -> Option<PathBuf> {
    std::fs::read_dir(cache)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path().join(file))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

impl GuestImage {
    /// The kernel and image: the given paths where set, else the newest in
    /// `cache`.
    pub fn find(
        kernel: Option<&Path>,
        rootfs: Option<&Path>,
        cache: &Path,
    ) -> Result<Self, ImageError> {
        let pick = |given: Option<&Path>,
                    what: &'static str,
                    prefix: &str,
                    file: &str,
                    setting: &'static str,
                    script: &'static str| {
            match given {
                Some(p) if p.is_file() => Ok(p.to_owned()),
                Some(p) => Err(ImageError::Missing {
                    what,
                    path: p.to_owned(),
                    setting,
                    script,
                }),
                None => newest_in_cache(cache, prefix, file).ok_or_else(|| ImageError::NotBuilt {
                    what,
                    cache: cache.to_owned(),
                    setting,
                    script,
                }),
            }
        };
        Ok(Self {
            kernel: pick(
                kernel,
                "kernel",
                "kernel-",
                "vmlinux",
                "guest.kernel / --guest-kernel / KILN_GUEST_KERNEL",
                "build-kernel.sh",
            )?,
            rootfs: pick(
                rootfs,
                "root image",
                "rootfs-",
                "rootfs.ext4",
                "guest.rootfs / --guest-rootfs / KILN_GUEST_ROOTFS",
                "build-rootfs.sh",
            )?,
        })
    }

    /// The image named by `KILN_GUEST_KERNEL`, `KILN_GUEST_ROOTFS` and
    /// `KILN_GUEST_CACHE` (for tests and tools that take no configuration).
    pub fn from_env() -> Result<Self, ImageError> {
        let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
        let cache = var("KILN_GUEST_CACHE").unwrap_or_else(|| DEFAULT_CACHE.into());
        Self::find(
            var("KILN_GUEST_KERNEL").as_deref(),
            var("KILN_GUEST_ROOTFS").as_deref(),
            &cache,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_build_in_the_cache_wins_and_a_given_path_wins_over_it() {
        let cache = std::env::temp_dir().join(format!("kiln-image-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        for (dir, age_s) in [("kernel-old", 100), ("kernel-new", 0), ("rootfs-a", 0)] {
            let d = cache.join(dir);
            std::fs::create_dir_all(&d).unwrap();
            let f = d.join(if dir.starts_with("kernel") {
                "vmlinux"
            } else {
                "rootfs.ext4"
            });
            std::fs::write(&f, b"x").unwrap();
            let t = std::time::SystemTime::now() - std::time::Duration::from_secs(age_s);
            std::fs::File::options()
                .write(true)
                .open(&f)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        let img = GuestImage::find(None, None, &cache).unwrap();
        assert_eq!(img.kernel, cache.join("kernel-new/vmlinux"));
        let given = cache.join("kernel-old/vmlinux");
        let img = GuestImage::find(Some(&given), None, &cache).unwrap();
        assert_eq!(img.kernel, given);
        let e = GuestImage::find(Some(&cache.join("nope")), None, &cache).unwrap_err();
        assert!(e.to_string().contains("KILN_GUEST_KERNEL"), "{e}");
        std::fs::remove_dir_all(&cache).unwrap();
        let e = GuestImage::find(None, None, &cache).unwrap_err();
        assert!(e.to_string().contains("build-kernel.sh"), "{e}");
    }
}

//! Bringing images in from files: an OCI image layout (a directory, or a
//! tar of one) or a `docker save` tarball (which, since Docker 25, is
//! also an OCI layout; older ones have only `manifest.json`).
//!
//! A tarball is first unpacked with the same checks as a layer (into the
//! store's scratch space), so a hostile archive cannot write anywhere
//! else; every file it names is then looked up inside it as if it were a
//! root, so a symlink in it cannot point the import at a host file.
//! Blobs named by digest are verified as they are copied into the store.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use oci_spec::image::{
    Descriptor, ImageIndex, ImageManifest, ImageManifestBuilder, MediaType, Platform,
};

use crate::digest::Digest;
use crate::store::{self, io_err, lookup, Image, ImageStore, StoreError};
use crate::unpack::{self, UnpackError};

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file is neither an OCI layout nor a `docker save` archive.
    #[error("{0} is not an OCI image layout or a `docker save` archive (it has neither index.json nor manifest.json)")]
    NotAnImage(PathBuf),
    /// A file the archive's index names is not in it.
    #[error("{file} is named by the archive's index but is not in it")]
    Missing { file: String },
    /// The archive itself could not be unpacked (or was hostile).
    #[error("reading the archive: {0}")]
    Archive(#[source] UnpackError),
    /// An index has no manifest for this host's platform.
    #[error("the image index has no manifest for {0} (this host's platform)")]
    NoPlatform(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Annotations that carry an image's name in a layout's index.
const NAME_ANNOTATIONS: [&str; 2] = [
    "io.containerd.image.name",
    "org.opencontainers.image.ref.name",
];

/// Imports every image in `path` (a directory or a tarball), each under
/// `name` if given, else under the name the archive gives it. Returns the
/// images stored.
pub fn import(
    store: &ImageStore,
    path: &Path,
    name: Option<&str>,
) -> Result<Vec<Image>, ImportError> {
    let meta = fs::metadata(path).map_err(|source| StoreError::Io {
        what: format!("reading {}", path.display()),
        source,
    })?;
    if meta.is_dir() {
        return import_dir(store, path, name);
    }
    let scratch = store.dir().join("roots/tmp").join(format!(
        "import-{}-{}",
        std::process::id(),
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).map_err(io_err(format!("creating {}", scratch.display())))?;
    let result = (|| {
        let f = fs::File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
        unpack::apply_layer(
            &scratch,
            &path.display().to_string(),
            io::BufReader::new(f),
            &unpack::Limits::default(),
            None,
        )
        .map_err(ImportError::Archive)?;
        import_dir(store, &scratch, name).map_err(|e| match e {
            ImportError::NotAnImage(_) => ImportError::NotAnImage(path.to_owned()),
            e => e,
        })
    })();
    let _ = fs::remove_dir_all(&scratch);
    result
}

fn import_dir(
    store: &ImageStore,
    dir: &Path,
    name: Option<&str>,
) -> Result<Vec<Image>, ImportError> {
    let layout = Layout { dir };
    if lookup(dir, "index.json").is_some_and(|p| p.is_file()) {
        layout.import_oci(store, name)
    } else if lookup(dir, "manifest.json").is_some_and(|p| p.is_file()) {
        layout.import_docker(store, name)
    } else {
        Err(ImportError::NotAnImage(dir.to_owned()))
    }
}

struct Layout<'a> {
    dir: &'a Path,
}

/// One image of a legacy `docker save` manifest.json.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn doc_err(what: impl Into<String>) -> impl FnOnce(oci_spec::OciSpecError) -> ImportError {
    let what = what.into();
    move |source| StoreError::Document { what, source }.into()
}

fn descriptor_digest(d: &Descriptor) -> Result<Digest, ImportError> {
    Ok(store::descriptor_digest(d, "a descriptor")?)
}

fn oci_digest(d: &Digest) -> oci_spec::image::Digest {
    oci_spec::image::Digest::from_str(d.as_str()).expect("a sha256 digest is an OCI digest")
}

impl Layout<'_> {
    fn file(&self, rel: &str) -> Result<PathBuf, ImportError> {
        lookup(self.dir, rel)
            .filter(|p| p.is_file())
            .ok_or_else(|| ImportError::Missing {
                file: rel.to_owned(),
            })
    }

    fn read(&self, rel: &str) -> Result<Vec<u8>, ImportError> {
        let p = self.file(rel)?;
        fs::read(&p).map_err(|source| {
            StoreError::Io {
                what: format!("reading {rel}"),
                source,
            }
            .into()
        })
    }

    fn blob_rel(d: &Digest) -> String {
        format!("blobs/sha256/{}", d.hex())
    }

    /// Copies a blob of the layout into the store, verifying its digest.
    fn copy_blob(&self, store: &ImageStore, d: &Digest) -> Result<(), ImportError> {
        if store.has_blob(d) {
            return Ok(());
        }
        let p = self.file(&Self::blob_rel(d))?;
        let f = fs::File::open(&p).map_err(|source| StoreError::Io {
            what: format!("opening {}", p.display()),
            source,
        })?;
        store.put_blob(d, io::BufReader::new(f))?;
        Ok(())
    }

    fn import_oci(
        &self,
        store: &ImageStore,
        name: Option<&str>,
    ) -> Result<Vec<Image>, ImportError> {
        let index = ImageIndex::from_reader(&self.read("index.json")?[..])
            .map_err(doc_err("the archive's index.json"))?;
        let mut out = Vec::new();
        for desc in index.manifests() {
            let given = desc
                .annotations()
                .as_ref()
                .and_then(|a| NAME_ANNOTATIONS.iter().find_map(|k| a.get(*k).cloned()));
            let manifest = self.manifest_for_host(desc)?;
            let digest = descriptor_digest(&manifest)?;
            let bytes = self.read(&Self::blob_rel(&digest))?;
            if Digest::of(&bytes) != digest {
                return Err(StoreError::DigestMismatch {
                    expected: digest,
                    actual: Digest::of(&bytes),
                }
                .into());
            }
            let parsed = ImageManifest::from_reader(&bytes[..])
                .map_err(doc_err(format!("manifest {digest}")))?;
            self.copy_blob(store, &descriptor_digest(parsed.config())?)?;
            for l in parsed.layers() {
                self.copy_blob(store, &descriptor_digest(l)?)?;
            }
            let name = name
                .map(str::to_owned)
                .or(given)
                .unwrap_or_else(|| digest.to_string());
            out.push(store.add(&name, &bytes)?);
        }
        Ok(out)
    }

    /// The manifest a descriptor leads to for this host: itself, or the
    /// entry of a nested index for this host's platform.
    fn manifest_for_host(&self, desc: &Descriptor) -> Result<Descriptor, ImportError> {
        if !matches!(desc.media_type(), MediaType::ImageIndex)
            && desc.media_type().to_string()
                != "application/vnd.docker.distribution.manifest.list.v2+json"
        {
            return Ok(desc.clone());
        }
        let d = descriptor_digest(desc)?;
        let nested = ImageIndex::from_reader(&self.read(&Self::blob_rel(&d))?[..])
            .map_err(doc_err(format!("index {d}")))?;
        pick_platform(nested.manifests()).cloned()
    }

    fn import_docker(
        &self,
        store: &ImageStore,
        name: Option<&str>,
    ) -> Result<Vec<Image>, ImportError> {
        let entries: Vec<DockerImage> = serde_json::from_slice(&self.read("manifest.json")?)
            .map_err(|e| StoreError::Io {
                what: "parsing manifest.json".into(),
                source: io::Error::other(e),
            })?;
        let mut out = Vec::new();
        for e in entries {
            let config = self.read(&e.config)?;
            let (config_digest, config_size) = store.put_blob_any(&config[..])?;
            let mut layers = Vec::new();
            for l in &e.layers {
                let p = self.file(l)?;
                let f = fs::File::open(&p).map_err(|source| StoreError::Io {
                    what: format!("opening {l}"),
                    source,
                })?;
                let gz = is_gzip(&p);
                let (d, size) = store.put_blob_any(io::BufReader::new(f))?;
                let media = if gz {
                    MediaType::ImageLayerGzip
                } else {
                    MediaType::ImageLayer
                };
                layers.push(Descriptor::new(media, size, oci_digest(&d)));
            }
            let manifest = ImageManifestBuilder::default()
                .schema_version(2u32)
                .media_type(MediaType::ImageManifest)
                .config(Descriptor::new(
                    MediaType::ImageConfig,
                    config_size,
                    oci_digest(&config_digest),
                ))
                .layers(layers)
                .build()
                .map_err(doc_err("the manifest made for a docker save image"))?;
            let bytes = manifest
                .to_string()
                .map_err(doc_err("the manifest made for a docker save image"))?;
            let name = name
                .map(str::to_owned)
                .or_else(|| e.repo_tags.as_ref().and_then(|t| t.first().cloned()))
                .unwrap_or_else(|| config_digest.to_string());
            out.push(store.add(&name, bytes.as_bytes())?);
        }
        Ok(out)
    }
}

fn is_gzip(p: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 2];
    fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == [0x1f, 0x8b]
}

/// The entry of an index for this host's platform (linux and this
/// architecture); an index whose entries carry no platform gives its
/// first.
pub fn pick_platform(manifests: &[Descriptor]) -> Result<&Descriptor, ImportError> {
    let host = Platform::default();
    let matches = |d: &&Descriptor| match d.platform() {
        Some(p) => p.os() == host.os() && p.architecture() == host.architecture(),
        None => false,
    };
    manifests
        .iter()
        .find(matches)
        .or_else(|| manifests.iter().find(|d| d.platform().is_none()))
        .ok_or_else(|| ImportError::NoPlatform(format!("{}/{}", host.os(), host.architecture())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(arch: Option<&str>, hex: char) -> Descriptor {
        let mut v = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", hex.to_string().repeat(64)),
            "size": 1,
        });
        if let Some(a) = arch {
            v["platform"] = serde_json::json!({"architecture": a, "os": "linux"});
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn an_index_resolves_to_this_hosts_platform() {
        let host = oci_spec::image::Arch::default().to_string();
        let other = if host == "arm64" { "amd64" } else { "arm64" };
        let entries = [entry(Some(other), 'a'), entry(Some(&host), 'b')];
        assert_eq!(pick_platform(&entries).unwrap(), &entries[1]);
        // Entries without a platform: the first of those.
        let plain = [entry(Some(other), 'a'), entry(None, 'c')];
        assert_eq!(pick_platform(&plain).unwrap(), &plain[1]);
        let e = pick_platform(&[entry(Some(other), 'a')]).unwrap_err();
        assert!(e.to_string().contains(&host), "{e}");
    }
}

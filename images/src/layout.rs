//! Writing an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/...`) from layers in memory: how Kiln's tests and
//! benchmarks make images without a registry or the internet, and what
//! `skopeo copy oci:DIR docker://...` pushes to a test registry.

use std::fs;
use std::io;
use std::path::Path;

use serde_json::json;

use crate::digest::Digest;

/// One image to write.
pub struct LayoutImage<'a> {
    /// Its name (`org.opencontainers.image.ref.name`).
    pub name: &'a str,
    /// Layers, bottom first: tar archives, gzip-compressed or not.
    pub layers: Vec<Vec<u8>>,
    /// `Env` of its config.
    pub env: Vec<String>,
    /// `WorkingDir` of its config.
    pub working_dir: Option<String>,
}

/// Writes the images as an OCI layout in `dir` (made if missing). Returns
/// each image's manifest digest.
pub fn write_layout(dir: &Path, images: &[LayoutImage<'_>]) -> io::Result<Vec<Digest>> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> io::Result<Digest> {
        let d = Digest::of(bytes);
        fs::write(blobs.join(d.hex()), bytes)?;
        Ok(d)
    };
    let mut manifests = Vec::new();
    let mut digests = Vec::new();
    for image in images {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for l in &image.layers {
            let gz = l.starts_with(&[0x1f, 0x8b]);
            let plain = if gz {
                let mut out = Vec::new();
                io::copy(&mut flate2::read::MultiGzDecoder::new(&l[..]), &mut out)?;
                out
            } else {
                l.clone()
            };
            diff_ids.push(Digest::of(&plain).to_string());
            let media = if gz {
                "application/vnd.oci.image.layer.v1.tar+gzip"
            } else {
                "application/vnd.oci.image.layer.v1.tar"
            };
            layers
                .push(json!({"mediaType": media, "digest": put(l)?.to_string(), "size": l.len()}));
        }
        let arch = oci_spec::image::Arch::default().to_string();
        let mut config = json!({"Env": image.env});
        if let Some(w) = &image.working_dir {
            config["WorkingDir"] = json!(w);
        }
        let config = serde_json::to_vec(&json!({
            "architecture": arch,
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(&config)?.to_string(),
                "size": config.len(),
            },
            "layers": layers,
        }))?;
        let digest = put(&manifest)?;
        manifests.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest.to_string(),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": image.name},
        }));
        digests.push(digest);
    }
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": manifests}))?,
    )?;
    Ok(digests)
}

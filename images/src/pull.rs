//! Pulling images from OCI distribution registries, through oci-client
//! (the protocol, basic and bearer-token auth).
//!
//! The manifest is fetched raw, hashed and checked against the digest the
//! registry gives (and the one the reference names, when it names one);
//! an index resolves to this host's platform. Blobs the store already has
//! are not fetched again, so a pull that was interrupted restarts where
//! it stopped, one blob at a time; each blob is written to the store's
//! scratch space and renamed in only once its bytes hash to its digest.
//! Plain HTTP (`insecure`) is refused for anything but a loopback
//! registry.

use std::io;
use std::net::IpAddr;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::{ImageIndex, ImageManifest};

use crate::digest::Digest;
use crate::import::{pick_platform, ImportError};
use crate::store::{descriptor_digest, Image, ImageStore, StoreError};

/// How to reach the registry.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Plain HTTP; only for a registry on loopback.
    pub insecure: bool,
    /// Basic credentials (also what a bearer-token service is asked with).
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{reference:?} is not an image reference: {source}")]
    BadReference {
        reference: String,
        #[source]
        source: oci_client::ParseError,
    },
    #[error("--insecure (plain HTTP) is only for a registry on loopback, not {0}")]
    InsecureNotLoopback(String),
    #[error("fetching the manifest of {reference}: {source}")]
    Manifest {
        reference: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("the manifest of {reference} hashes to {actual}, not {expected}")]
    ManifestDigest {
        reference: String,
        expected: String,
        actual: Digest,
    },
    #[error("fetching blob {digest} of {reference}: {source}")]
    Blob {
        reference: String,
        digest: Digest,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("{what} of {reference} is not a valid OCI document: {source}")]
    Document {
        reference: String,
        what: &'static str,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error(transparent)]
    Platform(#[from] ImportError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Media types asked for: image manifests and indexes, OCI and Docker.
const ACCEPTED: [&str; 4] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Whether `registry` (`host[:port]`) is on loopback.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => registry.split(':').next().unwrap_or(""),
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Pulls `reference` into `store` under that name. Returns the image.
pub async fn pull(
    store: &ImageStore,
    reference: &str,
    opts: &PullOptions,
) -> Result<Image, PullError> {
    // reqwest's rustls needs a process-wide provider; a second install
    // fails harmlessly.
    #[expect(
        deprecated,
        reason = "ring needs no C toolchain (aws-lc-rs does); it lacks only post-quantum key exchange"
    )]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let parsed: Reference = reference
        .parse()
        .map_err(|source| PullError::BadReference {
            reference: reference.to_owned(),
            source,
        })?;
    let registry = parsed.resolve_registry().to_owned();
    let protocol = if opts.insecure {
        if !is_loopback(&registry) {
            return Err(PullError::InsecureNotLoopback(registry));
        }
        ClientProtocol::Http
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        ..ClientConfig::default()
    });
    let auth = match (&opts.username, &opts.password) {
        (Some(u), Some(p)) => RegistryAuth::Basic(u.clone(), p.clone()),
        _ => RegistryAuth::Anonymous,
    };
    let mut bytes = manifest(&client, &parsed, &auth, parsed.digest()).await?;
    if serde_json::from_slice::<serde_json::Value>(&bytes)
        .is_ok_and(|v| v.get("manifests").is_some())
    {
        let index = ImageIndex::from_reader(&bytes[..]).map_err(|source| PullError::Document {
            reference: reference.to_owned(),
            what: "the image index",
            source,
        })?;
        let chosen = pick_platform(index.manifests())?.digest().to_string();
        let by_digest = Reference::with_digest(
            parsed.registry().to_owned(),
            parsed.repository().to_owned(),
            chosen.clone(),
        );
        bytes = manifest(&client, &by_digest, &auth, Some(&chosen)).await?;
    }
    let parsed_manifest =
        ImageManifest::from_reader(&bytes[..]).map_err(|source| PullError::Document {
            reference: reference.to_owned(),
            what: "the manifest",
            source,
        })?;
    let blobs = std::iter::once(parsed_manifest.config()).chain(parsed_manifest.layers());
    for desc in blobs {
        let digest = descriptor_digest(desc, format!("a descriptor of {reference}"))?;
        if store.has_blob(&digest) {
            continue;
        }
        let tmp = store.scratch_blob_path();
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|source| StoreError::Io {
                what: format!("creating {}", tmp.display()),
                source,
            })?;
        let fetched = client.pull_blob(&parsed, digest.as_str(), file).await;
        if let Err(source) = fetched {
            let _ = std::fs::remove_file(&tmp);
            return Err(PullError::Blob {
                reference: reference.to_owned(),
                digest,
                source,
            });
        }
        // Hashing a layer of tens of MiB is not for an async thread.
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.adopt_blob(&digest, &tmp))
            .await
            .map_err(|e| StoreError::Io {
                what: "the blob verification task".into(),
                source: io::Error::other(e.to_string()),
            })??;
    }
    Ok(store.add(reference, &bytes)?)
}

/// A manifest's bytes, checked: they hash to the digest the registry
/// says, and to `expected` when the caller named one.
async fn manifest(
    client: &Client,
    reference: &Reference,
    auth: &RegistryAuth,
    expected: Option<&str>,
) -> Result<Vec<u8>, PullError> {
    let (bytes, said) = client
        .pull_manifest_raw(reference, auth, &ACCEPTED)
        .await
        .map_err(|source| PullError::Manifest {
            reference: reference.whole(),
            source,
        })?;
    let actual = Digest::of(&bytes);
    for want in std::iter::once(said.as_str()).chain(expected) {
        if want != actual.as_str() {
            return Err(PullError::ManifestDigest {
                reference: reference.whole(),
                expected: want.to_owned(),
                actual,
            });
        }
    }
    Ok(bytes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_registries_count_as_loopback() {
        for r in [
            "localhost:5000",
            "127.0.0.1:5000",
            "127.8.0.1",
            "[::1]:5000",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in [
            "registry.example:5000",
            "10.0.0.1:5000",
            "[2001:db8::1]:443",
        ] {
            assert!(!is_loopback(r), "{r}");
        }
    }
}

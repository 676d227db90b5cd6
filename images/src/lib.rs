//! Docker/OCI images as sandbox roots: a content-addressed store of blobs
//! (layers, configs, manifests) kept once by digest and verified on
//! write, an index of named images, import from `docker save` tarballs and
//! OCI image layouts, and the safe unpacking of layers into a root a
//! sandbox can use (read-only, shared by every sandbox of the image).

mod digest;
pub mod disk;
pub mod import;
pub mod layout;
pub mod pull;
pub mod store;
pub mod unpack;

pub use digest::{BadDigest, Digest, Hasher};
pub use disk::GuestAgent;
pub use import::{import, ImportError};
pub use pull::{pull, PullError, PullOptions};
pub use store::{lookup, GcReport, Image, ImageStore, StoreError};
pub use unpack::{apply_layer, LayerStats, Limits, Refusal, UnpackError};

#[cfg(test)]
mod testing;

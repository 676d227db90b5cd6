//! What the microVM backends (qemu, Firecracker) share: finding the guest
//! image, the hybrid-vsock transport to the agent, the boot steps from a
//! started VMM to a connected agent (wait for its `ready`, connect, hello,
//! per-sandbox guest setup), the serial console, and the VMM processes tied
//! to ours.

pub mod image;

pub use image::{GuestImage, ImageError};

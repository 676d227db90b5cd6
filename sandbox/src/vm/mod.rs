//! What the microVM backends (qemu, Firecracker) share: finding the guest
//! image ([`image`]), the root disks of sandboxes rooted in an OCI image
//! ([`image_disk`]), the hybrid-vsock transport to the agent ([`vsock`]),
//! the steps from a started VMM to a connected, set-up agent ([`boot`]),
//! the serial console ([`console`]), and VMM processes tied to ours
//! ([`process`]). Crash records are shared by every backend
//! (`crate::record`).

pub mod boot;
pub mod console;
pub mod image;
pub mod image_disk;
pub mod process;
pub mod vsock;

pub use boot::{BootError, ReadySignal, AGENT_PORT, READY_PORT};
pub use console::Console;
pub use image::{GuestImage, ImageError};
pub use image_disk::{ImageDiskError, ImageDisks};
pub use vsock::VsockError;

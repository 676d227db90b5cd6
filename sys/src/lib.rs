//! Kiln's system-call wrappers shared by the agent, the sandbox backends
//! and the page server (see README.md). Each module wraps one concern;
//! every `unsafe` block has its reason next to it, and callers get safe
//! functions over owned or borrowed descriptors.

pub mod eventfd;
pub mod fd;
pub mod mmap;
pub mod pidfd;
pub mod poll;
pub mod seccomp;
pub mod signal;
pub mod sock_ctrl_msg;

pub use fd::{cvt, retry_eintr};

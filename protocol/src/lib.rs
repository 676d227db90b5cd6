//! Kiln's wire types, shared by every other crate: what a job is
//! ([`JobSpec`]), what comes back ([`JobResult`]), the table of language
//! runtimes ([`RuntimeTable`]), and the frames that the host and the
//! in-sandbox agent exchange ([`Frame`]). Everything that crosses a trust
//! boundary is parsed here, once, into typed values with hard size limits, so
//! that intake (HTTP, AMQP, CLI), the sandboxes and the agent never handle raw
//! untrusted bytes.

mod frame;
mod job;
pub mod limits;
mod runtime;

pub use frame::{
    read_frame, Decoder, ExecError, ExecRequest, ExitReport, ExitStatus, Frame, FrameError,
    GetFile, GuestNetwork, GuestSetup, Hello, HelloAck, Kill, PutFile, Rooms, Started,
    MAX_SETUP_ENTROPY_BYTES, PROTOCOL_VERSION,
};
pub use job::{
    check_image_ref, check_rel_path, Acquire, EgressSpec, ExecId, File, JobId, JobResult, JobSpec,
    Limits, Outcome, SandboxStart, SandboxTimings, SpecError, Timings, Usage,
};
pub use runtime::{
    ContextDriver, Runtime, RuntimeError, RuntimeTable, WarmStart, DEFAULT_RUNTIMES_TOML,
};

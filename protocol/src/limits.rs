//! Hard limits on everything untrusted. Each value is a policy choice of
//! Kiln's, documented in `docs/api.md`; the frame limits bound the memory a
//! peer can make the other side allocate.

/// Largest frame body (kind byte included) either side accepts: a file of
/// [`MAX_FILE_BYTES`] plus its path and header must fit in one frame.
pub const MAX_FRAME_BYTES: usize = 9 * 1024 * 1024;

/// Largest chunk of stdout/stderr/stdin data the agent or host puts in one
/// frame. Small enough to keep streaming latency low, large enough that a
/// flood costs few frames.
pub const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// Largest single file of a job or a workspace upload.
pub const MAX_FILE_BYTES: usize = 8 * 1024 * 1024;

/// Largest total size of a job's code and files.
pub const MAX_JOB_CODE_BYTES: usize = 4 * 1024 * 1024;

/// Most rules in one list (allow or deny) of a job's egress rules.
pub const MAX_EGRESS_RULES: usize = 256;

/// Most files one job may carry.
pub const MAX_FILES: usize = 256;

/// Longest path of a job file, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;

/// Most arguments of a job, and longest total of them in bytes.
pub const MAX_ARGS: usize = 1024;
pub const MAX_ARGS_BYTES: usize = 256 * 1024;

/// Most environment variables, and longest total of names and values.
pub const MAX_ENV: usize = 256;
pub const MAX_ENV_BYTES: usize = 256 * 1024;

/// Largest stdin a job may carry inline.
pub const MAX_STDIN_BYTES: usize = 8 * 1024 * 1024;

/// Bounds of the per-job limits: `(min, default, max)`.
pub const TIMEOUT_MS: (u64, u64, u64) = (1, 10_000, 15 * 60 * 1000);
pub const MEMORY_MB: (u64, u64, u64) = (16, 256, 16 * 1024);
pub const PIDS: (u64, u64, u64) = (4, 64, 4096);
/// Per stream (stdout and stderr each).
pub const OUTPUT_BYTES: (u64, u64, u64) = (1, 1024 * 1024, 64 * 1024 * 1024);
pub const DISK_MB: (u64, u64, u64) = (1, 64, 16 * 1024);
/// CPU quota in thousandths of a CPU.
pub const CPU_MILLIS: (u64, u64, u64) = (10, 1000, 64_000);

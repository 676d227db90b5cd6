//! The host<->agent protocol: length-prefixed frames over a byte stream (a
//! unix socket in a jail, vsock in a microVM).
//!
//! ```text
//! frame := len:u32be kind:u8 body[len-1]
//! ```
//!
//! Control frames carry a JSON body; data frames (stdin/stdout/stderr, file
//! contents, ping) carry raw bytes after a fixed binary header, so that output
//! is never re-encoded. Every request carries a `tag` chosen by the host;
//! every answer repeats it (an exec's tag is its [`ExecId`]).
//!
//! The exchange: the host sends [`Hello`], the agent answers [`HelloAck`] or
//! an error and closes if the versions differ. In a microVM guest the host
//! then sends [`GuestSetup`] (answered with `Ack`) before anything else.
//! Then any number of `PutFile`,
//! `GetFile`, `Exec` (+ `Stdin`, `Kill`), `Ping` and `Reset` requests, in any
//! order and concurrently; the agent answers with `Ack`, `FileData`,
//! `Started` / `Stdout` / `Stderr` / `Exit`, `Pong`, or `Error`.
//!
//! [`Decoder`] is sans-IO: feed it bytes, take frames out. It never panics
//! and never allocates more than [`MAX_FRAME_BYTES`](crate::limits::MAX_FRAME_BYTES)
//! for a frame, whatever the peer sends.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::job::ExecId;
use crate::limits::{MAX_CHUNK_BYTES, MAX_FILE_BYTES, MAX_FRAME_BYTES, MAX_PATH_BYTES};
use crate::runtime::RuntimeTable;

/// Version of this protocol; both sides must agree exactly.
pub const PROTOCOL_VERSION: u32 = 6;

/// First frame, host to agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub runtimes: RuntimeTable,
    /// Runtimes to pre-warm right away, by canonical name.
    pub warm: Vec<String>,
    /// Directory jobs run in and files are relative to.
    pub workdir: String,
    /// Unprivileged user and group that jobs run as.
    pub uid: u32,
    pub gid: u32,
    /// Run every job in a room: namespaces of its own inside the sandbox,
    /// made fresh by [`Frame::Reset`]. `None`: jobs share the sandbox's
    /// namespaces (a microVM guest, whose kernel has none to spare).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Rooms>,
}

/// How the agent makes rooms: per-lease pid, mount, network and IPC
/// namespaces, with a fresh tmpfs on the work directory, `/tmp` and
/// `/dev/shm`, a fresh `/proc` and only a loopback interface. Everything a
/// lease's jobs can change lives in its room, so [`Frame::Reset`] (which
/// kills the room and makes a new one) leaves nothing of them behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rooms {
    /// Size of each of the room's three tmpfs, in MiB.
    pub disk_mb: u64,
    /// Seccomp programs every job process installs, in order, as the last
    /// step before it runs job code: each in `kiln_sys::seccomp`'s wire
    /// format (a `struct sock_filter` array), base64 in JSON.
    #[serde(with = "bpf_programs")]
    pub job_filters: Vec<Vec<u8>>,
    /// Bring each room's loopback interface up.
    pub loopback: bool,
    /// Make the next room ahead, while the current one serves. `false`
    /// when the host gives each room something of its own after a reset
    /// (a networked jail's interface), which needs the room in service to
    /// be the sandbox's only one.
    #[serde(default = "yes")]
    pub spare: bool,
}

fn yes() -> bool {
    true
}

mod bpf_programs {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let b64: Vec<String> = v
            .iter()
            .map(|p| base64::engine::general_purpose::STANDARD.encode(p))
            .collect();
        b64.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let b64 = Vec::<String>::deserialize(d)?;
        b64.iter()
            .map(|p| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(p)
                    .map_err(serde::de::Error::custom)?;
                kiln_sys::seccomp::check(&bytes).map_err(serde::de::Error::custom)?;
                Ok(bytes)
            })
            .collect()
    }
}

/// Host to agent in a microVM guest, after [`HelloAck`] on every
/// connection: what is unique to this sandbox. A snapshot freezes the
/// guest's memory and its kernel command line, so every VM restored from
/// one template shares whatever travelled there, the random pool first of
/// all; this frame brings each one its own. The agent applies it before it
/// runs anything (an `Exec` before it is refused) and answers `Ack`, or
/// `Error` when a step failed (the sandbox must then not be used).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSetup {
    pub tag: u32,
    /// The sandbox's id (given to jobs as `KILN_SANDBOX_ID`).
    pub sandbox_id: String,
    pub hostname: String,
    /// Fresh random bytes, mixed into the kernel's pool and credited; the
    /// kernel's generator is then reseeded from it (at most 512 bytes).
    #[serde(with = "base64_bytes")]
    pub entropy: Vec<u8>,
    /// The host's wall clock when it sent the frame, in nanoseconds since
    /// the Unix epoch: a restored guest's clock stopped at snapshot time.
    pub clock_unix_ns: u64,
    /// Size of the work directory, `/tmp` and `/dev/shm` (tmpfs), in MiB.
    pub disk_mb: u64,
    /// Most tasks jobs may add to those running now.
    pub pids: u64,
    /// The guest's network interface, when the sandbox has a network
    /// (`allow_internet`); `None`: it has none (an air-gapped guest has no
    /// network device either). Sent with every setup, never kept in a
    /// template: a restored guest learns its address here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<GuestNetwork>,
}

/// How the guest's one network interface (`eth0`, a virtio-net device) is
/// set up: its address in a point-to-point network of the host's, the
/// default route through the host's end, and the name server for
/// `/etc/resolv.conf` (the host answers DNS sent to any address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    pub address: std::net::Ipv4Addr,
    /// The prefix length of the interface's network (e.g. 30).
    pub prefix_len: u8,
    pub gateway: std::net::Ipv4Addr,
    pub dns: std::net::Ipv4Addr,
}

/// Most bytes of [`GuestSetup::entropy`] (the kernel's `RNDADDENTROPY`
/// takes any size; 512 bytes is four times the pool).
pub const MAX_SETUP_ENTROPY_BYTES: usize = 512;

mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)?;
        if bytes.len() > super::MAX_SETUP_ENTROPY_BYTES {
            return Err(serde::de::Error::custom(format!(
                "{} bytes of entropy; at most {}",
                bytes.len(),
                super::MAX_SETUP_ENTROPY_BYTES
            )));
        }
        Ok(bytes)
    }
}

/// The agent's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub version: u32,
    /// The agent's own build version.
    pub agent: String,
    pub pid: u32,
}

/// Runs a program. Files must have been put first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub tag: ExecId,
    /// Canonical runtime name from the table sent in [`Hello`].
    pub runtime: String,
    /// Entrypoint path relative to the work directory.
    pub entrypoint: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Cap on stdout and stderr each; past it the agent kills the exec.
    pub output_limit: u64,
    /// Whether to start a fresh warm interpreter after this exec ends.
    pub warm_next: bool,
}

/// Sends `signal` to an exec's whole process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kill {
    pub tag: ExecId,
    pub signal: i32,
}

/// Agent to host: the exec's process is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub tag: ExecId,
    pub pid: u32,
    /// Whether a pre-warmed interpreter took the exec.
    pub warm: bool,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

/// Agent to host: the exec is over and all its output has been sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitReport {
    pub tag: ExecId,
    pub status: ExitStatus,
    /// Set when the agent itself ended the exec: `"output_limit"`, `"killed"`.
    pub reason: Option<String>,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub cpu_user_us: u64,
    pub cpu_system_us: u64,
    pub max_rss_kb: u64,
    pub wall_us: u64,
}

/// Writes a file under the work directory (creating parent directories).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutFile {
    pub tag: u32,
    pub mode: u32,
    pub path: String,
    pub data: Vec<u8>,
}

/// Reads a file under the work directory, up to `max_bytes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetFile {
    pub tag: u32,
    pub path: String,
    pub max_bytes: u64,
}

/// A request failed; `tag` is absent when no request is to blame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecError {
    pub tag: Option<u32>,
    pub message: String,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Hello(Hello),
    HelloAck(HelloAck),
    Exec(ExecRequest),
    /// Stdin bytes for an exec; empty data closes its stdin.
    Stdin {
        tag: ExecId,
        data: Vec<u8>,
    },
    Kill(Kill),
    Ping(u64),
    Pong(u64),
    PutFile(PutFile),
    GetFile(GetFile),
    FileData {
        tag: u32,
        data: Vec<u8>,
    },
    Ack {
        tag: u32,
    },
    /// Host to agent, between leases: kill the current room and everything
    /// in it (execs still running end without an `Exit`), make a new one and
    /// pre-warm into it again; answered with `Ack` once the old room is gone
    /// and the new one is ready, or `Error` (then the sandbox is unusable).
    Reset {
        tag: u32,
    },
    /// Host to agent in a microVM guest (see [`GuestSetup`]).
    Setup(GuestSetup),
    /// Host to agent: answer with `Ack` once every runtime the hello asked
    /// to pre-warm has a warm interpreter waiting (at once if it has
    /// already). A template is snapshotted only after this, so that its
    /// restores start warm.
    AwaitWarm {
        tag: u32,
    },
    Started(Started),
    Stdout {
        tag: ExecId,
        data: Vec<u8>,
    },
    Stderr {
        tag: ExecId,
        data: Vec<u8>,
    },
    Exit(ExitReport),
    Error(ExecError),
}

mod kind {
    pub const HELLO: u8 = 0x01;
    pub const HELLO_ACK: u8 = 0x02;
    pub const EXEC: u8 = 0x03;
    pub const STDIN: u8 = 0x04;
    pub const KILL: u8 = 0x05;
    pub const PING: u8 = 0x06;
    pub const PONG: u8 = 0x07;
    pub const PUT_FILE: u8 = 0x08;
    pub const GET_FILE: u8 = 0x09;
    pub const FILE_DATA: u8 = 0x0a;
    pub const ACK: u8 = 0x0b;
    pub const RESET: u8 = 0x0c;
    pub const SETUP: u8 = 0x0d;
    pub const AWAIT_WARM: u8 = 0x0e;
    pub const STARTED: u8 = 0x10;
    pub const STDOUT: u8 = 0x11;
    pub const STDERR: u8 = 0x12;
    pub const EXIT: u8 = 0x13;
    pub const ERROR: u8 = 0x14;
}

/// Why bytes could not be read as a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended cleanly between frames.
    #[error("the peer closed the connection")]
    Closed,
    /// The stream ended inside a frame.
    #[error("the connection ended inside a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    /// The length prefix exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    /// A zero length prefix: there is not even a kind byte.
    #[error("empty frame")]
    Empty,
    /// The kind byte names no frame of this protocol version.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// The body does not match its kind.
    #[error("malformed {kind} frame: {reason}")]
    Malformed { kind: &'static str, reason: String },
    /// Reading the stream failed.
    #[error("reading a frame failed")]
    Io(#[from] std::io::Error),
}

fn malformed(kind: &'static str, reason: impl Into<String>) -> FrameError {
    FrameError::Malformed {
        kind,
        reason: reason.into(),
    }
}

impl Frame {
    /// The frame's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::HelloAck(_) => "hello_ack",
            Frame::Exec(_) => "exec",
            Frame::Stdin { .. } => "stdin",
            Frame::Kill(_) => "kill",
            Frame::Ping(_) => "ping",
            Frame::Pong(_) => "pong",
            Frame::PutFile(_) => "put_file",
            Frame::GetFile(_) => "get_file",
            Frame::FileData { .. } => "file_data",
            Frame::Ack { .. } => "ack",
            Frame::Reset { .. } => "reset",
            Frame::Setup(_) => "setup",
            Frame::AwaitWarm { .. } => "await_warm",
            Frame::Started(_) => "started",
            Frame::Stdout { .. } => "stdout",
            Frame::Stderr { .. } => "stderr",
            Frame::Exit(_) => "exit",
            Frame::Error(_) => "error",
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let json = |out: &mut Vec<u8>, k: u8, v: &dyn erased::Json| {
            out.push(k);
            v.write(out);
        };
        match self {
            Frame::Hello(v) => json(out, kind::HELLO, v),
            Frame::HelloAck(v) => json(out, kind::HELLO_ACK, v),
            Frame::Exec(v) => json(out, kind::EXEC, v),
            Frame::Kill(v) => json(out, kind::KILL, v),
            Frame::GetFile(v) => json(out, kind::GET_FILE, v),
            Frame::Setup(v) => json(out, kind::SETUP, v),
            Frame::Started(v) => json(out, kind::STARTED, v),
            Frame::Exit(v) => json(out, kind::EXIT, v),
            Frame::Error(v) => json(out, kind::ERROR, v),
            Frame::Stdin { tag, data } => tagged(out, kind::STDIN, *tag, data),
            Frame::Stdout { tag, data } => tagged(out, kind::STDOUT, *tag, data),
            Frame::Stderr { tag, data } => tagged(out, kind::STDERR, *tag, data),
            Frame::FileData { tag, data } => tagged(out, kind::FILE_DATA, *tag, data),
            Frame::Ack { tag } => tagged(out, kind::ACK, *tag, &[]),
            Frame::Reset { tag } => tagged(out, kind::RESET, *tag, &[]),
            Frame::AwaitWarm { tag } => tagged(out, kind::AWAIT_WARM, *tag, &[]),
            Frame::Ping(n) => {
                out.push(kind::PING);
                out.extend_from_slice(&n.to_be_bytes());
            }
            Frame::Pong(n) => {
                out.push(kind::PONG);
                out.extend_from_slice(&n.to_be_bytes());
            }
            Frame::PutFile(p) => {
                out.push(kind::PUT_FILE);
                out.extend_from_slice(&p.tag.to_be_bytes());
                out.extend_from_slice(&p.mode.to_be_bytes());
                // Paths longer than u16 cannot be valid (MAX_PATH_BYTES);
                // truncating keeps the framing intact and the decoder
                // refuses the result by its length.
                let path = &p.path.as_bytes()[..p.path.len().min(u16::MAX as usize)];
                out.extend_from_slice(&(path.len() as u16).to_be_bytes());
                out.extend_from_slice(path);
                out.extend_from_slice(&p.data);
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// The encoded frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }

    /// Decodes one frame body (kind byte first, length prefix removed).
    pub fn decode_body(body: &[u8]) -> Result<Frame, FrameError> {
        let (&k, rest) = body.split_first().ok_or(FrameError::Empty)?;
        Ok(match k {
            kind::HELLO => Frame::Hello(from_json("hello", rest)?),
            kind::HELLO_ACK => Frame::HelloAck(from_json("hello_ack", rest)?),
            kind::EXEC => Frame::Exec(from_json("exec", rest)?),
            kind::KILL => Frame::Kill(from_json("kill", rest)?),
            kind::GET_FILE => Frame::GetFile(from_json("get_file", rest)?),
            kind::SETUP => Frame::Setup(from_json("setup", rest)?),
            kind::STARTED => Frame::Started(from_json("started", rest)?),
            kind::EXIT => Frame::Exit(from_json("exit", rest)?),
            kind::ERROR => Frame::Error(from_json("error", rest)?),
            kind::STDIN => {
                let (tag, data) = split_tag("stdin", rest, MAX_CHUNK_BYTES)?;
                Frame::Stdin { tag, data }
            }
            kind::STDOUT => {
                let (tag, data) = split_tag("stdout", rest, MAX_CHUNK_BYTES)?;
                Frame::Stdout { tag, data }
            }
            kind::STDERR => {
                let (tag, data) = split_tag("stderr", rest, MAX_CHUNK_BYTES)?;
                Frame::Stderr { tag, data }
            }
            kind::FILE_DATA => {
                let (tag, data) = split_tag("file_data", rest, MAX_FILE_BYTES)?;
                Frame::FileData { tag, data }
            }
            kind::ACK => {
                let (tag, data) = split_tag("ack", rest, 0)?;
                debug_assert!(data.is_empty());
                Frame::Ack { tag }
            }
            kind::RESET => {
                let (tag, _) = split_tag("reset", rest, 0)?;
                Frame::Reset { tag }
            }
            kind::AWAIT_WARM => {
                let (tag, _) = split_tag("await_warm", rest, 0)?;
                Frame::AwaitWarm { tag }
            }
            kind::PING => Frame::Ping(u64_body("ping", rest)?),
            kind::PONG => Frame::Pong(u64_body("pong", rest)?),
            kind::PUT_FILE => {
                if rest.len() < 10 {
                    return Err(malformed("put_file", "header shorter than 10 bytes"));
                }
                let tag = u32::from_be_bytes(rest[0..4].try_into().expect("4 bytes"));
                let mode = u32::from_be_bytes(rest[4..8].try_into().expect("4 bytes"));
                let plen = u16::from_be_bytes(rest[8..10].try_into().expect("2 bytes")) as usize;
                if plen == 0 || plen > MAX_PATH_BYTES || rest.len() < 10 + plen {
                    return Err(malformed("put_file", format!("bad path length {plen}")));
                }
                let path = std::str::from_utf8(&rest[10..10 + plen])
                    .map_err(|_| malformed("put_file", "path is not UTF-8"))?
                    .to_owned();
                let data = rest[10 + plen..].to_vec();
                if data.len() > MAX_FILE_BYTES {
                    return Err(malformed("put_file", "file larger than the limit"));
                }
                Frame::PutFile(PutFile {
                    tag,
                    mode,
                    path,
                    data,
                })
            }
            other => return Err(FrameError::UnknownKind(other)),
        })
    }
}

fn tagged(out: &mut Vec<u8>, k: u8, tag: u32, data: &[u8]) {
    out.push(k);
    out.extend_from_slice(&tag.to_be_bytes());
    out.extend_from_slice(data);
}

fn split_tag(kind: &'static str, rest: &[u8], max: usize) -> Result<(u32, Vec<u8>), FrameError> {
    if rest.len() < 4 {
        return Err(malformed(kind, "missing 4-byte tag"));
    }
    let data = &rest[4..];
    if data.len() > max {
        return Err(malformed(
            kind,
            format!("{} bytes of data; at most {max}", data.len()),
        ));
    }
    let tag = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes"));
    Ok((tag, data.to_vec()))
}

fn u64_body(kind: &'static str, rest: &[u8]) -> Result<u64, FrameError> {
    let arr: [u8; 8] = rest
        .try_into()
        .map_err(|_| malformed(kind, format!("body of {} bytes; want 8", rest.len())))?;
    Ok(u64::from_be_bytes(arr))
}

fn from_json<T: for<'de> Deserialize<'de>>(
    kind: &'static str,
    body: &[u8],
) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| malformed(kind, e.to_string()))
}

/// Object-safe JSON writing, so `encode_into` can treat control frames alike.
mod erased {
    pub trait Json {
        fn write(&self, out: &mut Vec<u8>);
    }
    impl<T: serde::Serialize> Json for T {
        fn write(&self, out: &mut Vec<u8>) {
            // Serializing these plain structs into a Vec cannot fail: no map
            // has non-string keys and no Serialize impl returns an error.
            serde_json::to_writer(out, self).expect("control frames serialize");
        }
    }
}

/// Incremental frame decoder over any byte source.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the undecoded bytes in `buf`: consumed frames are skipped,
    /// not shifted out one by one (which is quadratic in frames per read).
    start: usize,
    max: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_BYTES)
    }
}

impl Decoder {
    /// A decoder refusing frames longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max,
        }
    }

    /// Adds bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that do not yet form a frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. An
    /// oversized length prefix is an error as soon as it is seen, before the
    /// body is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let buf = &self.buf[self.start..];
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = Frame::decode_body(&buf[4..4 + len]);
        self.start += 4 + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        frame.map(Some)
    }

    /// Call at end of stream: `Closed` if it ended between frames.
    pub fn finish(&self) -> FrameError {
        let buf = &self.buf[self.start..];
        if buf.is_empty() {
            FrameError::Closed
        } else {
            let want = if buf.len() >= 4 {
                4 + u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize
            } else {
                4
            };
            FrameError::Truncated {
                got: buf.len(),
                want,
            }
        }
    }
}

/// Reads exactly one frame from a blocking reader.
pub fn read_frame<R: Read>(r: &mut R, max: usize) -> Result<Frame, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Truncated { got, want: 4 }),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match r.read(&mut body[got..]) {
            Ok(0) => {
                return Err(FrameError::Truncated {
                    got: got + 4,
                    want: len + 4,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Frame::decode_body(&body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                runtimes: RuntimeTable::default(),
                warm: vec!["python".into()],
                workdir: "/work".into(),
                uid: 1000,
                gid: 1000,
                rooms: None,
            }),
            Frame::Hello(Hello {
                version: 2,
                runtimes: RuntimeTable::default(),
                warm: vec![],
                workdir: "/work".into(),
                uid: 1000,
                gid: 1000,
                rooms: Some(Rooms {
                    disk_mb: 64,
                    job_filters: vec![vec![6, 0, 0, 0, 0, 0, 0xff, 0x7f]],
                    loopback: true,
                    spare: true,
                }),
            }),
            Frame::HelloAck(HelloAck {
                version: 1,
                agent: "0.1.0".into(),
                pid: 1,
            }),
            Frame::Exec(ExecRequest {
                tag: 7,
                runtime: "python".into(),
                entrypoint: "main.py".into(),
                args: vec!["a".into()],
                env: [("K".to_string(), "V".to_string())].into(),
                output_limit: 10,
                warm_next: true,
            }),
            Frame::Stdin {
                tag: 7,
                data: b"in".to_vec(),
            },
            Frame::Kill(Kill { tag: 7, signal: 9 }),
            Frame::Ping(42),
            Frame::Pong(42),
            Frame::PutFile(PutFile {
                tag: 1,
                mode: 0o644,
                path: "a/b".into(),
                data: vec![0, 255],
            }),
            Frame::GetFile(GetFile {
                tag: 2,
                path: "a/b".into(),
                max_bytes: 5,
            }),
            Frame::FileData {
                tag: 2,
                data: vec![1],
            },
            Frame::Ack { tag: 1 },
            Frame::Reset { tag: 3 },
            Frame::AwaitWarm { tag: 5 },
            Frame::Setup(GuestSetup {
                tag: 4,
                sandbox_id: "0123456789abcdef".into(),
                hostname: "kiln-0123456789abcdef".into(),
                entropy: vec![0, 1, 254, 255],
                clock_unix_ns: 1_765_000_000_000_000_000,
                disk_mb: 64,
                pids: 256,
                network: Some(GuestNetwork {
                    address: std::net::Ipv4Addr::new(10, 213, 0, 2),
                    prefix_len: 30,
                    gateway: std::net::Ipv4Addr::new(10, 213, 0, 1),
                    dns: std::net::Ipv4Addr::new(10, 213, 0, 1),
                }),
            }),
            Frame::Started(Started {
                tag: 7,
                pid: 3,
                warm: true,
            }),
            Frame::Stdout {
                tag: 7,
                data: b"out".to_vec(),
            },
            Frame::Stderr {
                tag: 7,
                data: vec![],
            },
            Frame::Exit(ExitReport {
                tag: 7,
                status: ExitStatus::Signal(9),
                reason: Some("killed".into()),
                stdout_bytes: 3,
                stderr_bytes: 0,
                stdout_truncated: false,
                stderr_truncated: true,
                cpu_user_us: 1,
                cpu_system_us: 2,
                max_rss_kb: 3,
                wall_us: 4,
            }),
            Frame::Error(ExecError {
                tag: None,
                message: "x".into(),
            }),
        ]
    }

    #[test]
    fn every_frame_round_trips_through_the_decoder() {
        let mut d = Decoder::default();
        let mut all = Vec::new();
        for f in samples() {
            f.encode_into(&mut all);
        }
        // Byte at a time: the decoder must cope with any split.
        let mut out = Vec::new();
        for b in all {
            d.extend(&[b]);
            while let Some(f) = d.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, samples());
        assert!(matches!(d.finish(), FrameError::Closed));
    }

    #[test]
    fn blocking_reader_round_trips_and_reports_truncation() {
        let bytes = Frame::Ping(9).encode();
        assert_eq!(
            read_frame(&mut &bytes[..], MAX_FRAME_BYTES).unwrap(),
            Frame::Ping(9)
        );
        let err = read_frame(&mut &bytes[..6], MAX_FRAME_BYTES).unwrap_err();
        assert!(matches!(err, FrameError::Truncated { .. }), "{err}");
        assert!(matches!(
            read_frame(&mut &[][..], 10).unwrap_err(),
            FrameError::Closed
        ));
    }

    #[test]
    fn a_hello_whose_seccomp_program_is_not_whole_instructions_is_refused() {
        let mut body = vec![kind::HELLO];
        let mut hello = serde_json::to_value(match &samples()[1] {
            Frame::Hello(h) => h.clone(),
            _ => unreachable!("the second sample is a hello with rooms"),
        })
        .unwrap();
        hello["rooms"]["job_filters"] = serde_json::json!(["AAAA"]);
        serde_json::to_writer(&mut body, &hello).unwrap();
        let e = Frame::decode_body(&body).unwrap_err().to_string();
        assert!(e.contains("8-byte instructions"), "{e}");
    }

    #[test]
    fn a_setup_with_too_much_entropy_is_refused() {
        let mut setup = serde_json::to_value(samples().iter().find_map(|f| match f {
            Frame::Setup(s) => Some(s.clone()),
            _ => None,
        }))
        .unwrap();
        use base64::Engine as _;
        setup["entropy"] = base64::engine::general_purpose::STANDARD
            .encode([7u8; MAX_SETUP_ENTROPY_BYTES + 1])
            .into();
        let mut body = vec![kind::SETUP];
        serde_json::to_writer(&mut body, &setup).unwrap();
        let e = Frame::decode_body(&body).unwrap_err().to_string();
        assert!(e.contains("at most 512"), "{e}");
    }

    #[test]
    fn oversized_prefix_is_refused_before_buffering() {
        let mut d = Decoder::new(100);
        d.extend(&1000u32.to_be_bytes());
        assert!(matches!(
            d.next_frame(),
            Err(FrameError::TooLarge {
                len: 1000,
                max: 100
            })
        ));
    }

    #[test]
    fn unknown_kind_and_bad_bodies_are_typed_errors() {
        assert!(matches!(
            Frame::decode_body(&[0x7f]),
            Err(FrameError::UnknownKind(0x7f))
        ));
        assert!(matches!(Frame::decode_body(&[]), Err(FrameError::Empty)));
        assert!(matches!(
            Frame::decode_body(&[kind::EXEC, b'{']),
            Err(FrameError::Malformed { kind: "exec", .. })
        ));
        assert!(matches!(
            Frame::decode_body(&[kind::PING, 1, 2]),
            Err(FrameError::Malformed { kind: "ping", .. })
        ));
        let mut big = vec![kind::STDOUT, 0, 0, 0, 1];
        big.resize(5 + MAX_CHUNK_BYTES + 1, b'x');
        assert!(matches!(
            Frame::decode_body(&big),
            Err(FrameError::Malformed { kind: "stdout", .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Arbitrary bytes never panic the decoder and never make it hold
        /// more than one maximal frame.
        #[test]
        fn decoder_never_panics_on_garbage(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..32)) {
            let mut d = Decoder::new(1024);
            for c in chunks {
                d.extend(&c);
                loop {
                    match d.next_frame() {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(_) => return Ok(()),
                    }
                }
                prop_assert!(d.pending() <= 4 + 1024 + 64);
            }
        }

        /// Any body after a valid kind byte decodes or errs, never panics.
        #[test]
        fn any_body_of_any_kind_is_handled(k in 0u8..0x20, body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut b = vec![k];
            b.extend(body);
            let _ = Frame::decode_body(&b);
        }

        /// Data frames round-trip with arbitrary payloads and tags.
        #[test]
        fn data_frames_round_trip(tag in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            for f in [Frame::Stdout { tag, data: data.clone() }, Frame::Stdin { tag, data: data.clone() }] {
                let enc = f.encode();
                prop_assert_eq!(Frame::decode_body(&enc[4..]).unwrap(), f);
            }
        }
    }
}

//! A host for tests: runs the real `kiln-agent` binary as a child with one
//! end of a socketpair as its fd 3, and speaks the protocol to it. Every
//! read has a timeout, so a misbehaving agent fails a test instead of
//! hanging it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kiln_protocol::limits::MAX_FRAME_BYTES;
use kiln_protocol::{
    read_frame, ExecRequest, ExitReport, Frame, FrameError, Hello, HelloAck, RuntimeTable,
    PROTOCOL_VERSION,
};

/// The unprivileged user jobs run as in these tests.
pub const NOBODY: u32 = 65534;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh, empty directory under /tmp (or elsewhere), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        Self::new_in(&std::env::temp_dir(), name)
    }

    pub fn new_in(parent: &Path, name: &str) -> Self {
        let p = parent.join(format!(
            "kiln-agent-test-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Everything an exec produced.
#[derive(Debug)]
pub struct Run {
    pub warm: bool,
    pub pid: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: ExitReport,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

pub struct Host {
    pub child: Child,
    pub sock: UnixStream,
    pub workdir: TempDir,
    /// Frames read while waiting for something else.
    pub backlog: Vec<Frame>,
    next_tag: u32,
}

/// VmRSS of a process in KiB (0 if it is gone).
pub fn vm_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The direct children of a process.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

pub fn exec_request(tag: u32, runtime: &str, entry: &str) -> ExecRequest {
    ExecRequest {
        tag,
        runtime: runtime.into(),
        entrypoint: entry.into(),
        args: vec![],
        env: BTreeMap::new(),
        output_limit: 1 << 20,
        warm_next: false,
    }
}

impl Host {
    /// Starts the agent binary on a socketpair.
    pub fn start() -> Self {
        Self::start_with_env(&[])
    }

    pub fn start_with_env(env: &[(&str, &str)]) -> Self {
        Self::start_binary(Path::new(env!("CARGO_BIN_EXE_kiln-agent")), env)
    }

    /// Starts `agent` (another build of the agent, for measurements that
    /// compare builds).
    pub fn start_binary(agent: &Path, env: &[(&str, &str)]) -> Self {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(agent);
        cmd.args(["--fd", "3"])
            .stdin(Stdio::null())
            .envs(env.iter().copied());
        // SAFETY: dup2 is async-signal-safe; it clears close-on-exec on 3.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(theirs);
        ours.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Self {
            child,
            sock: ours,
            workdir: TempDir::new("work"),
            backlog: Vec::new(),
            next_tag: 1,
        }
    }

    pub fn tag(&mut self) -> u32 {
        self.next_tag += 1;
        self.next_tag
    }

    /// The tag most recently handed out.
    pub fn last_tag(&self) -> u32 {
        self.next_tag
    }

    pub fn send(&mut self, f: &Frame) {
        self.sock.write_all(&f.encode()).unwrap();
    }

    pub fn recv(&mut self) -> Frame {
        self.try_recv().unwrap()
    }

    pub fn try_recv(&mut self) -> Result<Frame, FrameError> {
        if !self.backlog.is_empty() {
            return Ok(self.backlog.remove(0));
        }
        read_frame(&mut self.sock, MAX_FRAME_BYTES)
    }

    pub fn hello_frame(&self, warm: &[&str]) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            runtimes: RuntimeTable::default(),
            warm: warm.iter().map(|s| s.to_string()).collect(),
            workdir: self.workdir.path().to_str().unwrap().to_owned(),
            uid: NOBODY,
            gid: NOBODY,
            rooms: None,
        }
    }

    /// A Hello asking for rooms (no job filters unless given), with the
    /// work directory at `room_workdir`, which must not lie in /tmp: every
    /// room mounts its own /tmp.
    pub fn rooms_hello_frame(
        &self,
        runtimes: RuntimeTable,
        warm: &[&str],
        room_workdir: &Path,
        job_filters: Vec<Vec<u8>>,
    ) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            runtimes,
            warm: warm.iter().map(|s| s.to_string()).collect(),
            workdir: room_workdir.to_str().unwrap().to_owned(),
            uid: NOBODY,
            gid: NOBODY,
            rooms: Some(kiln_protocol::Rooms {
                disk_mb: 16,
                job_filters,
                loopback: true,
                spare: true,
            }),
        }
    }

    /// Sends `Reset` and waits for its answer (Ack, or the Error).
    pub fn reset(&mut self) -> Frame {
        let tag = self.tag();
        self.send(&Frame::Reset { tag });
        self.answer_to(tag)
    }

    pub fn hello(&mut self, warm: &[&str]) -> HelloAck {
        let h = self.hello_frame(warm);
        self.send(&Frame::Hello(h));
        match self.recv() {
            Frame::HelloAck(a) => a,
            other => panic!("expected hello_ack, got {other:?}"),
        }
    }

    /// Puts a file and expects the Ack.
    pub fn put(&mut self, path: &str, mode: u32, data: &[u8]) {
        let r = self.put_raw(path, mode, data);
        assert!(matches!(r, Frame::Ack { .. }), "put {path}: {r:?}");
    }

    pub fn put_raw(&mut self, path: &str, mode: u32, data: &[u8]) -> Frame {
        let tag = self.tag();
        self.send(&Frame::PutFile(kiln_protocol::PutFile {
            tag,
            mode,
            path: path.into(),
            data: data.into(),
        }));
        self.answer_to(tag)
    }

    pub fn get_raw(&mut self, path: &str, max_bytes: u64) -> Frame {
        let tag = self.tag();
        self.send(&Frame::GetFile(kiln_protocol::GetFile {
            tag,
            path: path.into(),
            max_bytes,
        }));
        self.answer_to(tag)
    }

    /// The next frame tagged `tag` (Ack, FileData or Error); others wait in
    /// the backlog.
    pub fn answer_to(&mut self, tag: u32) -> Frame {
        let mut held = Vec::new();
        loop {
            let f = self.recv();
            let mine = match &f {
                Frame::Ack { tag: t } | Frame::FileData { tag: t, .. } => *t == tag,
                Frame::Error(e) => e.tag == Some(tag),
                Frame::Started(s) => s.tag == tag,
                _ => false,
            };
            if mine {
                held.append(&mut self.backlog);
                self.backlog = held;
                return f;
            }
            held.push(f);
        }
    }

    /// Sends `req` and the given stdin, then collects everything up to the
    /// exec's Exit.
    pub fn run(&mut self, req: ExecRequest, stdin: Option<&[u8]>) -> Run {
        let tag = req.tag;
        self.send(&Frame::Exec(req));
        let (warm, pid) = match self.answer_to(tag) {
            Frame::Started(s) => (s.warm, s.pid),
            other => panic!("expected started, got {other:?}"),
        };
        if let Some(data) = stdin {
            for chunk in data.chunks(kiln_protocol::limits::MAX_CHUNK_BYTES) {
                self.send(&Frame::Stdin {
                    tag,
                    data: chunk.to_vec(),
                });
            }
            self.send(&Frame::Stdin { tag, data: vec![] });
        }
        self.collect(tag, warm, pid)
    }

    pub fn collect(&mut self, tag: u32, warm: bool, pid: u32) -> Run {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut held = Vec::new();
        loop {
            match self.recv() {
                Frame::Stdout { tag: t, data } if t == tag => stdout.extend(data),
                Frame::Stderr { tag: t, data } if t == tag => stderr.extend(data),
                Frame::Exit(exit) if exit.tag == tag => {
                    held.append(&mut self.backlog);
                    self.backlog = held;
                    return Run {
                        warm,
                        pid,
                        stdout,
                        stderr,
                        exit,
                    };
                }
                other => held.push(other),
            }
        }
    }

    /// Waits (bounded) for the agent to exit and returns its status code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("agent did not exit within {within:?}");
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether process `pid` has died, waiting up to `within`. A zombie counts
/// as dead only if `zombie_ok` (its reaper is not the agent).
pub fn process_gone(pid: u32, within: Duration, zombie_ok: bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(s) => {
                // State is the field after the parenthesised command.
                let state = s
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next());
                if zombie_ok && (state == Some("Z") || state == Some("X")) {
                    return true;
                }
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

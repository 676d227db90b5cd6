//! A `kiln serve` under test and a small blocking HTTP/1.1 client for it.
//!
//! Each [`Server`] runs in its own [`Scope`] (state directory and parent
//! cgroup), binds 127.0.0.1 on a port the kernel picks, and is killed (by
//! its pid, never by name) and reaped when dropped. The client speaks plain
//! HTTP/1.1 over `std::net` (one connection per request, `Connection:
//! close`, chunked bodies decoded), so tests see exactly the bytes on the
//! wire and can read event streams incrementally.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{bin, Scope};

/// A running `kiln serve`.
pub struct Server {
    pub scope: Scope,
    pub addr: SocketAddr,
    /// Sent as `Authorization: Bearer` by the request helpers when set.
    pub token: Option<String>,
    child: Option<Child>,
}

impl Server {
    /// Starts `kiln serve` in a fresh scope named `test` with `args` added.
    pub fn start(test: &str, args: &[&str]) -> Self {
        Self::start_in(Scope::new(test), args)
    }

    /// Starts `kiln serve` in `scope`; waits until it listens.
    pub fn start_in(scope: Scope, args: &[&str]) -> Self {
        let command = Self::command(&scope, args);
        Self::start_command(scope, command)
    }

    /// Starts `command` (made by [`Server::command`] for `scope`, then
    /// changed by the test); waits until it listens.
    pub fn start_command(scope: Scope, mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning kiln serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading kiln serve's first line");
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| {
                let _ = child.kill();
                let _ = child.wait();
                panic!("kiln serve did not start (first line {line:?})")
            })
            .parse()
            .expect("a socket address");
        Self {
            scope,
            addr,
            token: None,
            child: Some(child),
        }
    }

    /// The `kiln serve` command for `scope` (bind 127.0.0.1:0, the scope's
    /// state dir and cgroup parent) plus `args`.
    pub fn command(scope: &Scope, args: &[&str]) -> Command {
        let mut c = Command::new(bin("kiln"));
        c.arg("serve")
            .arg("--bind")
            .arg("127.0.0.1:0")
            .arg("--state-dir")
            .arg(&scope.state_dir)
            .arg("--cgroup-parent")
            .arg(&scope.cgroup_parent)
            .args(args)
            .env_remove("KILN_CONFIG")
            .env_remove("KILN_TOKEN")
            .stdin(Stdio::null());
        c
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends a request and reads the whole answer.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        self.request_with(method, path, &[], body)
    }

    /// Like [`Server::request`] with extra headers.
    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        let mut s = self.open(method, path, headers, body);
        let mut buf = Vec::new();
        s.body.read_to_end(&mut buf).expect("reading the body");
        Response {
            status: s.status,
            headers: s.headers,
            body: buf,
        }
    }

    /// Sends JSON, answers status and JSON (`Null` for an empty body).
    pub fn json(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let r = self.request(method, path, Some(body.to_string().as_bytes()));
        (r.status, r.json())
    }

    /// Sends a request and returns as soon as the head arrived; the body is
    /// read incrementally (event streams).
    pub fn open(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Streaming {
        let mut h: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(t) = &self.token {
            if !h
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            {
                h.push(("Authorization".into(), format!("Bearer {t}")));
            }
        }
        raw_request(self.addr, method, path, &h, body)
    }

    /// Sends SIGTERM and waits (at most `within`) for the exit.
    pub fn term(&mut self, within: Duration) -> ExitStatus {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        self.wait(within)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.child = None;
    }

    /// Waits for the exit, killing the server if it takes longer than `within`.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let c = self.child.as_mut().expect("the server was started");
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = c.try_wait().expect("waiting for kiln serve") {
                self.child = None;
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                self.child = None;
                panic!("kiln serve did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `leftovers()` until it is empty or `within` passes.
    pub fn wait_clean(&self, within: Duration) -> Vec<std::path::PathBuf> {
        crate::wait_empty(within, || self.scope.leftovers())
    }

    /// `kiln reap` for this server's scope.
    pub fn reap(scope: &Scope) {
        let _ = Command::new(bin("kiln"))
            .arg("reap")
            .arg("--state-dir")
            .arg(&scope.state_dir)
            .arg("--cgroup-parent")
            .arg(&scope.cgroup_parent)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill();
        }
        Self::reap(&self.scope);
    }
}

/// A whole answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The body as JSON (`Null` when empty); panics on anything else.
    pub fn json(&self) -> Value {
        if self.body.is_empty() {
            return Value::Null;
        }
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// An answer whose body is still arriving.
pub struct Streaming {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Box<dyn Read + Send>,
}

impl Streaming {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// POSTs `body` as JSON on a fresh connection (for threads that hold only
/// the address) and answers the status and the body as text.
pub fn post_json(addr: SocketAddr, path: &str, body: &Value) -> (u16, String) {
    let headers = [("Content-Type".to_owned(), "application/json".to_owned())];
    let mut r = raw_request(
        addr,
        "POST",
        path,
        &headers,
        Some(body.to_string().as_bytes()),
    );
    let mut text = String::new();
    r.body.read_to_string(&mut text).expect("reading the body");
    (r.status, text)
}

/// One HTTP/1.1 request on a fresh connection.
pub fn raw_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) -> Streaming {
    let mut s = TcpStream::connect(addr).expect("connecting to kiln serve");
    s.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
        .expect("sending the request head");
    if let Some(b) = body {
        // The server may answer (413) and close before reading it all.
        let _ = s.write_all(b);
    }
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("reading the status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).expect("reading a header");
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let chunked = header(&headers, "transfer-encoding").is_some_and(|v| v.contains("chunked"));
    let len = header(&headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    let body: Box<dyn Read + Send> = if chunked {
        Box::new(Chunked {
            r,
            left: 0,
            done: false,
        })
    } else if let Some(n) = len {
        Box::new(r.take(n))
    } else {
        Box::new(r)
    };
    Streaming {
        status,
        headers,
        body,
    }
}

/// Decodes `Transfer-Encoding: chunked`.
struct Chunked<R> {
    r: BufReader<R>,
    left: usize,
    done: bool,
}

impl<R: Read> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut l = String::new();
            self.r.read_line(&mut l)?;
            let size = usize::from_str_radix(l.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size line {l:?}")))?;
            if size == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = size;
        }
        let want = buf.len().min(self.left);
        let n = self.r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n;
        if self.left == 0 {
            let mut crlf = String::new();
            self.r.read_line(&mut crlf)?;
        }
        Ok(n)
    }
}

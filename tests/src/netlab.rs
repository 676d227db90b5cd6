//! A test-made "internet" for network tests: a network namespace that
//! stands for the host side of Kiln's sandboxes (their interfaces, Kiln's
//! table and resolver live there, never in the machine's own namespace),
//! and one holding an HTTP server on three addresses and a DNS zone,
//! routed from the host side. No packet leaves the machine. Both
//! namespaces go when the [`World`] is dropped.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Command;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};

/// The test internet: its DNS server and web server's addresses.
pub const DNS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const WEB_ALLOWED_BY_NAME: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const WEB_DENIED: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
pub const WEB_ALLOWED_BY_NETWORK: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
/// The host side's address towards the test internet.
pub const HOST_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const BODY: &str = "kiln-test-internet";

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a new thread inside the named network namespace.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = File::open(format!("/run/netns/{name}")).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns on an open namespace file, for this thread only.
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0);
        f()
    })
}

/// The two namespaces; deleted on drop.
pub struct World {
    pub host: String,
    pub inet: String,
}

impl World {
    pub fn new(tag: &str) -> Self {
        let host = format!("kt{}{tag}h", std::process::id());
        let inet = format!("kt{}{tag}i", std::process::id());
        ip(&["netns", "add", &host]);
        ip(&["netns", "add", &inet]);
        let w = Self { host, inet };
        ip(&[
            "-n", &w.host, "link", "add", "up0", "type", "veth", "peer", "name", "down0", "netns",
            &w.inet,
        ]);
        ip(&[
            "-n",
            &w.host,
            "addr",
            "add",
            &format!("{HOST_SIDE}/24"),
            "dev",
            "up0",
        ]);
        ip(&["-n", &w.host, "link", "set", "up0", "up"]);
        ip(&["-n", &w.host, "link", "set", "lo", "up"]);
        for a in [WEB_ALLOWED_BY_NAME, WEB_DENIED, WEB_ALLOWED_BY_NETWORK] {
            ip(&[
                "-n",
                &w.inet,
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                "down0",
            ]);
        }
        ip(&["-n", &w.inet, "link", "set", "down0", "up"]);
        ip(&["-n", &w.inet, "link", "set", "lo", "up"]);
        // The web server, on every address of the test internet.
        let web = in_netns(&w.inet, || TcpListener::bind("0.0.0.0:80").unwrap())
            .join()
            .unwrap();
        std::thread::spawn(move || {
            for mut c in web.incoming().flatten() {
                let mut buf = [0u8; 512];
                let _ = c.read(&mut buf);
                let _ = c.write_all(BODY.as_bytes());
            }
        });
        // Bulk bytes: port 81 sends as many as the first line asks for,
        // port 82 swallows everything and answers how much it got.
        let source = in_netns(&w.inet, || TcpListener::bind("0.0.0.0:81").unwrap())
            .join()
            .unwrap();
        std::thread::spawn(move || {
            for c in source.incoming().flatten() {
                std::thread::spawn(move || send_bulk(c));
            }
        });
        let sink = in_netns(&w.inet, || TcpListener::bind("0.0.0.0:82").unwrap())
            .join()
            .unwrap();
        std::thread::spawn(move || {
            for mut c in sink.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    let mut n = 0u64;
                    while let Ok(k) = c.read(&mut buf) {
                        if k == 0 {
                            break;
                        }
                        n += k as u64;
                    }
                    let _ = c.write_all(n.to_string().as_bytes());
                });
            }
        });
        // The DNS zone: every name under .test, by its first label.
        let dns = in_netns(&w.inet, || UdpSocket::bind((DNS, 53)).unwrap())
            .join()
            .unwrap();
        std::thread::spawn(move || serve_zone(&dns));
        // A service of the host side that no sandbox may reach.
        let host_service = in_netns(&w.host, || TcpListener::bind("0.0.0.0:8080").unwrap())
            .join()
            .unwrap();
        std::thread::spawn(move || {
            for mut c in host_service.incoming().flatten() {
                let _ = c.write_all(b"host-secret");
            }
        });
        w
    }

    pub fn host_ns(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.host))
    }

    /// What Kiln has in the host side: its links (veth ends and taps
    /// `kn*`, a tap's shaper `kb*`) and its table.
    pub fn host_links(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.host, "-o", "link", "show"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_owned())
            .filter(|n| n.starts_with("kn") || n.starts_with("kb"))
            .collect()
    }

    /// Makes `c` start in the host side's network namespace.
    pub fn in_host_side(&self, c: &mut Command) {
        let ns = File::open(self.host_ns()).unwrap();
        // SAFETY: setns is async-signal-safe; the descriptor is open in
        // the parent until the spawn returns (the closure owns it).
        unsafe {
            c.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// `kiln serve` in the host side, its API on every address there,
    /// with `[network] enabled` on a pool of its own, the test internet's
    /// DNS upstream, `allowed.test` and [`WEB_ALLOWED_BY_NETWORK`] allowed
    /// by default; `config` is added to that file and `args` to the
    /// command line.
    pub fn serve(&self, scope: crate::Scope, config: &str, args: &[&str]) -> crate::server::Server {
        let path = scope.state_dir.join("kiln.toml");
        std::fs::write(
            &path,
            format!(
                "[network]\nenabled = true\npool = \"10.213.0.0/24\"\nupstream_dns = [\"{DNS}:53\"]\nallow = [\"allowed.test\", \"{WEB_ALLOWED_BY_NETWORK}/32\"]\n\n{config}"
            ),
        )
        .unwrap();
        let mut c = Command::new(crate::bin("kiln"));
        c.arg("serve")
            .arg("--config")
            .arg(&path)
            .args(args)
            .args(["--bind", "0.0.0.0:0", "--min-idle", "0", "--state-dir"])
            .arg(&scope.state_dir)
            .arg("--cgroup-parent")
            .arg(&scope.cgroup_parent)
            .env_remove("KILN_CONFIG")
            .env_remove("KILN_TOKEN")
            .stdin(std::process::Stdio::null());
        self.in_host_side(&mut c);
        crate::server::Server::start_command(scope, c)
    }

    /// A JSON call to `s` from the host side.
    pub fn call(
        &self,
        s: &crate::server::Server,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        within(&self.host, || s.json(method, path, &body))
    }

    /// A workspace of `body` made through `s`'s API; its id.
    pub fn create(&self, s: &crate::server::Server, body: serde_json::Value) -> String {
        let (st, v) = self.call(s, "POST", "/v1/sandboxes", body);
        assert_eq!(st, 201, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }

    /// Destroys workspace `id` through `s`'s API.
    pub fn delete(&self, s: &crate::server::Server, id: &str) {
        let (st, v) = self.call(
            s,
            "DELETE",
            &format!("/v1/sandboxes/{id}"),
            serde_json::Value::Null,
        );
        assert_eq!(st, 204, "{v}");
    }

    /// Workspace `id`'s network as `GET /v1/sandboxes/{id}/egress` tells it.
    pub fn egress(&self, s: &crate::server::Server, id: &str) -> serde_json::Value {
        let (st, net) = self.call(
            s,
            "GET",
            &format!("/v1/sandboxes/{id}/egress"),
            serde_json::Value::Null,
        );
        assert_eq!(st, 200, "{net}");
        net
    }

    /// Workspace `id`'s address on its network.
    pub fn address(&self, s: &crate::server::Server, id: &str) -> Ipv4Addr {
        self.egress(s, id)["address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn table(&self) -> String {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.host, "nft", "list", "table", "inet", "kiln",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.host])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.inet])
            .status();
    }
}

/// Port 81: reads a decimal byte count and a newline, sends that many.
fn send_bulk(mut c: std::net::TcpStream) {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while c.read(&mut b).is_ok_and(|k| k == 1) && b[0] != b'\n' && line.len() < 20 {
        line.push(b[0]);
    }
    let Ok(mut left) = String::from_utf8_lossy(&line).trim().parse::<u64>() else {
        return;
    };
    let chunk = vec![b'k'; 1 << 16];
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        if c.write_all(&chunk[..k]).is_err() {
            return;
        }
        left -= k as u64;
    }
}

/// A job that moves bytes through the test internet's port 81 (down) and
/// 82 (up); stdin is `down <host> <bytes>` or `up <host> <bytes>` lines,
/// each answered `<bytes> <seconds>`, measured inside the sandbox.
pub const BULK: &str = r#"
import socket, sys, time
for line in sys.stdin.read().split("\n"):
    if not line:
        continue
    way, host, n = line.split()
    n = int(n)
    if way == "down":
        s = socket.create_connection((host, 81))
        t = time.monotonic()
        s.sendall(b"%d\n" % n)
        got = 0
        while True:
            b = s.recv(1 << 16)
            if not b:
                break
            got += len(b)
        print(got, time.monotonic() - t)
    else:
        s = socket.create_connection((host, 82))
        buf = b"u" * 65536
        t = time.monotonic()
        sent = 0
        while sent < n:
            s.sendall(buf)
            sent += len(buf)
        s.shutdown(socket.SHUT_WR)
        got = int(s.recv(100))
        print(got, time.monotonic() - t)
"#;

fn serve_zone(socket: &UdpSocket) {
    let mut buf = [0u8; 1500];
    while let Ok((n, from)) = socket.recv_from(&mut buf) {
        let Ok(q) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let mut r = Message::response(q.metadata.id, q.metadata.op_code);
        r.metadata.message_type = MessageType::Response;
        r.add_queries(q.queries.iter().cloned());
        if let Some(query) = q.queries.first() {
            let name = query.name().to_ascii().to_ascii_lowercase();
            let addr = match name.split('.').next() {
                Some("allowed" | "www") => Some(WEB_ALLOWED_BY_NAME),
                Some("denied") => Some(WEB_DENIED),
                _ => None,
            };
            match addr {
                Some(a) if query.query_type() == hickory_proto::rr::RecordType::A => {
                    r.add_answer(Record::from_rdata(query.name().clone(), 30, RData::A(A(a))));
                }
                Some(_) => {}
                None => r.metadata.response_code = ResponseCode::NXDomain,
            }
        }
        let _ = socket.send_to(&r.to_vec().unwrap(), from);
    }
}

/// Runs `f` on a thread inside the named network namespace and returns
/// its result (for talking to a server that listens there).
pub fn within<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let ns = File::open(format!("/run/netns/{name}")).unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on an open namespace file, for this thread only.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0);
            f()
        })
        .join()
        .unwrap()
    })
}

/// The answer to each of the probe's `lines` in its `stdout`, in order
/// (every line must have one).
pub fn answers(stdout: &str, lines: &[String]) -> Vec<String> {
    let got: Vec<String> = stdout
        .lines()
        .zip(lines)
        .map(|(l, q)| {
            l.strip_prefix(q.as_str())
                .unwrap_or_else(|| panic!("{l:?} answers {q:?}"))
                .trim()
                .to_owned()
        })
        .collect();
    assert_eq!(got.len(), lines.len(), "{stdout}");
    got
}

/// The probe's answer to a `tcp` line the test internet's web server
/// answered.
pub fn ok() -> String {
    format!("ok:{BODY}")
}

/// A job's probe: each line `what result`, the result `ok:<body>`, or
/// the kind of failure (`errno name`, `dns:<gaierror>`, `rcode:<n>`).
pub const PROBE: &str = r#"
import errno, socket, sys
def tcp(host, port=80):
    try:
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = s.recv(100).decode()
        s.close()
        return "ok:" + data
    except socket.gaierror as e:
        return "dns:" + str(e.errno)
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def query(name, server):
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\x00\x00\x01\x00\x01"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(10)
    try:
        s.sendto(q, (server, 53))
        r = s.recv(512)
        return "rcode:%d answers:%d" % (r[3] & 15, (r[6] << 8) | r[7])
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
for line in sys.stdin.read().split("\n"):
    if not line:
        continue
    kind, arg = line.split(" ", 1)
    if kind == "tcp":
        host, port = arg.split(":")
        print(line, tcp(host, int(port)))
    else:
        name, server = arg.split("@")
        print(line, query(name, server))
"#;

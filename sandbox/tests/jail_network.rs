//! Networks of jails against a test-made "internet": a network namespace
//! standing for the host side (Kiln's interfaces, table and resolver live
//! there, never in the machine's own), and one holding an HTTP server on
//! three addresses and a DNS zone, routed from the host side. No packet
//! leaves the machine. Shows: air-gapped fails at once for connects and
//! names; allowed names and networks work, denied ones do not; talking to
//! a DNS server directly gains nothing; nothing of the host side answers;
//! a reset gives a new namespace its own interface; destroying (or a
//! crashed owner, reaped by the next one) leaves no interface, rule or
//! slot. Needs root, iproute2, nftables and conntrack, and the built
//! `kiln-agent`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use kiln_protocol::{JobId, JobSpec, Outcome, RuntimeTable};
use kiln_sandbox::jail::{Jail, JailBackend, JailConfig};
use kiln_sandbox::network::NetworkSettings;
use kiln_sandbox::{run_job, Backend, Sandbox, SandboxSpec};
use kiln_tests::Scope;

/// The test internet: its DNS server and web server's addresses.
const DNS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const WEB_ALLOWED_BY_NAME: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const WEB_DENIED: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const WEB_ALLOWED_BY_NETWORK: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
/// The host side's address towards the test internet.
const HOST_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const BODY: &str = "kiln-test-internet";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a new thread inside the named network namespace.
fn in_netns<T: Send + 'static>(
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
struct World {
    host: String,
    inet: String,
}

impl World {
    fn new(tag: &str) -> Self {
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

    fn host_ns(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.host))
    }

    /// What Kiln has in the host side: its links and its table.
    fn host_links(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.host, "-o", "link", "show"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_owned())
            .filter(|n| n.starts_with("kn"))
            .collect()
    }

    fn table(&self) -> String {
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

struct Env {
    backend: JailBackend,
    scope: Scope,
    world: World,
}

fn settings(world: &World) -> NetworkSettings {
    NetworkSettings {
        enabled: true,
        pool: "10.213.0.0/24".into(),
        host_netns: Some(world.host_ns()),
        upstream_dns: vec![format!("{DNS}:53")],
        allow: vec![
            "allowed.test".into(),
            "*.wild.test".into(),
            format!("{WEB_ALLOWED_BY_NETWORK}/32"),
        ],
        deny: vec!["denied.wild.test".into()],
        ..NetworkSettings::default()
    }
}

impl Env {
    fn new(name: &str) -> Self {
        let world = World::new(name);
        let scope = Scope::new(&format!("net-{name}"));
        let backend = backend(&scope, &world);
        Self {
            backend,
            scope,
            world,
        }
    }

    async fn sandbox(&self, internet: bool) -> Jail {
        let mut spec = SandboxSpec::for_job(&Default::default(), "python");
        spec.allow_internet = internet;
        self.backend.create(&spec).await.unwrap()
    }
}

fn backend(scope: &Scope, world: &World) -> JailBackend {
    let mut cfg = JailConfig::new(kiln_tests::bin("kiln-agent"), RuntimeTable::default());
    cfg.state_dir = scope.state_dir.clone();
    cfg.cgroup_parent = scope.cgroup_parent.clone();
    cfg.network = Some(settings(world));
    JailBackend::new(cfg).unwrap()
}

/// A job's probe: each line `what result`, the result `ok:<body>`, or
/// the kind of failure (`errno name`, `dns:<gaierror>`, `rcode:<n>`).
const PROBE: &str = r#"
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

/// Runs the probe lines in the sandbox; the answer of each, in order.
async fn probe(sb: &Jail, lines: &[String]) -> Vec<String> {
    let mut spec = JobSpec::inline("python", PROBE);
    spec.stdin = lines.join("\n").into_bytes();
    let table = RuntimeTable::default();
    let out = run_job(
        sb,
        JobId::random(),
        table.resolve("python").unwrap(),
        &spec,
        false,
        &mut (),
    )
    .await;
    assert_eq!(out.result.outcome, Outcome::Ok, "{:?}", out.result);
    let got: Vec<String> = out
        .result
        .stdout
        .lines()
        .zip(lines)
        .map(|(l, q)| l.strip_prefix(q.as_str()).unwrap().trim().to_owned())
        .collect();
    assert_eq!(got.len(), lines.len(), "{}", out.result.stdout);
    got
}

fn ok() -> String {
    format!("ok:{BODY}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_air_gapped_jail_fails_connects_and_lookups_at_once() {
    let env = Env::new("gap");
    let sb = env.sandbox(false).await;
    assert!(sb.network().is_none());
    let got = probe(
        &sb,
        &[
            format!("tcp {WEB_ALLOWED_BY_NAME}:80"),
            "tcp allowed.test:80".into(),
            format!("dns allowed.test@{DNS}"),
        ],
    )
    .await;
    // No route at all: the kernel refuses before a packet is sent.
    assert_eq!(got[0], "ENETUNREACH");
    // The name cannot be resolved (EAI_AGAIN -3 or EAI_NONAME -2: the
    // resolver's server is unreachable), and not by waiting.
    assert!(got[1] == "dns:-3" || got[1] == "dns:-2", "{got:?}");
    assert_eq!(got[2], "ENETUNREACH");
    assert!(env.world.host_links().is_empty());
    sb.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_rules_hold_by_name_by_address_and_against_direct_queries() {
    let env = Env::new("rules");
    let sb = env.sandbox(true).await;
    let net = sb.network().expect("a networked jail has a lease");
    assert!(env.world.host_links().contains(&net.slot().host_link()));
    let gw = net.slot().gateway;
    let got = probe(
        &sb,
        &[
            // Allowed: a name, a wildcard name, a network.
            "tcp allowed.test:80".into(),
            "tcp www.wild.test:80".into(),
            format!("tcp {WEB_ALLOWED_BY_NETWORK}:80"),
            // Denied: a name the rules do not allow, a name they deny,
            // an address nobody handed out.
            "tcp other.test:80".into(),
            "tcp denied.wild.test:80".into(),
            format!("tcp {WEB_DENIED}:80"),
            // Asking the test internet's DNS server directly is answered
            // by Kiln's resolver: refused for a name not allowed...
            format!("dns denied.test@{DNS}"),
            format!("dns denied.test@{WEB_DENIED}"),
            // ...and the address stays unreachable.
            format!("tcp {WEB_DENIED}:80"),
            // Nothing of the host side answers: its service on the
            // gateway and on its other address, the resolver's port.
            format!("tcp {gw}:8080"),
            format!("tcp {HOST_SIDE}:8080"),
            format!(
                "tcp {gw}:{}",
                env.backend.network().unwrap().resolver_port()
            ),
            // Link-local (cloud metadata) and other sandboxes' pool.
            "tcp 169.254.169.254:80".into(),
            "tcp 10.213.0.6:80".into(),
        ],
    )
    .await;
    // Refused connects are reset by the firewall (ECONNREFUSED), refused
    // names do not exist (NXDOMAIN: EAI_NONAME, -2, rcode 3).
    let expect = [
        ok(),
        ok(),
        ok(),
        "dns:-2".into(),
        "dns:-2".into(),
        "ECONNREFUSED".into(),
        "rcode:3 answers:0".into(),
        "rcode:3 answers:0".into(),
        "ECONNREFUSED".into(),
        "ECONNREFUSED".into(),
        "ECONNREFUSED".into(),
        "ECONNREFUSED".into(),
        "ECONNREFUSED".into(),
        "ECONNREFUSED".into(),
    ];
    assert_eq!(got, expect);
    sb.destroy().await;
    assert!(
        env.world.host_links().is_empty(),
        "{:?}",
        env.world.host_links()
    );
    assert!(
        !env.world.table().contains("chain s"),
        "{}",
        env.world.table()
    );
    assert_eq!(env.backend.network().unwrap().slots_taken(), 0);
    assert!(env.scope.leftovers().is_empty());
}

/// The network namespace of the room in service, by inode.
fn room_netns(sb: &Jail) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let holder = sb.room_pid().unwrap();
    std::fs::metadata(format!("/proc/{holder}/ns/net"))
        .unwrap()
        .ino()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_gives_a_new_namespace_the_interface_and_nothing_else_carries_over() {
    let env = Env::new("reset");
    let sb = env.sandbox(true).await;
    let first = room_netns(&sb);
    let lines = ["tcp allowed.test:80".to_string()];
    assert_eq!(probe(&sb, &lines).await, [ok()]);
    // The last lease's open connection and resolved addresses go.
    sb.reset().await.unwrap();
    let second = room_netns(&sb);
    assert_ne!(first, second, "a new namespace for the new lease");
    assert!(!env.world.table().contains(&WEB_ALLOWED_BY_NAME.to_string()));
    assert_eq!(
        probe(&sb, &[format!("tcp {WEB_ALLOWED_BY_NAME}:80")]).await,
        ["ECONNREFUSED"],
        "an address resolved in the last lease is not reachable in this one"
    );
    assert_eq!(probe(&sb, &lines).await, [ok()]);
    assert_eq!(env.world.host_links().len(), 1);
    sb.destroy().await;
    assert!(env.world.host_links().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_networked_jails_come_and_go_and_leave_nothing() {
    let env = Env::new("many");
    let mut round = Vec::new();
    for _ in 0..5 {
        for _ in 0..4 {
            round.push(env.sandbox(true).await);
        }
        let mut addrs: Vec<_> = round
            .iter()
            .map(|s| s.network().unwrap().address())
            .collect();
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), 4);
        assert_eq!(env.world.host_links().len(), 4);
        for sb in round.drain(..) {
            sb.destroy().await;
        }
        assert!(env.world.host_links().is_empty());
        assert_eq!(env.backend.network().unwrap().slots_taken(), 0);
    }
    sb_count_check(&env);
}

fn sb_count_check(env: &Env) {
    assert!(
        env.scope.leftovers().is_empty(),
        "{:?}",
        env.scope.leftovers()
    );
    assert!(
        !env.world.table().contains("chain s"),
        "{}",
        env.world.table()
    );
}

#[test]
fn what_a_crashed_owner_left_is_removed_by_the_next() {
    let world = World::new("crash");
    let scope = Scope::new("net-crash");
    // What a process killed with a networked sandbox leaves: the slot
    // file naming the sandbox, and the host end of its veth pair (the
    // jail itself is reaped by the jail backend's own records).
    let slots = scope.state_dir.join("net/slots");
    std::fs::create_dir_all(&slots).unwrap();
    std::fs::write(slots.join("7"), "0123456789abcdef").unwrap();
    ip(&[
        "-n",
        &world.host,
        "link",
        "add",
        "kn7",
        "type",
        "veth",
        "peer",
        "name",
        "kn7p",
    ]);
    assert_eq!(world.host_links().len(), 2);
    let b = backend(&scope, &world);
    assert!(world.host_links().is_empty(), "{:?}", world.host_links());
    assert_eq!(b.network().unwrap().slots_taken(), 0);
    assert!(world.table().contains("map sandboxes"));
    drop(b);
    assert!(world.table().is_empty(), "the table goes with the backend");
}

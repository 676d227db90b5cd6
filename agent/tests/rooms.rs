//! Rooms and zygotes, with the real agent binary as root on this host: every
//! job runs in namespaces of the room, warm Python comes from a zygote, and
//! `Reset` leaves nothing of the last lease behind.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{exec_request, process_gone, Host, Run, TempDir, NOBODY};
use kiln_protocol::{Frame, RuntimeTable, DEFAULT_RUNTIMES_TOML};

/// The built-in table plus `pycold`, Python without a warm start.
fn runtimes() -> RuntimeTable {
    RuntimeTable::from_toml(&format!(
        "{DEFAULT_RUNTIMES_TOML}\n[[runtime]]\nname = \"pycold\"\nfile = \"cold.py\"\ncommand = [\"/usr/bin/python3\", \"{{file}}\"]\n"
    ))
    .unwrap()
}

/// A host whose agent runs in room mode, with its work directory under /run.
struct RoomHost {
    host: Host,
    /// The mount point of every room's work directory (empty on the host).
    _workdir: TempDir,
}

impl RoomHost {
    fn start(warm: &[&str], filters: Vec<Vec<u8>>) -> Self {
        let workdir = TempDir::new_in(Path::new("/run"), "room-work");
        let mut host = Host::start();
        let hello = host.rooms_hello_frame(runtimes(), warm, workdir.path(), filters);
        host.send(&Frame::Hello(hello));
        match host.recv() {
            Frame::HelloAck(_) => {}
            other => panic!("expected hello_ack, got {other:?}"),
        }
        Self {
            host,
            _workdir: workdir,
        }
    }

    /// Runs `code` with `runtime` (its file put first).
    fn run(&mut self, runtime: &str, file: &str, code: &str, warm_next: bool) -> Run {
        self.host.put(file, 0o644, code.as_bytes());
        let tag = self.host.tag();
        let mut req = exec_request(tag, runtime, file);
        req.warm_next = warm_next;
        self.host.run(req, None)
    }

    /// Runs Python code in a warm interpreter, first waiting (with a
    /// harmless probe) for the zygote's first fork if it is not there yet.
    fn run_warm(&mut self, code: &str) -> Run {
        let mut tries = 0;
        while !self.run("python", "main.py", "pass", true).warm {
            tries += 1;
            assert!(tries < 100, "no exec was warm within 5 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let r = self.run("python", "main.py", code, true);
        assert!(
            r.warm,
            "the interpreter forked after the probe takes the job"
        );
        r
    }

    fn reset(&mut self) {
        match self.host.reset() {
            Frame::Ack { .. } => {}
            other => panic!("reset: {other:?}"),
        }
    }
}

fn ok(r: &Run) -> String {
    assert_eq!(
        r.exit.status,
        kiln_protocol::ExitStatus::Code(0),
        "stdout {:?} stderr {:?}",
        r.stdout(),
        r.stderr()
    );
    r.stdout()
}

/// What a job sees of its namespaces, as `key=value` lines.
const LOOK_AROUND: &str = r#"
import os
print("pid=%d" % os.getpid())
print("procs=%s" % ",".join(sorted(p for p in os.listdir("/proc") if p.isdigit())))
print("uid=%d" % os.getuid())
mounts = {l.split()[4]: l.split(" - ")[1].split()[0] for l in open("/proc/self/mountinfo")}
print("work_fs=%s" % mounts.get(os.getcwd()))
print("tmp_fs=%s" % mounts.get("/tmp"))
print("shm_fs=%s" % mounts.get("/dev/shm"))
print("ifaces=%s" % ",".join(sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else ["?"]))
status = dict(l.split(":", 1) for l in open("/proc/self/status"))
for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"):
    print("%s=%s" % (k, status[k].strip()))
print("oom=%s" % open("/proc/self/oom_score_adj").read().strip())
"#;

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {out}"))
}

fn assert_confined(out: &str, what: &str) {
    let pid: u32 = field(out, "pid").parse().unwrap();
    assert!(pid < 10, "{what}: a pid of the room's namespace, got {pid}");
    // The room's /proc shows its own processes only: the holder (1) and
    // the job.
    let procs: Vec<u32> = field(out, "procs")
        .split(',')
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(
        procs.contains(&1) && procs.contains(&pid) && procs.len() <= 3,
        "{what}: {procs:?}"
    );
    assert_eq!(field(out, "uid"), NOBODY.to_string(), "{what}");
    assert_eq!(field(out, "work_fs"), "tmpfs", "{what}");
    assert_eq!(field(out, "tmp_fs"), "tmpfs", "{what}");
    assert_eq!(field(out, "shm_fs"), "tmpfs", "{what}");
    for cap in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert_eq!(field(out, cap), "0000000000000000", "{what}: {cap}");
    }
    assert_eq!(field(out, "NoNewPrivs"), "1", "{what}");
    assert_eq!(field(out, "oom"), "1000", "{what}");
}

#[test]
fn warm_and_cold_jobs_run_confined_in_the_room() {
    let mut h = RoomHost::start(&["python"], vec![]);
    let warm = h.run_warm(LOOK_AROUND);
    let out = ok(&warm);
    assert_confined(&out, "warm (zygote)");
    let cold = h.run("pycold", "cold.py", LOOK_AROUND, false);
    assert!(!cold.warm);
    let out = ok(&cold);
    assert_confined(&out, "cold");
}

/// `getppid` answers EPERM (so `os.getppid()` is -1): a filter the job can
/// only have from the agent.
fn deny_getppid() -> Vec<u8> {
    let ins = |code: u16, jt: u8, jf: u8, k: u32| {
        let mut v = code.to_le_bytes().to_vec();
        v.extend([jt, jf]);
        v.extend(k.to_le_bytes());
        v
    };
    [
        ins(0x20, 0, 0, 0),                                // ld [nr]
        ins(0x15, 0, 1, libc::SYS_getppid as u32),         // jeq getppid
        ins(0x06, 0, 0, 0x0005_0000 | libc::EPERM as u32), // ret ERRNO(EPERM)
        ins(0x06, 0, 0, 0x7fff_0000),                      // ret ALLOW
    ]
    .concat()
}

#[test]
fn the_job_filters_bind_warm_and_cold_jobs_and_nothing_else() {
    let mut h = RoomHost::start(&["python"], vec![deny_getppid()]);
    let code = "import os\nprint(os.getppid())\nprint(open('/proc/self/status').read().split('Seccomp:')[1].split()[0])\n";
    let warm = h.run_warm(code);
    assert_eq!(ok(&warm), "-1\n2\n", "warm");
    let cold = h.run("pycold", "cold.py", code, false);
    assert_eq!(ok(&cold), "-1\n2\n", "cold");
    // The agent itself is not bound by the job's filter.
    let agent = h.host.child.id();
    let status = std::fs::read_to_string(format!("/proc/{agent}/status")).unwrap();
    assert!(status.contains("Seccomp:\t0"), "{status}");
}

/// Leaves a trace of every kind a job can leave, and a process behind.
const LITTER: &str = r#"
import os, socket, subprocess
open("left.txt", "w").write("x")
open("/tmp/left.txt", "w").write("x")
open("/dev/shm/left.txt", "w").write("x")
subprocess.run(["ipcmk", "-M", "4096"], check=True, stdout=subprocess.DEVNULL)
# A connection closed by the server side first: its port stays in TIME_WAIT.
srv = socket.socket(); srv.bind(("127.0.0.1", 47011)); srv.listen()
cli = socket.create_connection(("127.0.0.1", 47011))
conn, _ = srv.accept(); conn.close(); cli.close(); srv.close()
# A detached process that would outlive the job.
p = subprocess.Popen(["sleep", "600"], start_new_session=True)
print(p.pid)
"#;

/// Looks for every trace `LITTER` leaves.
const INSPECT: &str = r#"
import os, socket, subprocess
for f in ("left.txt", "/tmp/left.txt", "/dev/shm/left.txt"):
    print(f, os.path.exists(f))
print("shm", subprocess.run(["ipcs", "-m"], capture_output=True, text=True).stdout.count("0x"))
print("sleepers", sum(1 for p in os.listdir("/proc") if p.isdigit() and "sleep" in open("/proc/%s/cmdline" % p).read()))
s = socket.socket()
try:
    s.bind(("127.0.0.1", 47011)); print("bind ok")
except OSError as e:
    print("bind", e.errno)
"#;

#[test]
fn a_reset_leaves_nothing_of_the_last_lease() {
    let mut h = RoomHost::start(&["python"], vec![]);
    // Without a reset, the traces are there (the check can see them).
    let litter = h.run_warm(LITTER);
    let room_pid: u32 = ok(&litter).trim().parse().unwrap();
    let before = h.run_warm(INSPECT);
    let seen = ok(&before);
    assert!(
        seen.contains("\nleft.txt True") || seen.starts_with("left.txt True"),
        "{seen}"
    );
    assert!(seen.contains("/tmp/left.txt True"), "{seen}");
    assert!(seen.contains("/dev/shm/left.txt True"), "{seen}");
    assert!(seen.contains("shm 1"), "{seen}");
    assert!(seen.contains("sleepers 1"), "{seen}");
    assert!(seen.contains("bind 98"), "TIME_WAIT holds the port: {seen}");
    // The sleeper, seen from the host: a child of the room's holder.
    let host_sleepers: Vec<u32> = common::children(h.host.child.id())
        .into_iter()
        .flat_map(common::children)
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.contains("sleep"))
        })
        .collect();
    assert_eq!(host_sleepers.len(), 1, "room pid {room_pid}");

    h.reset();
    let after = h.run_warm(INSPECT);
    let seen = ok(&after);
    assert_eq!(
        seen,
        "left.txt False\n/tmp/left.txt False\n/dev/shm/left.txt False\nshm 0\nsleepers 0\nbind ok\n"
    );
    assert!(process_gone(
        host_sleepers[0],
        Duration::from_secs(5),
        false
    ));
}

#[test]
fn a_reset_kills_a_running_exec_and_the_room_comes_back() {
    let mut h = RoomHost::start(&["python"], vec![]);
    h.run_warm("print(1)");
    h.host.put(
        "main.py",
        0o644,
        b"import time\nprint('up', flush=True)\ntime.sleep(600)\n",
    );
    let tag = h.host.tag();
    h.host
        .send(&Frame::Exec(exec_request(tag, "python", "main.py")));
    let pid = match h.host.answer_to(tag) {
        Frame::Started(s) => s.pid,
        other => panic!("{other:?}"),
    };
    h.reset();
    assert!(process_gone(pid, Duration::from_secs(5), false));
    let again = h.run_warm("print(2)");
    assert_eq!(ok(&again), "2\n");
}

/// A job's network namespace: its cookie (`SO_NETNS_COOKIE`, never reused
/// while the machine runs, unlike the namespace's inode number), and
/// whether loopback works in it.
const NET_ID: &str = r#"
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), "little"), s.getsockname()[1] > 0)
"#;

/// The cookie of the job's network namespace, checking that loopback
/// worked in it.
fn net_cookie(h: &mut RoomHost) -> u64 {
    let out = ok(&h.run_warm(NET_ID));
    let (cookie, lo) = out.trim().split_once(' ').expect("cookie and loopback");
    assert_eq!(lo, "True", "loopback is up: {out}");
    cookie.parse().unwrap()
}

#[test]
fn every_room_gets_a_network_namespace_no_job_was_ever_in() {
    let mut h = RoomHost::start(&["python"], vec![]);
    let mut seen = vec![net_cookie(&mut h)];
    // Quiet rooms (a port bound and closed, not one packet) and a room that
    // sent a datagram alike: the next room's namespace is a new one.
    for i in 0..4 {
        if i == 2 {
            ok(&h.run_warm(
                "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))\n",
            ));
        }
        h.reset();
        let cookie = net_cookie(&mut h);
        assert!(
            !seen.contains(&cookie),
            "room {i} reused {cookie}: {seen:?}"
        );
        seen.push(cookie);
    }
}

/// Leaves an IPv6 flow label that outlives its socket for 150 s (the most
/// an unprivileged process may ask for) with 16 bytes of its own in the
/// destination field, and sends no packet; prints what
/// `/proc/net/ip6_flowlabel` then shows.
const FLOW_LABEL_LEFT: &str = r#"
import socket, struct
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
# struct in6_flowlabel_req: dst, label 0 (the kernel picks one), action GET,
# share EXCL, flags CREATE, expires 0, linger 150 s.
req = struct.pack("=16sIBBHHHI", b"kiln-left-behind", 0, 0, 1, 1, 0, 150, 0)
s.setsockopt(socket.IPPROTO_IPV6, 32, req)  # IPV6_FLOWLABEL_MGR
s.close()
print(open("/proc/net/ip6_flowlabel").read())
"#;

/// `kiln-left-behind` as `/proc/net/ip6_flowlabel` prints a destination.
const FLOW_LABEL_BYTES: &str = "6b696c6e2d6c6566742d626568696e64";

#[test]
fn a_flow_label_a_job_leaves_without_a_packet_is_gone_in_the_next_room() {
    let mut h = RoomHost::start(&["python"], vec![]);
    let left = ok(&h.run_warm(FLOW_LABEL_LEFT));
    assert!(
        left.contains(FLOW_LABEL_BYTES),
        "the label lingers after its socket closed (the check can see it): {left}"
    );
    // Still there for the next job of the same room.
    let again = ok(&h.run_warm("print(open('/proc/net/ip6_flowlabel').read())"));
    assert!(again.contains(FLOW_LABEL_BYTES), "{again}");
    h.reset();
    let after = ok(&h.run_warm("print(open('/proc/net/ip6_flowlabel').read())"));
    assert!(
        !after.contains(FLOW_LABEL_BYTES),
        "the next room inherited the last lease's flow label: {after}"
    );
}

/// The agent's children that are the pid 1 of a namespace of their own:
/// room holders, the current one and any spare.
fn holders(agent: u32) -> Vec<u32> {
    common::children(agent)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("NSpid:"))
                    .is_some_and(|ids| ids.split_whitespace().count() > 1 && ids.ends_with("\t1"))
            })
        })
        .collect()
}

/// Waits (bounded) until the agent has `n` room holders, and returns them.
fn wait_holders(agent: u32, n: usize) -> Vec<u32> {
    for _ in 0..200 {
        let found = holders(agent);
        if found.len() == n {
            return found;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("the agent never had {n} room holders: {:?}", holders(agent));
}

#[test]
fn the_agent_keeps_one_spare_room_and_makes_one_inline_when_it_has_none() {
    let mut h = RoomHost::start(&["python"], vec![]);
    let agent = h.host.child.id();
    let mut seen = vec![net_cookie(&mut h)];
    // The current room and one spare, made ahead, however many resets.
    for _ in 0..3 {
        wait_holders(agent, 2);
        h.reset();
        seen.push(net_cookie(&mut h));
    }
    let both = wait_holders(agent, 2);
    // The spare: the holder whose network namespace no job is in.
    let job_ns = ok(&h.run_warm("import os\nprint(os.readlink('/proc/self/ns/net'))"));
    let spare: Vec<u32> = both
        .into_iter()
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/ns/net"))
                .unwrap()
                .to_str()
                != Some(job_ns.trim())
        })
        .collect();
    assert_eq!(spare.len(), 1, "one holder is the job's room: {job_ns}");
    // SAFETY: kill has no memory effects; the spare's holder is a child of
    // this test's agent.
    unsafe { libc::kill(spare[0] as i32, libc::SIGKILL) };
    assert!(process_gone(spare[0], Duration::from_secs(5), false));
    // Without a spare, the reset makes its room inline, fresh as ever.
    h.reset();
    let cookie = net_cookie(&mut h);
    assert!(!seen.contains(&cookie), "{cookie} in {seen:?}");
    seen.push(cookie);
    wait_holders(agent, 2);
    h.reset();
    let cookie = net_cookie(&mut h);
    assert!(!seen.contains(&cookie), "{cookie} in {seen:?}");
}

#[test]
fn execs_with_warm_next_share_one_room_until_the_reset() {
    let mut h = RoomHost::start(&["python"], vec![]);
    let first = h.run_warm("open('kept', 'w').write('a')\nopen('/tmp/kept', 'w').write('b')\n");
    ok(&first);
    let second = h.run_warm("print(open('kept').read() + open('/tmp/kept').read())\n");
    assert!(second.warm);
    assert_eq!(ok(&second), "ab\n");
    // The host reads what the job wrote, from the room's work directory.
    match h.host.get_raw("kept", 10) {
        Frame::FileData { data, .. } => assert_eq!(data, b"a"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn forked_interpreters_do_not_share_random_state() {
    let mut h = RoomHost::start(&["python"], vec![]);
    let code = "import random\nprint(random.random())\n";
    let a = ok(&h.run_warm(code));
    let b = ok(&h.run_warm(code));
    assert_ne!(a, b);
}

/// What a job can read of its process's memory layout: where libc is
/// mapped, where the stack starts, the stack protector's canary
/// (glibc keeps it at %fs:0x28), and its str hash seed (through `hash`).
const LAYOUT: &str = r#"
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
fs = ctypes.c_ulong()
assert libc.syscall(158, 0x1003, ctypes.byref(fs)) == 0  # arch_prctl(ARCH_GET_FS)
canary = ctypes.c_ulong.from_address(fs.value + 0x28).value
maps = open("/proc/self/maps").read().splitlines()
libc_at = next(l.split("-")[0] for l in maps if "/libc.so" in l)
stack_at = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[25])  # startstack
print("libc=%s stack=%x canary=%016x hash=%x" % (libc_at, stack_at, canary, hash("kiln") & (2**64 - 1)))
"#;

/// The built-in table with the Python zygote replaced after `max_uses`
/// jobs.
fn runtimes_with_zygote_max_uses(max_uses: u32) -> RuntimeTable {
    let toml: String = DEFAULT_RUNTIMES_TOML
        .lines()
        .filter(|l| !l.starts_with("zygote_max_uses"))
        .map(|l| match l {
            "zygote = true" => format!("{l}\nzygote_max_uses = {max_uses}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    assert!(
        toml.contains("zygote_max_uses"),
        "the zygote changed; update this test"
    );
    RuntimeTable::from_toml(&toml).unwrap()
}

/// A room host with the built-in table but `zygote_max_uses`.
fn start_with_zygote_max_uses(max_uses: u32) -> RoomHost {
    let workdir = TempDir::new_in(Path::new("/run"), "room-work");
    let mut host = Host::start();
    let hello = host.rooms_hello_frame(
        runtimes_with_zygote_max_uses(max_uses),
        &["python"],
        workdir.path(),
        vec![],
    );
    host.send(&Frame::Hello(hello));
    assert!(matches!(host.recv(), Frame::HelloAck(_)));
    RoomHost {
        host,
        _workdir: workdir,
    }
}

/// The layouts of the next `n` warm jobs, each in a room of its own (a
/// reset after each, as a pool does between leases). A job that found no
/// warm interpreter (a fresh zygote still starting) ran cold, forked from
/// nothing, and is not counted; no reset follows it, so that the fork the
/// fresh zygote makes when it is ready goes to a job rather than to a
/// reset (a fork counts against `zygote_max_uses` whether or not a job
/// ran in it).
fn warm_layouts(h: &mut RoomHost, n: usize) -> Vec<String> {
    let mut layouts = Vec::new();
    for _ in 0..200 {
        if layouts.len() == n {
            return layouts;
        }
        let r = h.run("python", "main.py", LAYOUT, false);
        let out = ok(&r);
        if r.warm {
            h.reset();
            layouts.push(out);
        } else {
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    panic!("only {} of {n} jobs were warm: {layouts:?}", layouts.len());
}

/// The `key=value` fields of two layouts that are equal.
fn shared_fields(a: &str, b: &str) -> Vec<String> {
    a.split_whitespace()
        .zip(b.split_whitespace())
        .filter(|(x, y)| x == y)
        .map(|(x, _)| x.to_owned())
        .collect()
}

#[test]
fn forks_of_one_zygote_share_their_memory_layout() {
    let mut h = start_with_zygote_max_uses(1000);
    let l = warm_layouts(&mut h, 2);
    assert_eq!(l[0], l[1], "what zygote_max_uses defends against");
}

#[test]
fn with_zygote_max_uses_1_every_job_gets_a_fresh_layout() {
    let mut h = start_with_zygote_max_uses(1);
    let l = warm_layouts(&mut h, 3);
    for (a, b) in [(0, 1), (1, 2), (0, 2)] {
        let shared = shared_fields(&l[a], &l[b]);
        assert!(shared.is_empty(), "jobs {a} and {b} share {shared:?}");
    }
}

#[test]
fn zygote_max_uses_is_the_number_of_jobs_that_share_a_layout() {
    let mut h = start_with_zygote_max_uses(3);
    let l = warm_layouts(&mut h, 7);
    let same = |a: usize, b: usize| l[a] == l[b];
    assert!(same(0, 1) && same(1, 2), "{l:#?}");
    assert!(shared_fields(&l[2], &l[3]).is_empty(), "{l:#?}");
    assert!(same(3, 4) && same(4, 5), "{l:#?}");
    assert!(shared_fields(&l[5], &l[6]).is_empty(), "{l:#?}");
}

/// The jobs of one room (a workspace: `warm_next`, no reset) count alike.
#[test]
fn zygote_max_uses_counts_the_jobs_of_one_room_too() {
    let mut h = start_with_zygote_max_uses(2);
    let mut l: Vec<String> = Vec::new();
    for _ in 0..200 {
        if l.len() == 4 {
            break;
        }
        let r = h.run("python", "main.py", LAYOUT, true);
        let out = ok(&r);
        if r.warm {
            l.push(out);
        } else {
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    assert_eq!(l.len(), 4, "{l:#?}");
    assert_eq!(l[0], l[1]);
    assert!(shared_fields(&l[1], &l[2]).is_empty(), "{l:#?}");
    assert_eq!(l[2], l[3]);
}

#[test]
fn a_dead_zygote_is_replaced_and_jobs_go_on_meanwhile() {
    let mut h = RoomHost::start(&["python"], vec![]);
    let warm = h.run_warm("print(1)");
    let agent = h.host.child.id();
    // The zygote: the agent's child that is neither the holder nor a warm
    // interpreter (a pid 1 of a room shows as a child with its own pid ns).
    let zygote = common::children(agent)
        .into_iter()
        .find(|&p| {
            let ns = |q: u32| std::fs::read_link(format!("/proc/{q}/ns/pid")).ok();
            ns(p) == ns(agent) && p != warm.pid
        })
        .expect("a zygote in the agent's pid namespace");
    // SAFETY: kill has no memory effects; the zygote is a process this
    // test's agent started.
    unsafe { libc::kill(zygote as i32, libc::SIGKILL) };
    assert!(process_gone(zygote, Duration::from_secs(5), false));
    // The warm interpreter forked before still serves; then jobs go cold
    // until the next reset starts a new zygote.
    let next = h.run("python", "main.py", "print(2)", true);
    assert_eq!(ok(&next), "2\n");
    let cold = h.run("python", "main.py", "print(3)", true);
    assert!(!cold.warm);
    assert_eq!(ok(&cold), "3\n");
    h.reset();
    assert_eq!(ok(&h.run_warm("print(4)")), "4\n");
}

/// The built-in table with the Python zygote's direct `clone` path taken
/// away, as on a libc without the thread-id descriptor it needs: every fork
/// then goes through an intermediate process.
fn runtimes_without_direct_clone() -> RuntimeTable {
    let direct = "direct = (tid_at, head.value, size.value)";
    assert!(
        DEFAULT_RUNTIMES_TOML.contains(direct),
        "the zygote changed; update this test"
    );
    let toml = DEFAULT_RUNTIMES_TOML.replace(direct, "direct = None");
    RuntimeTable::from_toml(&toml).unwrap()
}

#[test]
fn the_zygote_without_direct_clone_still_forks_confined_interpreters() {
    let workdir = TempDir::new_in(Path::new("/run"), "room-work");
    let mut host = Host::start();
    let hello = host.rooms_hello_frame(
        runtimes_without_direct_clone(),
        &["python"],
        workdir.path(),
        vec![],
    );
    host.send(&Frame::Hello(hello));
    assert!(matches!(host.recv(), Frame::HelloAck(_)));
    let mut h = RoomHost {
        host,
        _workdir: workdir,
    };
    let out = ok(&h.run_warm(LOOK_AROUND));
    assert_confined(&out, "warm, through an intermediate process");
    h.reset();
    let code = "import random\nprint(random.random())\n";
    let (a, b) = (ok(&h.run_warm(code)), ok(&h.run_warm(code)));
    assert_ne!(a, b);
}

/// Threads of a forked interpreter address its main thread correctly: glibc
/// knows the main thread's real id (the zygote's fork writes it), so
/// signalling the main thread from another thread reaches it.
#[test]
fn a_forked_interpreter_knows_its_own_thread_id() {
    let mut h = RoomHost::start(&["python"], vec![]);
    let code = r#"
import signal, threading, time
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
main = threading.main_thread().ident
t = threading.Thread(target=lambda: signal.pthread_kill(main, signal.SIGUSR1))
t.start(); t.join()
for _ in range(100):
    if got: break
    time.sleep(0.01)
print(threading.get_native_id() == __import__("os").getpid(), got)
"#;
    assert_eq!(ok(&h.run_warm(code)), "True [1]\n");
}

#[test]
fn rooms_refuse_a_work_directory_inside_tmp() {
    let mut host = Host::start();
    let hello = host.rooms_hello_frame(runtimes(), &[], Path::new("/tmp/x"), vec![]);
    host.send(&Frame::Hello(hello));
    match host.recv() {
        Frame::Error(e) => assert!(e.message.contains("/tmp"), "{}", e.message),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn a_room_that_cannot_be_made_is_refused_with_the_step_and_the_reason() {
    let mut host = Host::start();
    let missing = Path::new("/run/kiln-agent-test-no-such-dir");
    let hello = host.rooms_hello_frame(runtimes(), &[], missing, vec![]);
    host.send(&Frame::Hello(hello));
    match host.recv() {
        Frame::Error(e) => assert!(
            e.message.contains("attach the work directory")
                && e.message.contains("No such file or directory"),
            "{}",
            e.message
        ),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn reset_without_rooms_is_refused_by_name() {
    let mut host = Host::start();
    host.hello(&[]);
    match host.reset() {
        Frame::Error(e) => assert!(e.message.contains("no rooms"), "{}", e.message),
        other => panic!("{other:?}"),
    }
}

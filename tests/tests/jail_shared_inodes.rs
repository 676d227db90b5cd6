//! No sandbox can observe or block another sandbox, or the host, through the
//! files every jail's root shows: the host's `/usr` and `/etc` and the device
//! nodes. Two concurrent workspaces of one real `kiln serve`, plus this test
//! process on the host:
//!
//! - workspace A leaves a *watcher* running in its room: it holds
//!   `flock(LOCK_EX)` on every shared file, watches each of them (and their
//!   directories) with inotify for opens and reads, and records what it sees
//!   until the test tells it to stop through A's own `/work`;
//! - workspace B opens, reads and tries `flock(LOCK_EX|LOCK_NB)` on the same
//!   files, and imports a module A watches;
//! - the host (this process) does the same on the host's own files, and
//!   holds its locks while B tries.
//!
//! The test marks the phases by uploading files into A's `/work` (the
//! files API: no process of A's runs for it). Events are queued when the
//! opening system call runs, so whatever B and the host did is in A's queue
//! before the marker that ends the first phase: nothing here depends on
//! timing. A second phase, in which A opens the files itself, proves that its
//! watches work (a watch that silently saw nothing would prove nothing); the
//! markers, and a file A makes and locks in its `/tmp`, prove that watches
//! and locks on a sandbox's own files still work.

use std::fs::File;
use std::io::Read as _;
use std::os::fd::AsRawFd as _;

use kiln_tests::server::Server;
use serde_json::{json, Value};

/// The files every sandbox's root shows and that a workload opens in the
/// normal course of things. The Python module is found in the sandbox.
const SHARED: &[&str] = &[
    "/etc/hostname",
    "/etc/passwd",
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// The watcher, started detached (its own session) so that it outlives the
/// exec that starts it; it lives in the workspace's room until the test
/// creates `/work/stop`, or for two minutes at most.
const WATCHER: &str = r#"
import ctypes, fcntl, json, os, select, struct, sys, sysconfig, time
targets = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
IN_ACCESS, IN_OPEN, IN_MOVED_TO, IN_CREATE = 0x1, 0x20, 0x80, 0x100
locks, held = {}, []
for p in targets:
    fd = os.open(p, os.O_RDONLY)
    held.append(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locks[p] = "held"
    except OSError as e:
        locks[p] = "errno %d" % e.errno
ino = libc.inotify_init1(os.O_NONBLOCK)
watched = {}
for p in targets + sorted({os.path.dirname(p) for p in targets}):
    wd = libc.inotify_add_watch(ino, p.encode(), IN_OPEN | IN_ACCESS)
    if wd < 0:
        raise OSError(ctypes.get_errno(), "inotify_add_watch " + p)
    watched[wd] = p
work = libc.inotify_add_watch(ino, b"/work", IN_CREATE | IN_MOVED_TO)
tmp = libc.inotify_add_watch(ino, b"/tmp", IN_CREATE)
watched[tmp] = "/tmp"
open("/work/ready", "w").write(json.dumps(locks))
seen = {"setup": [], "before": [], "after": []}
phase, deadline = "setup", time.monotonic() + 120
while phase != "done" and time.monotonic() < deadline:
    select.select([ino], [], [], 1.0)
    try:
        buf = os.read(ino, 65536)
    except BlockingIOError:
        continue
    i = 0
    while i < len(buf):
        wd, mask, _, n = struct.unpack_from("iIII", buf, i)
        name = buf[i + 16 : i + 16 + n].rstrip(b"\0").decode()
        i += 16 + n
        if wd == work:
            if name == "begin":
                phase = "before"
            elif name == "phase2":
                phase = "after"
            elif name == "stop":
                phase = "done"
        elif phase != "done":
            what = "create" if mask & IN_CREATE else "open" if mask & IN_OPEN else "read"
            seen[phase].append("%s %s" % (what, os.path.join(watched[wd], name) if name else watched[wd]))
seen["stopped"] = phase == "done"
open("/work/result.tmp", "w").write(json.dumps(seen))
os.rename("/work/result.tmp", "/work/result.json")
"#;

/// Starts the watcher on `targets` and waits (bounded) until it is ready.
const START_WATCHER: &str = r#"
import json, os, subprocess, sys, sysconfig, time
targets = TARGETS + [os.path.join(sysconfig.get_paths()["stdlib"], "colorsys.py")]
err = open("/work/watcher.err", "w")
subprocess.Popen([sys.executable, "-c", WATCHER, json.dumps(targets)], start_new_session=True,
                 stdin=subprocess.DEVNULL, stdout=err, stderr=err)
for _ in range(1200):
    if os.path.exists("/work/ready"):
        break
    time.sleep(0.05)
print(json.dumps({"targets": targets, "locks": json.load(open("/work/ready")) if os.path.exists("/work/ready") else None,
                  "error": open("/work/watcher.err").read()}))
"#;

/// What a neighbour does: open, read and try to lock every target, and
/// import the module.
const NEIGHBOUR: &str = r#"
import fcntl, json, os
out = {}
for p in TARGETS:
    fd = os.open(p, os.O_RDONLY)
    os.read(fd, 1)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out[p] = "locked"
    except OSError as e:
        out[p] = "errno %d" % e.errno
    os.close(fd)
import colorsys
print(json.dumps(out))
"#;

/// A's own opens in the second phase, which its watches must see, and a
/// file of its own in `/tmp`, which it can lock while the watcher holds its
/// locks.
const OWN_OPENS: &str = r#"
import fcntl, json, os
for p in TARGETS:
    os.close(os.open(p, os.O_RDONLY))
with open("/tmp/mine", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
print(json.dumps(TARGETS))
"#;

fn create(s: &Server) -> String {
    let (st, v) = s.json(
        "POST",
        "/v1/sandboxes",
        &json!({"template": "python", "ttl_s": 300}),
    );
    assert_eq!(st, 201, "{v}");
    v["id"].as_str().unwrap().to_owned()
}

/// Runs Python `code` in workspace `id` and answers its stdout as JSON.
fn exec_json(s: &Server, id: &str, code: &str) -> Value {
    let (st, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"code": code, "limits": {"timeout_ms": 90000}}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["outcome"], "ok", "{r}");
    let out = r["stdout"].as_str().unwrap();
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: stdout {out:?}, result {r}"))
}

/// Uploads an empty `name` into workspace `id`'s `/work`.
fn mark(s: &Server, id: &str, name: &str) {
    let r = s.request(
        "PUT",
        &format!("/v1/sandboxes/{id}/files/{name}"),
        Some(b""),
    );
    assert_eq!(r.status, 204, "{}", r.text());
}

/// The watcher's report, once it has written it (bounded wait).
fn report(s: &Server, id: &str) -> Value {
    for _ in 0..1200 {
        let r = s.request(
            "GET",
            &format!("/v1/sandboxes/{id}/files/result.json"),
            None,
        );
        if r.status == 200 {
            return r.json();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let err = s.request(
        "GET",
        &format!("/v1/sandboxes/{id}/files/watcher.err"),
        None,
    );
    panic!("the watcher wrote no report; its stderr: {}", err.text());
}

/// `flock(LOCK_EX|LOCK_NB)` on a new descriptor of `path`: the file stays
/// locked while it is open.
fn host_lock(path: &str) -> Result<File, std::io::Error> {
    let mut f = File::open(path)?;
    let _ = f.read(&mut [0u8; 1])?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

#[test]
fn sandboxes_and_the_host_neither_see_nor_block_each_others_shared_files() {
    let s = Server::start("inodes", &["--min-idle", "0"]);
    let a = create(&s);
    let b = create(&s);
    let targets = serde_json::to_string(SHARED).unwrap();
    let with_targets = |code: &str| code.replace("TARGETS", &targets);

    let start = with_targets(START_WATCHER).replace("WATCHER", &format!("r'''{WATCHER}'''"));
    let ready = exec_json(&s, &a, &start);
    let all: Vec<String> = serde_json::from_value(ready["targets"].clone()).unwrap();
    let locks = &ready["locks"];
    assert!(locks.is_object(), "the watcher did not start: {ready}");
    for t in &all {
        assert_eq!(locks[t], "held", "{t}: {ready}");
    }
    let all_json = serde_json::to_string(&all).unwrap();
    mark(&s, &a, "begin");

    // The host locks and reads the same files while A holds its locks: a
    // sandbox must not block the host...
    let mut host = Vec::new();
    for t in &all {
        match host_lock(t) {
            Ok(f) => host.push(f),
            Err(e) => panic!("the host could not lock {t} while a sandbox holds it: {e}"),
        }
    }
    // ... nor the host a sandbox, nor one sandbox another.
    let neighbour = exec_json(&s, &b, &NEIGHBOUR.replace("TARGETS", &all_json));
    drop(host);
    for t in &all {
        assert_eq!(
            neighbour[t], "locked",
            "{t}: a sandbox could not lock it while another sandbox and the host hold it: {neighbour}"
        );
    }

    mark(&s, &a, "phase2");
    exec_json(&s, &a, &OWN_OPENS.replace("TARGETS", &all_json));
    mark(&s, &a, "stop");
    let seen = report(&s, &a);
    assert_eq!(seen["stopped"], true, "{seen}");
    assert_eq!(
        seen["before"],
        json!([]),
        "a sandbox saw another sandbox's (and the host's) opens and reads"
    );
    let after: Vec<String> = serde_json::from_value(seen["after"].clone()).unwrap();
    assert!(
        after.iter().any(|e| e == "create /tmp/mine"),
        "a watch on the sandbox's own /tmp missed a file made there: {after:?}"
    );
    for t in &all {
        assert!(
            after.iter().any(|e| e == &format!("open {t}")),
            "the watcher did not see its own sandbox open {t}: {after:?}"
        );
    }

    for id in [&a, &b] {
        assert_eq!(
            s.request("DELETE", &format!("/v1/sandboxes/{id}"), None)
                .status,
            204
        );
    }
    let left = s.wait_clean(std::time::Duration::from_secs(10));
    assert!(left.is_empty(), "left behind: {left:?}");
}

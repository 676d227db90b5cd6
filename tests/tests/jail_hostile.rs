//! Hostile and runaway code against the jail: deadlines, memory and fork
//! bombs, disk fill, output floods, and escape attempts (host files, host
//! processes, host network, mount/ptrace/modules/namespaces, surviving the
//! sandbox). Each test asserts on what the job could and could not do, and
//! that the host kept nothing. Real namespaces, cgroups and processes.

use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_protocol::{JobResult, Outcome};
use kiln_tests::Scope;

#[test]
fn a_busy_loop_times_out_and_keeps_its_earlier_output() {
    let s = Scope::new("timeout");
    let started = Instant::now();
    let (r, code) = s.run_json(&[
        "--runtime",
        "python",
        "--timeout",
        "1s",
        "-c",
        "print('before the loop')\nwhile True: pass",
    ]);
    let took = started.elapsed();
    assert_eq!(r.outcome, Outcome::Timeout, "{r:?}");
    assert_eq!(r.stdout, "before the loop\n");
    assert_eq!(code, 124);
    // Generous bound: the issue's "within 2 s" plus process start-up on a
    // loaded CI machine. The precise figure is in docs/BENCHMARKS.md.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(r.timings.run_ms < 2000.0, "run_ms {}", r.timings.run_ms);
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
}

#[test]
fn a_memory_bomb_ends_as_oom() {
    let s = Scope::new("oom");
    for code in [
        "x = bytearray(512 * 1024 * 1024)\nprint(len(x))",
        "chunks = []\nwhile True: chunks.append(' ' * (1 << 20))",
    ] {
        let (r, status) = s.run_json(&["--runtime", "python", "--memory", "64M", "-c", code]);
        assert_eq!(r.outcome, Outcome::Oom, "{r:?}");
        assert_eq!(status, 137);
        assert!(r.message.unwrap_or_default().contains("64 MiB"));
    }
    assert!(s.leftovers().is_empty());
}

#[test]
fn a_fork_bomb_is_contained_by_the_pids_limit() {
    let s = Scope::new("forkbomb");
    let child = s
        .command(
            &[
                "--runtime",
                "bash",
                "--pids",
                "32",
                "--timeout",
                "3s",
                "-c",
                "bomb() { bomb | bomb & }; bomb; sleep 10",
            ],
            &["--json", "--no-stdin"],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // While it rages, the sandbox never holds more than its limit and the
    // host can still start processes.
    let until = Instant::now() + Duration::from_secs(2);
    let mut peak = 0u64;
    let mut host_spawns = 0;
    while Instant::now() < until {
        for cg in s.leftovers() {
            if cg.starts_with("/sys/fs/cgroup/pids") || cg.join("pids.current").exists() {
                if let Ok(v) = std::fs::read_to_string(cg.join("pids.current")) {
                    peak = peak.max(v.trim().parse().unwrap_or(0));
                }
            }
        }
        let ok = std::process::Command::new("/bin/true")
            .status()
            .map(|s| s.success());
        assert!(
            matches!(ok, Ok(true)),
            "the host could not spawn a process: {ok:?}"
        );
        host_spawns += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let r: JobResult = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        matches!(r.outcome, Outcome::Timeout | Outcome::Error),
        "{r:?}"
    );
    assert!(peak <= 32, "pids.current peaked at {peak}");
    assert!(
        peak >= 16,
        "the bomb never got going (peak {peak}): the test proves nothing"
    );
    assert!(host_spawns > 5);
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
}

#[test]
fn filling_the_disk_fails_inside_the_sandbox_only() {
    let s = Scope::new("diskfill");
    let (r, _) = s.run_json(&[
        "--runtime",
        "bash",
        "--disk",
        "16M",
        "--memory",
        "128M",
        "-c",
        "dd if=/dev/zero of=/work/fill bs=1M count=100 2>&1 | grep -i 'no space'; \
         dd if=/dev/zero of=/tmp/fill bs=1M count=100 2>&1 | grep -ci 'no space'; \
         stat -c %s /work/fill; echo still-alive",
    ]);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert!(r.stdout.contains("No space left on device"), "{}", r.stdout);
    assert!(r.stdout.contains("still-alive"));
    let mut numbers = r
        .stdout
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok());
    assert_eq!(
        numbers.next(),
        Some(1),
        "/tmp must be capped too: {}",
        r.stdout
    );
    let size = numbers.next().expect("file size line");
    assert!(size <= 16 << 20, "wrote {size} bytes past a 16 MiB disk");
    assert!(s.leftovers().is_empty());
}

#[test]
// The child is reaped with wait4 (for its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn an_output_flood_is_cut_at_the_cap_with_bounded_host_memory() {
    let s = Scope::new("flood");
    let child = s
        .command(
            &[
                "--runtime",
                "python",
                "--output-limit",
                "1M",
                "-c",
                "while True: print('x' * 1000)",
            ],
            &["--json", "--no-stdin"],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    // Read the result while we wait4 for the rusage of kiln itself.
    let mut stdout = child.stdout.unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut v).unwrap();
        v
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child with valid out-pointers.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(waited, pid);
    let r: JobResult = serde_json::from_slice(&reader.join().unwrap()).unwrap();
    assert_eq!(r.outcome, Outcome::Killed, "{:?}", r.message);
    assert!(r.stdout_truncated);
    assert_eq!(r.stdout.len(), 1 << 20);
    assert!(r.message.unwrap_or_default().contains("output"));
    // kiln's peak RSS stays far below an unbounded flood's.
    assert!(
        ru.ru_maxrss < 128 * 1024,
        "kiln peaked at {} KiB",
        ru.ru_maxrss
    );
    assert!(s.leftovers().is_empty());
}

#[test]
fn host_secrets_and_processes_are_invisible() {
    let s = Scope::new("secrets");
    let secret = Path::new("/root").join(format!("kiln-secret-{}", std::process::id()));
    std::fs::write(&secret, "top secret").unwrap();
    let code = format!(
        r#"
import os, json
out = {{}}
try:
    out["secret"] = open({secret:?}).read()
except Exception as e:
    out["secret"] = type(e).__name__
pids = [p for p in os.listdir("/proc") if p.isdigit()]
out["pids"] = len(pids)
out["cmds"] = [open(f"/proc/{{p}}/cmdline", "rb").read().decode(errors="replace") for p in pids]
out["uid"] = os.getuid()
for path in ["/usr/kiln-write-test", "/kiln-write-test", "/etc/kiln-write-test"]:
    try:
        open(path, "w").write("x")
        out[path] = "written"
    except OSError as e:
        out[path] = e.errno
print(json.dumps(out))
"#,
        secret = secret.to_str().unwrap()
    );
    let (r, _) = s.run_json(&["--runtime", "python", "-c", &code]);
    std::fs::remove_file(&secret).unwrap();
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_ne!(v["secret"], "top secret");
    assert!(
        v["pids"].as_u64().unwrap() < 8,
        "sees {} processes",
        v["pids"]
    );
    let cmds = v["cmds"].to_string();
    assert!(
        !cmds.contains("cargo") && !cmds.contains("jail_hostile"),
        "host processes visible: {cmds}"
    );
    assert_eq!(v["uid"], 1000);
    for p in [
        "/usr/kiln-write-test",
        "/kiln-write-test",
        "/etc/kiln-write-test",
    ] {
        assert_eq!(v[p], libc::EROFS, "{p}: {}", v[p]);
        assert!(!Path::new(p).exists());
    }
}

#[test]
fn the_host_loopback_is_unreachable() {
    let s = Scope::new("net");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    // Only the host's loopback address is tried: the jail has no route to
    // anything else, which the interface and route tables show without
    // sending a packet anywhere.
    let code = format!(
        "import os, socket\ns = socket.socket(); s.settimeout(2)\ntry:\n    s.connect(('127.0.0.1', {port})); print('connected')\nexcept OSError as e:\n    print(type(e).__name__)\nprint([l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]], len(open('/proc/net/route').readlines()))\n"
    );
    let (r, _) = s.run_json(&["--runtime", "python", "-c", &code]);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert!(!r.stdout.contains("connected"), "{}", r.stdout);
    assert!(
        r.stdout.contains("['lo'] 1"),
        "interfaces or routes beyond loopback: {}",
        r.stdout
    );
    assert!(
        listener.accept().is_err(),
        "the host listener got a connection"
    );
}

#[test]
fn privileged_operations_are_refused() {
    let s = Scope::new("privileged");
    // Each probe prints name=errno; 0 would mean the call succeeded.
    let code = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def probe(name, rc):
    print(f"{name}={0 if rc == 0 else ctypes.get_errno()}")
probe("mount", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
probe("ptrace", libc.ptrace(0, 0, None, None))
probe("init_module", libc.syscall(175, None, 0, b""))
probe("finit_module", libc.syscall(313, 0, b"", 0))
probe("unshare_user", libc.unshare(0x10000000))
probe("unshare_net", libc.unshare(0x40000000))
probe("bpf", libc.syscall(321, 0, None, 0))
probe("chroot", libc.chroot(b"/tmp"))
probe("setuid0", libc.setuid(0))
"#;
    let (r, _) = s.run_json(&["--runtime", "python", "-c", code]);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 9, "{}", r.stdout);
    for l in lines {
        let (name, errno) = l.split_once('=').unwrap();
        assert_ne!(errno, "0", "{name} succeeded inside the jail");
    }
}

#[test]
fn nothing_keeps_running_after_the_sandbox_is_destroyed() {
    let s = Scope::new("escape-bg");
    // The job's shell builds the name, so kiln's own command line (which
    // carries the code) never matches it.
    let built = format!("kiln-marker-{}-$((1+1))", std::process::id());
    let marker = format!("kiln-marker-{}-2", std::process::id());
    let code = format!(
        "setsid bash -c \"exec -a {built} sleep 300\" </dev/null >/dev/null 2>&1 &\n\
         nohup bash -c \"exec -a {built} sleep 300\" </dev/null >/dev/null 2>&1 &\n\
         sleep 0.2; pgrep -fc {marker} || true"
    );
    let (r, _) = s.run_json(&["--runtime", "bash", "-c", &code]);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert!(
        r.stdout.trim().parse::<u32>().unwrap_or(0) >= 1,
        "background jobs did not start: {r:?}"
    );
    let survivors = kiln_tests::processes_matching(&marker);
    assert!(
        survivors.is_empty(),
        "survivors after destroy: {survivors:?}"
    );
    assert!(s.leftovers().is_empty());
}

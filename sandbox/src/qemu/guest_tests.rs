//! Tests with real guests: each boots Kiln's guest kernel and image under
//! QEMU (TCG where KVM is unusable) and talks to the agent inside over
//! vhost-device-vsock. They need the artefacts of `deploy/guest/build-*.sh`
//! (found through `KILN_GUEST_KERNEL` / `KILN_GUEST_ROOTFS`, else the newest
//! in `KILN_GUEST_CACHE`, default `/var/cache/kiln/guest`), QEMU and
//! vhost-device-vsock. Without them they say SKIPPED, unless
//! `KILN_REQUIRE_GUEST=1` (set by scripts/test.sh) makes that a failure.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_protocol::{JobId, JobSpec, Outcome, RuntimeTable};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::vm::VsockError;
use crate::{run_job, Backend, Sandbox, SandboxError, SandboxSpec};

/// The guest artefacts, or `None` (SKIPPED) when they are not built.
pub(crate) fn guest_artefacts() -> Option<(PathBuf, PathBuf)> {
    match crate::vm::GuestImage::from_env() {
        Ok(img) => Some((img.kernel, img.rootfs)),
        Err(e) => {
            let msg = format!("no guest kernel/rootfs ({e})");
            if std::env::var("KILN_REQUIRE_GUEST").as_deref() == Ok("1") {
                panic!("{msg}");
            }
            eprintln!("SKIPPED: {msg}");
            None
        }
    }
}

/// Real guests are heavy under TCG: one test at a time in this binary.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Env {
    backend: QemuBackend,
    state: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        // The test's own directory: a failed test must not leave it (its
        // VMs were killed when dropped).
        let _ = fs::remove_dir_all(&self.state);
    }
}

fn env(test: &str) -> Option<Env> {
    let (kernel, rootfs) = guest_artefacts()?;
    let mut cfg = QemuConfig::new(kernel, rootfs, RuntimeTable::default());
    let state = std::env::temp_dir().join(format!("kiln-qemu-{}-{test}", std::process::id()));
    cfg.state_dir = state.clone();
    let backend = QemuBackend::new(cfg).expect("qemu backend");
    Some(Env { backend, state })
}

fn spec(memory_mb: u64) -> SandboxSpec {
    SandboxSpec {
        memory_mb,
        pids: 64,
        cpu_millis: 1000,
        disk_mb: 32,
        warm: vec!["python".into()],
        allow_internet: false,
        background: false,
        image: None,
    }
}

fn job(json: serde_json::Value) -> JobSpec {
    JobSpec::from_json(json.to_string().as_bytes()).expect("valid job")
}

async fn run(vm: &QemuVm, j: &JobSpec) -> crate::RunOutcome {
    let table = RuntimeTable::default();
    let rt = table.resolve(&j.runtime).expect("runtime").clone();
    run_job(vm, JobId::random(), &rt, j, false, &mut ()).await
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_runs_a_job_and_destroy_leaves_nothing() {
    let Some(env) = env("boot") else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let vm = env.backend.create(&spec(128)).await.expect("guest boots");
    eprintln!(
        "boot to agent-ready: {:?} ({})",
        vm.boot_time(),
        vm.accel().as_str()
    );
    assert!(vm.agent().ping(Duration::from_secs(5)).await.is_ok());
    assert_eq!(
        vm.qmp("query-status", None).await.unwrap()["status"],
        "running"
    );
    let out = run(
        &vm,
        &job(serde_json::json!({"runtime": "python", "code":
            "import os, socket, time\nprint(os.getuid(), socket.gethostname(), os.environ.get('KILN_SANDBOX_ID'), open('/proc/cmdline').read()=='', os.access('/dev/kmsg', os.W_OK) or os.access('/dev/console', os.W_OK))\nst = os.statvfs('/work')\nprint(st.f_blocks * st.f_frsize // 2**20, abs(time.time() - float(os.environ['HOST_NOW'])) < 120)\ntry:\n    open('/dev/kmsg').read(1)\n    print('kmsg readable')\nexcept OSError as e:\n    print('kmsg', e.errno)",
            "env": {"HOST_NOW": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs().to_string()}})),
    )
    .await;
    assert_eq!(out.result.outcome, Outcome::Ok, "{:?}", out.result);
    // Runs as the job user; the hostname, the sandbox id, the size of
    // /work and the clock come from the guest setup; the command line is
    // hidden and the console (where the host counts OOM kills) out of
    // reach. The kernel log is root-only too.
    let id = vm.id().as_str();
    assert_eq!(
        out.result.stdout,
        format!(
            "1000 kiln-{id} {id} True False\n{} True\nkmsg 1\n",
            spec(128).disk_mb
        )
    );
    let pid = vm.pid();
    let dir = env.state.join("qemu").join(vm.id().as_str());
    assert!(dir.exists());
    vm.destroy().await;
    assert!(!alive(pid), "QEMU survived destroy");
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        crate::qemu::tests::processes_naming(&dir).is_empty(),
        "a process of the sandbox survived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_guest_initiated_vsock_connections_work() {
    let Some(env) = env("vsock") else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let vm = env.backend.create(&spec(128)).await.expect("guest boots");

    // Guest-initiated: the guest connects to the host (CID 2) port 6000,
    // which arrives on <uds>_6000.
    let path = vm.guest_listener_path(6000).expect("a booted VM has vsock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let accept = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        buf
    });
    let out = run(
        &vm,
        &job(serde_json::json!({"runtime": "python", "code":
            "import socket\ns = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\ns.connect((2, 6000))\ns.sendall(b'hello from the guest')\ns.close()\nprint('sent')"})),
    )
    .await;
    assert_eq!(out.result.outcome, Outcome::Ok, "{:?}", out.result);
    let got = tokio::time::timeout(Duration::from_secs(20), accept)
        .await
        .expect("the guest's connection arrives")
        .unwrap();
    assert_eq!(got, "hello from the guest");

    // Host-initiated, to a port other than the agent's: a job listens on
    // vsock port 5000 and the host connects through CONNECT 5000.
    let server = job(serde_json::json!({"runtime": "python", "code":
        "import socket\ns = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\ns.bind((socket.VMADDR_CID_ANY, 5000))\ns.listen(1)\nprint('listening', flush=True)\nc, _ = s.accept()\nc.sendall(c.recv(100).upper())\nc.close()",
        "limits": {"timeout_ms": 30000}}));
    let host = async {
        let start = Instant::now();
        loop {
            match vm.connect_vsock(5000).await {
                Ok(mut s) => {
                    s.write_all(b"ping from the host").await.unwrap();
                    let mut buf = String::new();
                    s.read_to_string(&mut buf).await.unwrap();
                    return buf;
                }
                Err(VsockError::Refused(_)) if start.elapsed() < Duration::from_secs(20) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("host-initiated connection failed: {e}"),
            }
        }
    };
    let (out, got) = tokio::join!(run(&vm, &server), host);
    assert_eq!(out.result.outcome, Outcome::Ok, "{:?}", out.result);
    assert_eq!(got, "PING FROM THE HOST");
    vm.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_meets_the_guests_oom_killer_and_the_guest_lives_on() {
    let Some(env) = env("oom") else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let vm = env.backend.create(&spec(64)).await.expect("guest boots");
    let out = run(
        &vm,
        &job(serde_json::json!({"runtime": "python", "code":
            "x = []\nwhile True: x.append(bytearray(8 << 20))",
            "limits": {"memory_mb": 64, "timeout_ms": 60000}})),
    )
    .await;
    assert_eq!(out.result.outcome, Outcome::Oom, "{:?}", out.result);
    assert_eq!(out.result.signal, Some(9));
    assert!(vm.oom_kills() >= 1);
    // The guest's kernel killed the job; the agent and the VM are fine.
    assert!(vm.agent().ping(Duration::from_secs(5)).await.is_ok());
    let ok = run(
        &vm,
        &job(serde_json::json!({"runtime": "bash", "code": "echo still here"})),
    )
    .await;
    assert_eq!(ok.result.stdout, "still here\n", "{:?}", ok.result);
    vm.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_internet_the_guest_reaches_no_host_listener() {
    let Some(env) = env("net") else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let vm = env.backend.create(&spec(128)).await.expect("guest boots");
    let code = format!(
        "import socket\nfor host in ['10.0.2.2', '192.168.0.1', '172.17.0.1', '8.8.8.8']:\n    try:\n        socket.create_connection((host, {port}), timeout=2)\n        print(host, 'CONNECTED')\n    except OSError as e:\n        print(host, 'failed', e.errno)\nimport os\nprint(sorted(os.listdir('/sys/class/net')), len(open('/proc/net/route').readlines()))"
    );
    let out = run(
        &vm,
        &job(
            serde_json::json!({"runtime": "python", "code": code, "limits": {"timeout_ms": 30000}}),
        ),
    )
    .await;
    assert_eq!(out.result.outcome, Outcome::Ok, "{:?}", out.result);
    assert!(
        !out.result.stdout.contains("CONNECTED"),
        "{}",
        out.result.stdout
    );
    // Only loopback, and no IPv4 route at all (the header line only).
    assert!(
        out.result.stdout.ends_with("['lo'] 1\n"),
        "the guest has an interface besides lo, or a route: {}",
        out.result.stdout
    );
    assert!(
        listener.accept().is_err(),
        "the host listener got a connection"
    );
    vm.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_kill_inside_the_guest_and_destroy_stops_a_runaway_guest() {
    let Some(env) = env("timeout") else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let vm = env.backend.create(&spec(128)).await.expect("guest boots");
    let t0 = Instant::now();
    let out = run(
        &vm,
        &job(
            serde_json::json!({"runtime": "python", "code": "while True: pass",
            "limits": {"timeout_ms": 1500}}),
        ),
    )
    .await;
    assert_eq!(out.result.outcome, Outcome::Timeout, "{:?}", out.result);
    assert!(!out.poisoned, "the agent answered after the kill");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(vm.agent().ping(Duration::from_secs(5)).await.is_ok());

    // A runaway guest (every vCPU busy, the agent not asked to stop): the
    // host's destroy, as at a TTL, ends it at once.
    let busy = job(
        serde_json::json!({"runtime": "bash", "code": "while :; do :; done",
        "limits": {"timeout_ms": 600000}}),
    );
    let table = RuntimeTable::default();
    let rt = table.resolve("bash").unwrap().clone();
    let ttl = tokio::time::timeout(
        Duration::from_secs(2),
        run_job(&vm, JobId::random(), &rt, &busy, false, &mut ()),
    )
    .await;
    assert!(ttl.is_err(), "the runaway job should still be running");
    let pid = vm.pid();
    let t1 = Instant::now();
    vm.destroy().await;
    assert!(!alive(pid));
    assert!(t1.elapsed() < Duration::from_secs(5), "{:?}", t1.elapsed());
    assert!(fs::read_dir(env.state.join("qemu"))
        .unwrap()
        .next()
        .is_none());
}

/// The pool's health check finds a guest whose agent died and replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_guest_is_detected_and_replaced_by_the_pool() {
    use kiln_warmpool::{Pool, TemplateKey, TemplateSettings};

    struct Vms(QemuBackend);
    impl kiln_warmpool::Factory for Vms {
        type Item = QemuVm;
        type Error = SandboxError;
        async fn create(&self, _: &TemplateKey) -> Result<QemuVm, SandboxError> {
            self.0.create(&spec(128)).await
        }
        async fn check(&self, vm: &mut QemuVm) -> bool {
            vm.agent().ping(Duration::from_secs(2)).await.is_ok()
        }
        async fn destroy(&self, vm: QemuVm) {
            vm.destroy().await
        }
    }

    let Some(env) = env("pool") else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let pool = Pool::new(Vms(env.backend.clone()));
    let key = TemplateKey::new("python");
    pool.set_template(
        key.clone(),
        TemplateSettings {
            min_idle: 0,
            max_total: 2,
            max_uses: 10,
            ..Default::default()
        },
    )
    .unwrap();
    let mut lease = pool.lease(&key).await.expect("first guest");
    lease.set_remove_on_exit(false);
    let first = lease.pid();
    drop(lease);
    // The agent dies with its guest (PID 1 gone means the guest is gone).
    // SAFETY: kill has no memory-safety preconditions; `first` is our QEMU.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lease = pool.lease(&key).await.expect("a replacement guest");
    assert_ne!(lease.pid(), first, "the dead guest was handed out");
    assert!(lease.agent().ping(Duration::from_secs(5)).await.is_ok());
    drop(lease);
    let report = pool.shutdown(Duration::from_secs(30)).await;
    assert_eq!(report.outstanding, 0, "{report:?}");
    assert!(fs::read_dir(env.state.join("qemu"))
        .unwrap()
        .next()
        .is_none());
}

/// An environment whose backend keeps templates in its own store.
fn template_env(test: &str) -> Option<Env> {
    let (kernel, rootfs) = guest_artefacts()?;
    let mut cfg = QemuConfig::new(kernel, rootfs, RuntimeTable::default());
    let state = std::env::temp_dir().join(format!("kiln-qemu-{}-{test}", std::process::id()));
    cfg.state_dir = state.clone();
    cfg.templates = Some(state.join("templates"));
    let backend = QemuBackend::new(cfg).expect("qemu backend");
    Some(Env { backend, state })
}

/// `Rss`, `Private_Dirty` and the size of QEMU's mapping of `file`, in KiB
/// (from `/proc/<pid>/smaps`).
fn mapping_kib(pid: u32, file: &Path) -> (u64, u64, u64) {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let name = file.to_string_lossy();
    let (mut rss, mut dirty, mut size) = (0, 0, 0);
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            inside = line.ends_with(name.as_ref());
            continue;
        }
        if !inside {
            continue;
        }
        let kib = || {
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match first {
            "Size:" => size += kib(),
            "Rss:" => rss += kib(),
            "Private_Dirty:" => dirty += kib(),
            _ => {}
        }
    }
    (rss, dirty, size)
}

/// What a job sees that must differ between two clones of one template.
const CLONE_PROBE: &str = r#"import json, os, socket, time, uuid, random
with open('/dev/urandom', 'rb') as f:
    kernel = f.read(16).hex()
print(json.dumps({"kernel_rng": kernel, "urandom": os.urandom(16).hex(),
    "uuid4": str(uuid.uuid4()), "random": random.random(),
    "hostname": socket.gethostname(), "id": os.environ.get("KILN_SANDBOX_ID"),
    "time": time.time(), "str_hash": hash("kiln")}))
"#;

/// The template path end to end: with no template a sandbox boots; two
/// concurrent builds make one template, whose state file holds no RAM;
/// sandboxes then restore from it, each with its own randomness, identity
/// and the right clock, served by the warm interpreter started before the
/// snapshot; timeouts still kill inside a restored guest; the template's
/// memory file is never written, and a restored VM's RSS grows only with
/// what it touches; destroy leaves nothing; a removed template serves no
/// more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_are_built_once_and_restored_clones_are_not_twins() {
    let Some(env) = template_env("clones") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let spec = spec(128);
    assert!(env.backend.capabilities().templates);

    let booted = env.backend.create(&spec).await.expect("guest boots");
    assert_eq!(booted.origin(), &Origin::Booted, "no template yet");
    booted.destroy().await;

    let lines = Mutex::new(Vec::<String>::new());
    let progress = |l: &str| {
        eprintln!("template: {l}");
        lines.lock().unwrap().push(l.to_owned());
    };
    let t0 = Instant::now();
    let (a, b) = tokio::join!(
        env.backend.prepare_template(&spec, &progress),
        env.backend.prepare_template(&spec, &progress)
    );
    eprintln!("two concurrent prepare_template calls: {:?}", t0.elapsed());
    let (a, b) = (a.expect("template built"), b.expect("template built"));
    assert_eq!(a.id, b.id);
    assert!(a.current);
    let lines = lines.into_inner().unwrap();
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("building template"))
            .count(),
        1,
        "two builds of one template: {lines:#?}"
    );
    assert_eq!(a.memory_bytes, (spec.memory_mb + 64) << 20);
    let vmstate = fs::metadata(a.dir.join("vmstate")).unwrap().len();
    assert!(
        vmstate * 16 < a.memory_bytes,
        "the device state ({vmstate} bytes) holds guest RAM"
    );
    assert!(
        !env.state.join("templates/building").exists()
            || fs::read_dir(env.state.join("templates/building"))
                .unwrap()
                .next()
                .is_none(),
        "the build left files"
    );
    let listed = env.backend.templates().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].current && listed[0].id == a.id);
    // Already current: nothing is built.
    let again = env
        .backend
        .prepare_template(&spec, &|l| assert!(!l.starts_with("building"), "{l}"))
        .await
        .unwrap();
    assert_eq!(again.id, a.id);

    let x = env.backend.create(&spec).await.expect("restore");
    let y = env.backend.create(&spec).await.expect("restore");
    for vm in [&x, &y] {
        assert_eq!(
            vm.origin(),
            &Origin::Restored {
                template: a.id.clone()
            }
        );
        eprintln!("restored to a set-up agent in {:?}", vm.boot_time());
    }
    let probe = job(serde_json::json!({"runtime": "python", "code": CLONE_PROBE}));
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let (ox, oy) = tokio::join!(run(&x, &probe), run(&y, &probe));
    let mut seen = Vec::new();
    for (vm, out) in [(&x, &ox), (&y, &oy)] {
        assert_eq!(out.result.outcome, Outcome::Ok, "{:?}", out.result);
        assert!(
            out.warm,
            "the warm interpreter of the template was not used"
        );
        let v: serde_json::Value = serde_json::from_str(&out.result.stdout).unwrap();
        assert_eq!(v["id"], vm.id().as_str());
        assert_eq!(v["hostname"], format!("kiln-{}", vm.id()));
        let skew = (v["time"].as_f64().unwrap() - host_now).abs();
        assert!(skew < 5.0, "the guest's clock is {skew} s off the host's");
        seen.push(v);
    }
    for field in ["kernel_rng", "urandom", "uuid4", "random", "hostname", "id"] {
        assert_ne!(
            seen[0][field], seen[1][field],
            "{field} is the same in two clones"
        );
    }
    // What cannot differ (docs/security.md, "Clones of a snapshot"): the
    // str hash seed of the interpreter that was running at snapshot time.
    assert_eq!(seen[0]["str_hash"], seen[1]["str_hash"]);

    // The host still ends what runs too long inside a restored guest.
    let out = run(
        &x,
        &job(
            serde_json::json!({"runtime": "python", "code": "while True: pass",
            "limits": {"timeout_ms": 1500}}),
        ),
    )
    .await;
    assert_eq!(out.result.outcome, Outcome::Timeout, "{:?}", out.result);
    assert!(x.agent().ping(Duration::from_secs(5)).await.is_ok());

    // Private mapping: only what the guest touched is resident.
    let memory = a.dir.join("memory");
    let (rss, dirty, size) = mapping_kib(y.pid(), &memory);
    eprintln!(
        "restored VM: {rss} KiB of its {size} KiB template mapping resident, {dirty} KiB copied on write; QEMU VmRSS {} KiB",
        rss_kib(y.pid()).0
    );
    assert_eq!(
        size,
        a.memory_bytes / 1024,
        "the template's memory is not mapped"
    );
    assert!(rss < size, "the whole template was loaded");

    for vm in [x, y] {
        let (pid, dir) = (vm.pid(), env.state.join("qemu").join(vm.id().as_str()));
        vm.destroy().await;
        assert!(!alive(pid), "QEMU survived destroy");
        assert!(!dir.exists(), "{} left behind", dir.display());
        assert!(crate::qemu::tests::processes_naming(&dir).is_empty());
    }
    // The published memory is what was published: restores write nothing.
    let store = kiln_snapshotter::store::SnapshotStore::open(env.state.join("templates")).unwrap();
    let snap = store
        .get(&kiln_snapshotter::store::SnapshotId::new(a.id.clone()).unwrap())
        .unwrap();
    snap.verify().expect("the template's files are unchanged");

    env.backend.remove_template(&a.id).unwrap();
    assert!(env.backend.templates().unwrap().is_empty());
    let vm = env.backend.create(&spec).await.expect("guest boots");
    assert_eq!(vm.origin(), &Origin::Booted, "a removed template served");
    vm.destroy().await;
}

/// A build whose VM dies halfway fails, naming what happened, and leaves
/// nothing: no VM directory, no build files, no template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_build_that_fails_leaves_nothing() {
    let Some(env) = template_env("failed-build") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let kill_qemu = |l: &str| {
        if let Some(pid) = l
            .strip_prefix("template VM started (QEMU pid ")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill has no memory-safety preconditions; the pid is
            // the template VM's QEMU, a child of this process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    };
    let e = env
        .backend
        .prepare_template(&spec(128), &kill_qemu)
        .await
        .expect_err("a build whose VM was killed succeeded");
    assert!(e.to_string().contains("QEMU exited"), "{e}");
    for dir in ["qemu-templates", "templates/building"] {
        let left: Vec<_> = fs::read_dir(env.state.join(dir))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "left: {left:?}");
    }
    assert!(env.backend.templates().unwrap().is_empty());
}

/// `VmRSS` and `RssShmem` of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssShmem:"))
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The numbers for BENCHMARKS.md: boot to agent-ready, warm exec latency
/// against the jail, memory per idle guest. Run with
/// `cargo test --release -p kiln-sandbox --lib qemu::guest_tests::measure -- --ignored --nocapture`
/// after `cargo build --release --bins` (the jail needs `kiln-agent`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a test: run by hand"]
async fn measure_boot_warm_exec_and_idle_memory() {
    let Some(env) = env("measure") else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let runs: usize = std::env::var("KILN_MEASURE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let table = RuntimeTable::default();
    let python = table.resolve("python").unwrap().clone();
    let print1 = job(serde_json::json!({"runtime": "python", "code": "print(1)"}));

    let mut boots = Vec::new();
    let mut creates = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let vm = env.backend.create(&spec(256)).await.unwrap();
        creates.push(t.elapsed().as_secs_f64() * 1000.0);
        boots.push(vm.boot_time().as_secs_f64() * 1000.0);
        vm.destroy().await;
    }
    println!(
        "accel {}: boot to agent listening p50 {:.0} ms (min {:.0}, max {:.0}); create incl. handshake p50 {:.0} ms",
        env.backend.accel().as_str(),
        percentile(&mut boots, 0.5),
        percentile(&mut boots, 0.0),
        percentile(&mut boots, 1.0),
        percentile(&mut creates, 0.5),
    );

    async fn warm_series<S: Sandbox>(
        s: &S,
        rt: &kiln_protocol::Runtime,
        j: &JobSpec,
        runs: usize,
    ) -> (Vec<f64>, usize) {
        let mut lat = Vec::new();
        let mut warm = 0;
        // Let the first interpreter finish starting.
        tokio::time::sleep(Duration::from_secs(3)).await;
        for _ in 0..runs {
            let t = Instant::now();
            let out = run_job(s, JobId::random(), rt, j, true, &mut ()).await;
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(out.result.stdout, "1\n");
            warm += out.warm as usize;
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        (lat, warm)
    }

    let vm = env.backend.create(&spec(256)).await.unwrap();
    let (mut q, qwarm) = warm_series(&vm, &python, &print1, runs).await;
    println!(
        "qemu warm print(1): p50 {:.1} ms p90 {:.1} ms max {:.1} ms ({qwarm}/{runs} warm)",
        percentile(&mut q, 0.5),
        percentile(&mut q, 0.9),
        percentile(&mut q, 1.0)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (mut rss, mut shm) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let (r, s) = rss_kib(vm.pid());
        rss.push(r as f64);
        shm.push(s as f64);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let vhost_pid = crate::qemu::tests::processes_naming(&env.state.join("qemu"))
        .into_iter()
        .find(|p| *p != vm.pid())
        .unwrap_or(0);
    println!(
        "idle guest (256 MiB job memory + 64 MiB overhead, python warm): QEMU VmRSS {:.0} MiB (of which guest RAM touched, RssShmem, {:.0} MiB); vhost-device-vsock VmRSS {:.1} MiB",
        percentile(&mut rss, 1.0) / 1024.0,
        percentile(&mut shm, 1.0) / 1024.0,
        rss_kib(vhost_pid).0 as f64 / 1024.0
    );
    vm.destroy().await;

    let exe = std::env::current_exe().unwrap();
    let agent = exe.parent().unwrap().parent().unwrap().join("kiln-agent");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !agent.is_file() {
        println!(
            "jail comparison skipped (needs root and {})",
            agent.display()
        );
        return;
    }
    let mut cfg = crate::jail::JailConfig::new(agent, table.clone());
    cfg.state_dir = env.state.clone();
    cfg.cgroup_parent = format!("kiln-measure-{}", std::process::id());
    let jail_backend = crate::jail::JailBackend::new(cfg).unwrap();
    let jail = jail_backend.create(&spec(256)).await.unwrap();
    let (mut j, jwarm) = warm_series(&jail, &python, &print1, runs).await;
    println!(
        "jail warm print(1): p50 {:.1} ms p90 {:.1} ms max {:.1} ms ({jwarm}/{runs} warm)",
        percentile(&mut j, 0.5),
        percentile(&mut j, 0.9),
        percentile(&mut j, 1.0)
    );
    jail.destroy().await;
    let _ = fs::remove_dir(env.state.join("jails"));
}

/// `Rss` and `Pss` of a process, in KiB (`/proc/<pid>/smaps_rollup`).
fn rss_pss_kib(pid: u32) -> (u64, u64) {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

/// The numbers for BENCHMARKS.md's "qemu templates": a template's build
/// time; create + first job result (`print(1)`), restored against booted,
/// alternating in one run; Rss and Pss of two idle restored VMs against
/// two idle booted ones. Run by hand with
/// `cargo test --release -p kiln-sandbox --lib qemu::guest_tests::measure_templates -- --ignored --nocapture`
/// (`KILN_MEASURE_RUNS`, default 10; `KILN_MEASURE_BUILDS`, default 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a test: run by hand"]
async fn measure_templates_restore_against_boot() {
    let Some(env) = template_env("measure-templates") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let var = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (runs, builds) = (var("KILN_MEASURE_RUNS", 10), var("KILN_MEASURE_BUILDS", 3));
    // The daemon's pool spec: default limits, python warm.
    let spec = SandboxSpec::for_job(&kiln_protocol::Limits::default(), "python");
    let booting = {
        let mut cfg = env.backend.config().clone();
        cfg.templates = None;
        QemuBackend::new(cfg).unwrap()
    };
    let print1 = job(serde_json::json!({"runtime": "python", "code": "print(1)"}));
    let python = RuntimeTable::default().resolve("python").unwrap().clone();

    let mut build_ms = Vec::new();
    let mut id = String::new();
    for i in 0..builds {
        if i > 0 {
            env.backend.remove_template(&id).unwrap();
        }
        let t = Instant::now();
        id = env
            .backend
            .prepare_template(&spec, &|l| eprintln!("template: {l}"))
            .await
            .unwrap()
            .id;
        build_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    let (mut boot, mut restore) = (Vec::new(), Vec::new());
    // Per kind: a second print(1) on the same VM (translation cache and
    // page faults of the job path taken by the first).
    let (mut boot_second, mut restore_second) = (Vec::new(), Vec::new());
    // Per kind: start, connect and setup of each sandbox.
    let (mut boot_ready, mut restore_ready) = (Vec::new(), Vec::new());
    let mut warm = (0, 0);
    for _ in 0..runs {
        for (backend, into, ready, second, restored) in [
            (
                &booting,
                &mut boot,
                &mut boot_ready,
                &mut boot_second,
                false,
            ),
            (
                &env.backend,
                &mut restore,
                &mut restore_ready,
                &mut restore_second,
                true,
            ),
        ] {
            let t = Instant::now();
            let vm = backend.create(&spec).await.unwrap();
            let out = run_job(&vm, JobId::random(), &python, &print1, true, &mut ()).await;
            into.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(out.result.stdout, "1\n", "{:?}", out.result);
            assert_eq!(matches!(vm.origin(), Origin::Restored { .. }), restored);
            let s = vm.start_timings().unwrap();
            ready.push([s.start_ms, s.connect_ms, s.setup_ms]);
            // The next warm interpreter starts after the first job.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let t = Instant::now();
            let again = run(&vm, &print1).await;
            second.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(again.result.stdout, "1\n", "{:?}", again.result);
            assert!(again.warm, "the second job ran cold");
            if out.warm {
                if restored {
                    warm.1 += 1
                } else {
                    warm.0 += 1
                }
            }
            vm.destroy().await;
        }
    }
    let (b, r) = (percentile(&mut boot, 0.5), percentile(&mut restore, 0.5));
    println!(
        "template build (python, {} MiB guest): median {:.1} s over {builds} (min {:.1}, max {:.1})",
        spec.memory_mb + 64,
        percentile(&mut build_ms, 0.5) / 1000.0,
        percentile(&mut build_ms, 0.0) / 1000.0,
        percentile(&mut build_ms, 1.0) / 1000.0,
    );
    for (name, steps) in [("boot", &boot_ready), ("restore", &restore_ready)] {
        let p50 = |i: usize| percentile(&mut steps.iter().map(|s| s[i]).collect::<Vec<_>>(), 0.5);
        let mut total: Vec<f64> = steps.iter().map(|s| s.iter().sum()).collect();
        println!(
            "{name}: QEMU start to set-up agent p50 {:.0} ms (start p50 {:.0}, connect {:.0}, handshake and setup {:.0})",
            percentile(&mut total, 0.5),
            p50(0),
            p50(1),
            p50(2)
        );
    }
    println!(
        "create + first print(1) result over {runs} alternating runs: boot p50 {b:.0} ms (min {:.0}, max {:.0}, {} warm), restore p50 {r:.0} ms (min {:.0}, max {:.0}, {} warm): {:.1}x",
        percentile(&mut boot, 0.0),
        percentile(&mut boot, 1.0),
        warm.0,
        percentile(&mut restore, 0.0),
        percentile(&mut restore, 1.0),
        warm.1,
        b / r
    );

    println!(
        "a second warm print(1) on the same VM, 2 s later: booted p50 {:.0} ms, restored p50 {:.0} ms",
        percentile(&mut boot_second, 0.5),
        percentile(&mut restore_second, 0.5)
    );

    // Two idle VMs of each kind at once, after their warm interpreters had
    // time to start (a booted guest starts its own after the handshake).
    for (name, backend) in [("booted", &booting), ("restored", &env.backend)] {
        let a = backend.create(&spec).await.unwrap();
        let c = backend.create(&spec).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        // QEMU and, for a booted VM, its vhost-device-vsock.
        let of = |vm: &QemuVm| {
            let dir = env.state.join("qemu").join(vm.id().as_str());
            crate::qemu::tests::processes_naming(&dir)
                .into_iter()
                .map(rss_pss_kib)
                .fold((0, 0), |(r, p), (r2, p2)| (r + r2, p + p2))
        };
        let ((ra, pa), (rc, pc)) = (of(&a), of(&c));
        println!(
            "two idle {name} VMs ({} MiB guest, python warm; QEMU + helpers): Rss {} + {} MiB, Pss {} + {} MiB",
            spec.memory_mb + 64,
            ra / 1024,
            rc / 1024,
            pa / 1024,
            pc / 1024
        );
        a.destroy().await;
        c.destroy().await;
    }
}

//! Kiln on Firecracker with real Linux guests, end to end: `kiln run
//! --backend firecracker` (a template built on first use, then every job
//! restored from it through Kiln's page server, recording and then
//! prefetching its working set), limits ending restored jobs as they end
//! booted ones, restored sandboxes that are clones with identities of
//! their own, booting when templates are off, a job in an OCI image booted
//! from the image's root disk, and `kiln serve --backend
//! firecracker` over HTTP (warm pool, TTL, remove-on-exit) and AMQP.
//!
//! **Opt-in: `KILN_FIRECRACKER_LINUX=1`.** It needs what this project's CI
//! machine lacks: a host whose KVM boots Linux guests (see
//! docs/firecracker.md, "Running Kiln with Firecracker on a KVM host, step
//! by step"). Without the variable each test prints `SKIPPED` and why.
//! With it, everything missing is a failure: root, `KILN_FIRECRACKER_BIN`,
//! `KILN_JAILER_BIN`, the guest kernel and image (`deploy/guest/build.sh`),
//! RabbitMQ for the AMQP test (`scripts/rabbitmq.sh start`). Jails and
//! templates go under `KILN_FIRECRACKER_TEST_DIR` (default `/var/tmp`),
//! which must be on the guest image's filesystem (the jailer hard-links).

mod amqp_support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use kiln_protocol::{JobResult, Outcome, SandboxStart};
use kiln_tests::server::Server;
use kiln_tests::{processes_matching, Scope};
use serde_json::{json, Value};

const OPT_IN: &str = "KILN_FIRECRACKER_LINUX";

/// One test's corner of a KVM host: the kiln scope (state directory), and a
/// directory on the guest image's filesystem for the jails and templates.
struct FcHost {
    scope: Scope,
    dir: PathBuf,
    flags: Vec<String>,
}

/// The test's host, or `None` (and a SKIPPED line saying why) without the
/// opt-in.
fn firecracker_host(test: &str) -> Option<FcHost> {
    if std::env::var(OPT_IN).as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED {test}: {OPT_IN} is not 1; this test needs a host whose KVM boots Linux guests, with Firecracker, its jailer and Kiln's guest (docs/firecracker.md, \"Running Kiln with Firecracker on a KVM host, step by step\")"
        );
        return None;
    }
    for var in ["KILN_FIRECRACKER_BIN", "KILN_JAILER_BIN"] {
        let set = std::env::var_os(var).map(PathBuf::from);
        assert!(
            set.as_ref().is_some_and(|p| p.is_file()),
            "{OPT_IN}=1 but {var} does not name a file"
        );
    }
    assert!(
        kiln_tests::has_guest(),
        "{OPT_IN}=1 but the guest kernel and image are missing (deploy/guest/build.sh)"
    );
    let base = std::env::var_os("KILN_FIRECRACKER_TEST_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let tag = format!("kiln-fc-{}-{test}", std::process::id());
    let dir = base.join(&tag);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("jail")).unwrap();
    // A uid range per test, so that tests running at once never share one.
    let hash = tag
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let first = 3_000_000 + (hash % 1000) * 100;
    let flags = vec![
        "--backend".into(),
        "firecracker".into(),
        "--firecracker-chroot-base".into(),
        dir.join("jail").to_string_lossy().into_owned(),
        "--snapshot-store".into(),
        dir.join("store").to_string_lossy().into_owned(),
        "--firecracker-uid-first".into(),
        first.to_string(),
        "--firecracker-uid-count".into(),
        "100".into(),
        "--firecracker-cgroup-parent".into(),
        tag.clone(),
    ];
    Some(FcHost {
        scope: Scope::new(&format!("fc-{test}")),
        dir,
        flags,
    })
}

impl FcHost {
    fn args<'a>(&'a self, more: &[&'a str]) -> Vec<&'a str> {
        let mut v: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        v.extend_from_slice(more);
        v
    }

    /// `kiln run <flags> <more> --json`, and a check that the sandbox left
    /// nothing behind.
    fn run(&self, more: &[&str]) -> (JobResult, i32) {
        let r = self.scope.run_json(&self.args(more));
        self.assert_clean();
        r
    }

    /// No VM record, jail, or process of this test is left.
    fn assert_clean(&self) {
        let left = kiln_tests::wait_empty(Duration::from_secs(20), || {
            let mut v: Vec<PathBuf> = Vec::new();
            for d in [
                self.scope.state_dir.join("firecracker"),
                self.dir.join("jail/firecracker"),
            ] {
                v.extend(
                    std::fs::read_dir(d)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| e.path()),
                );
            }
            v
        });
        assert!(left.is_empty(), "left on the host: {left:?}");
        let procs = processes_matching(&self.dir.to_string_lossy());
        assert!(procs.is_empty(), "processes left: {procs:?}");
    }

    /// `kiln template ls --json` of this test's store.
    fn templates(&self) -> Vec<Value> {
        let out = std::process::Command::new(kiln_tests::bin("kiln"))
            .args(["template", "ls", "--json", "--state-dir"])
            .arg(&self.scope.state_dir)
            .args(&self.flags)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for FcHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn how(r: &JobResult) -> Option<SandboxStart> {
    r.timings.sandbox.map(|s| s.how)
}

#[test]
fn kiln_run_builds_a_template_then_restores_each_job_from_it() {
    let Some(h) = firecracker_host("run") else {
        return;
    };
    for (rt, src, out, exit) in [
        (
            "python",
            "import platform; print(platform.release()[:4])",
            "6.1.",
            0,
        ),
        ("node", "console.log('n'); process.exit(3)", "n\n", 3),
        ("bash", "echo b; exit 4", "b\n", 4),
    ] {
        let (r, code) = h.run(&["--runtime", rt, "--timeout", "60s", "-c", src]);
        assert!(r.stdout.starts_with(out), "{rt}: {r:?}");
        assert_eq!(r.exit_code, Some(exit), "{rt}: {r:?}");
        assert_eq!(code, exit, "{rt}");
        assert_eq!(how(&r), Some(SandboxStart::Restore), "{rt}: {r:?}");
    }
    // The first python run recorded its template's working set; the next
    // one restores from the same template, prefetching it.
    let templates = h.templates();
    assert_eq!(templates.len(), 3, "{templates:?}");
    let python = templates
        .iter()
        .find(|t| t["inputs"]["warm"] == "python")
        .unwrap();
    assert_eq!(python["working_set"], true, "{python}");
    let (r, _) = h.run(&["--runtime", "python", "-c", "print(6 * 7)"]);
    assert_eq!(r.stdout, "42\n", "{r:?}");
    assert_eq!(how(&r), Some(SandboxStart::Restore));
    assert_eq!(h.templates().len(), 3, "no template was rebuilt");
}

#[test]
fn limits_end_restored_jobs_as_they_end_booted_ones() {
    let Some(h) = firecracker_host("limits") else {
        return;
    };
    let (r, code) = h.run(&[
        "--runtime",
        "python",
        "--timeout",
        "2s",
        "-c",
        "while True: pass",
    ]);
    assert_eq!((r.outcome, code), (Outcome::Timeout, 124), "{r:?}");
    let (r, code) = h.run(&[
        "--runtime",
        "python",
        "--memory",
        "64M",
        "--timeout",
        "60s",
        "-c",
        "x = []\nwhile True: x.append(bytearray(8 << 20))",
    ]);
    assert_eq!((r.outcome, code), (Outcome::Oom, 137), "{r:?}");
    let (r, code) = h.run(&[
        "--runtime",
        "bash",
        "--output-limit",
        "1000B",
        "--timeout",
        "60s",
        "-c",
        "yes",
    ]);
    assert_eq!((r.outcome, code), (Outcome::Killed, 137), "{r:?}");
    assert_eq!(r.stdout.len(), 1000);
}

#[test]
fn two_restores_of_one_template_are_different_machines_with_the_right_clock() {
    let Some(h) = firecracker_host("clones") else {
        return;
    };
    let probe = "import os, uuid, random, socket, time, json\nprint(json.dumps({'urandom': os.urandom(16).hex(), 'uuid': str(uuid.uuid4()), 'random': random.random(), 'host': socket.gethostname(), 'id': os.environ.get('KILN_SANDBOX_ID'), 'now': time.time()}))";
    let mut seen: Vec<Value> = Vec::new();
    for _ in 0..3 {
        let (r, _) = h.run(&["--runtime", "python", "--timeout", "60s", "-c", probe]);
        assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
        assert_eq!(how(&r), Some(SandboxStart::Restore), "{r:?}");
        let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
        let host_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let skew = (host_now - v["now"].as_f64().unwrap()).abs();
        assert!(skew < 30.0, "the restored guest's clock is {skew} s off");
        assert!(v["id"].as_str().is_some_and(|id| id.len() == 16), "{v}");
        seen.push(v);
    }
    // All three are restores of one snapshot (the first run built it),
    // and still differ in everything that must.
    for key in ["urandom", "uuid", "random", "host", "id"] {
        for (a, b) in [(0, 1), (1, 2), (0, 2)] {
            assert_ne!(seen[a][key], seen[b][key], "{key} repeats across restores");
        }
    }
}

#[test]
fn a_job_in_an_image_boots_from_the_images_root_disk_without_a_template() {
    let Some(h) = firecracker_host("image") else {
        return;
    };
    // The store on the chroot base's filesystem: the jailer hard-links the
    // image's disk into the VM's chroot, as it does the guest image.
    let layout = h.dir.join("layout");
    let (py, _) = kiln_tests::images::write_test_layout(&layout, "py", "bare", "fc-image");
    let images = h.dir.join("images");
    kiln_tests::images::kiln_image(&images, &["import", layout.to_str().unwrap()]);
    let code = format!(
        "import os; print(open('{}').read(), os.path.exists('/usr/bin/node'))",
        kiln_tests::images::MARKER_PATH
    );
    let (r, status) = h.run(&[
        "--images-dir",
        images.to_str().unwrap(),
        "--image",
        "py",
        "--runtime",
        "python",
        "--timeout",
        "60s",
        "-c",
        &code,
    ]);
    assert_eq!(
        (r.stdout.as_str(), status),
        ("fc-image False\n", 0),
        "{r:?}"
    );
    assert_eq!(r.image.as_deref(), Some(py.as_str()));
    assert_eq!(how(&r), Some(SandboxStart::Boot), "{r:?}");
    assert!(
        h.templates().is_empty(),
        "no template of an image on firecracker"
    );
}

#[test]
fn with_templates_off_each_sandbox_boots() {
    let Some(h) = firecracker_host("boot") else {
        return;
    };
    let (r, code) = h.run(&[
        "--snapshot-templates",
        "false",
        "--runtime",
        "python",
        "--timeout",
        "60s",
        "-c",
        "print('booted')",
    ]);
    assert_eq!((r.stdout.as_str(), code), ("booted\n", 0), "{r:?}");
    assert_eq!(how(&r), Some(SandboxStart::Boot), "{r:?}");
    assert!(h.templates().is_empty());
}

#[test]
fn kiln_serve_restores_pooled_sandboxes_and_ends_them_by_ttl_and_on_exit() {
    let Some(h) = firecracker_host("serve") else {
        return;
    };
    let args = h.args(&["--pool-runtimes", "python,node,bash", "--min-idle", "1"]);
    let mut s = Server::start_in(Scope::new("fc-serve-http"), &args);
    assert!(
        kiln_tests::wait_until(Duration::from_secs(300), || s
            .request("GET", "/readyz", None)
            .status
            == 200),
        "the pool never became ready"
    );
    for (rt, code, out, exit) in [
        ("python", "print(6 * 7)", "42\n", 0),
        ("node", "console.log(6 * 7); process.exit(3)", "42\n", 3),
        ("bash", "echo $((6 * 7)); exit 4", "42\n", 4),
    ] {
        let (status, r) = s.json(
            "POST",
            "/v1/jobs?wait=true",
            &json!({"runtime": rt, "code": code, "limits": {"timeout_ms": 60000}}),
        );
        assert_eq!(status, 200, "{rt}: {r}");
        assert_eq!(r["stdout"], out, "{rt}: {r}");
        assert_eq!(r["exit_code"], exit, "{rt}: {r}");
    }
    // A job whose sandbox outlives it (remove_on_exit=false) keeps its files.
    let rsp = s.request(
        "POST",
        "/v1/jobs?wait=true&remove_on_exit=false",
        Some(
            json!({"runtime": "python", "code": "open('/work/kept', 'w').write('yes')"})
                .to_string()
                .as_bytes(),
        ),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    let kept = rsp
        .header("Kiln-Sandbox")
        .expect("the kept sandbox's id")
        .to_owned();
    let (_, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{kept}/exec"),
        &json!({"code": "print(open('/work/kept').read())"}),
    );
    assert_eq!(r["stdout"], "yes\n", "{r}");
    assert_eq!(
        s.request("DELETE", &format!("/v1/sandboxes/{kept}"), None)
            .status,
        204
    );

    // remove_on_exit: the workspace goes after its first exec.
    let (status, sb) = s.json(
        "POST",
        "/v1/sandboxes",
        &json!({"template": "bash", "remove_on_exit": true}),
    );
    assert_eq!(status, 201, "{sb}");
    let once = sb["id"].as_str().unwrap().to_owned();
    let (_, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{once}/exec"),
        &json!({"code": "echo once"}),
    );
    assert_eq!(r["stdout"], "once\n", "{r}");
    assert!(
        kiln_tests::wait_until(Duration::from_secs(20), || s
            .request("GET", &format!("/v1/sandboxes/{once}"), None)
            .status
            == 404),
        "the remove-on-exit workspace is still there"
    );

    // The TTL ends a runaway guest from the host.
    let (status, sb) = s.json(
        "POST",
        "/v1/sandboxes",
        &json!({"template": "python", "ttl_s": 5}),
    );
    assert_eq!(status, 201, "{sb}");
    let id = sb["id"].as_str().unwrap().to_owned();
    let (_, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"code": "while True: pass", "limits": {"timeout_ms": 60000}}),
    );
    assert_eq!(r["outcome"], "killed", "{r}");
    let vm = s.scope.state_dir.join("firecracker").join(&id);
    assert!(
        kiln_tests::wait_until(Duration::from_secs(20), || !vm.exists()),
        "the expired guest is still there"
    );

    s.term(Duration::from_secs(60));
    let left: Vec<_> = std::fs::read_dir(s.scope.state_dir.join("firecracker"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left after shutdown: {left:?}");
    h.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_serve_answers_amqp_jobs_from_restored_guests_once() {
    let Some(h) = firecracker_host("amqp") else {
        return;
    };
    let names = amqp_support::Names::new("fc-amqp");
    let producer = amqp_support::Producer::new(&names).await;
    let mut extra = h.flags.clone();
    extra.extend(["--pool-runtimes", "python,bash", "--min-idle", "1"].map(String::from));
    let mut server = amqp_support::serve("fc-amqp", &names, &extra);
    amqp_support::guest_jobs_answered_once(producer, "fa", Duration::from_secs(300)).await;
    assert!(server.term(Duration::from_secs(60)).success());
    names.delete().await;
    h.assert_clean();
}

//! qemu templates seen from outside, with the real `kiln` binary: `kiln
//! template build` builds one template once (a second build finds it),
//! `ls` lists it as current and `rm` removes it; `kiln run` and `kiln
//! serve` then serve jobs from guests *restored* from it (their QEMU was
//! started with `-incoming`, the results say `restore`), including a
//! workspace with a TTL and one removed on exit; what a SIGKILLed server
//! or template build left is reaped by `kiln reap`, and nothing stays.
//!
//! Each test keeps its templates in a store of its own (`--snapshot-store`
//! under its scope). Needs root, QEMU, vhost-device-vsock and the guest
//! artefacts; without the artefacts it says SKIPPED, unless
//! `KILN_REQUIRE_GUEST=1`.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use kiln_protocol::{JobResult, Outcome};
use kiln_tests::server::Server;
use kiln_tests::{bin, processes_matching, wait_empty, Scope};
use serde_json::{json, Value};

/// The qemu backend with `scope`'s own template store (the state
/// directory is added by each command).
fn qemu_flags(scope: &Scope) -> Vec<String> {
    vec![
        "--backend".into(),
        "qemu".into(),
        "--snapshot-store".into(),
        store(scope).to_string_lossy().into_owned(),
    ]
}

fn store(scope: &Scope) -> PathBuf {
    scope.state_dir.join("templates")
}

/// `kiln template <args>` in `scope`.
fn template(scope: &Scope, args: &[&str]) -> Output {
    Command::new(bin("kiln"))
        .arg("template")
        .args(args)
        .args(qemu_flags(scope))
        .arg("--state-dir")
        .arg(&scope.state_dir)
        .stdin(Stdio::null())
        .output()
        .expect("running kiln template")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every VM directory of `scope` (sandboxes and template builds).
fn vm_dirs(scope: &Scope) -> Vec<PathBuf> {
    ["qemu", "qemu-templates"]
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(scope.state_dir.join(d))
                .into_iter()
                .flatten()
        })
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// What is left of `scope`'s VMs: directories, files of template builds,
/// processes naming the state directory.
fn leftovers(scope: &Scope) -> Vec<String> {
    let mut v: Vec<String> = vm_dirs(scope)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    v.extend(
        std::fs::read_dir(store(scope).join("building"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().display().to_string()),
    );
    v.extend(
        processes_matching(&scope.state_dir.to_string_lossy())
            .iter()
            .map(|p| format!("process {p}")),
    );
    v
}

/// `kiln reap` for `scope`, which must succeed.
fn reap(scope: &Scope) {
    let out = Command::new(bin("kiln"))
        .args(["reap", "--state-dir"])
        .arg(&scope.state_dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    ok(&out);
}

/// Whether QEMU of the VM in `dir` was started to restore a template.
fn restored(dir: &Path) -> bool {
    processes_matching(&dir.to_string_lossy())
        .iter()
        .filter_map(|p| std::fs::read(format!("/proc/{p}/cmdline")).ok())
        .any(|c| String::from_utf8_lossy(&c).contains("-incoming\0defer"))
}

#[test]
fn kiln_template_builds_once_kiln_run_restores_and_rm_removes() {
    if !kiln_tests::has_guest() {
        return;
    }
    let scope = Scope::new("qemu-template-cli");
    let built = template(&scope, &["build", "--runtime", "python", "--json"]);
    let info: Value = serde_json::from_str(&ok(&built)).unwrap();
    let id = info["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("qemu-python-"), "{info}");
    assert!(
        String::from_utf8_lossy(&built.stderr).contains("building template"),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    // The second build finds it.
    let again = template(&scope, &["build", "--runtime", "python"]);
    assert_eq!(ok(&again).trim(), id);
    assert!(
        !String::from_utf8_lossy(&again.stderr).contains("building template"),
        "built twice: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    let listed: Value = serde_json::from_str(&ok(&template(&scope, &["ls", "--json"]))).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["current"], true, "{listed}");

    // kiln run restores the job's guest from it.
    let mut args = qemu_flags(&scope);
    args.extend(
        [
            "-r",
            "python",
            "-c",
            "import os; print(os.environ['KILN_SANDBOX_ID'] != '')",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = scope
        .command(&args, &["--json", "--no-stdin"])
        .env("RUST_LOG", "kiln_sandbox=info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let r: JobResult = serde_json::from_slice(&out.stdout).unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{r:?}\n{log}");
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.stdout, "True\n");
    assert!(
        log.contains("guest restored") && log.contains(&id),
        "the job's guest was not restored from {id}:\n{log}"
    );
    assert!(leftovers(&scope).is_empty(), "{:?}", leftovers(&scope));

    ok(&template(&scope, &["rm", &id]));
    let listed: Value = serde_json::from_str(&ok(&template(&scope, &["ls", "--json"]))).unwrap();
    assert_eq!(listed, json!([]));
    let _ = std::fs::remove_dir_all(&scope.state_dir);
}

#[test]
fn serve_restores_pooled_and_workspace_guests_and_reap_cleans_up_after_sigkill() {
    if !kiln_tests::has_guest() {
        return;
    }
    let scope = Scope::new("qemu-template-serve");
    // The pool's template, built ahead (as `kiln serve` would at start-up).
    ok(&template(&scope, &["build", "--runtime", "python"]));
    let flags = qemu_flags(&scope);
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(["--pool-runtimes", "python", "--min-idle", "1"]);
    let mut s = Server::start_in(scope, &args);
    assert!(
        kiln_tests::wait_until(Duration::from_secs(60), || s
            .request("GET", "/readyz", None)
            .status
            == 200),
        "the pool never became ready"
    );
    let idle = vm_dirs(&s.scope);
    assert_eq!(idle.len(), 1, "{idle:?}");
    assert!(
        restored(&idle[0]),
        "the pooled guest was booted, not restored"
    );

    let (status, r) = s.json(
        "POST",
        "/v1/jobs?wait=true",
        &json!({"runtime": "python", "code": "print(6 * 7)"}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["stdout"], "42\n", "{r}");
    assert_eq!(r["timings"]["acquire"], "warm", "{r}");

    // A workspace removed when its first exec ends, on a restored guest.
    let (status, sb) = s.json(
        "POST",
        "/v1/sandboxes",
        &json!({"template": "python", "ttl_s": 600, "remove_on_exit": true}),
    );
    assert_eq!(status, 201, "{sb}");
    let id = sb["id"].as_str().unwrap().to_owned();
    let dir = s.scope.state_dir.join("qemu").join(&id);
    assert!(restored(&dir), "the workspace's guest was not restored");
    let (_, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"code": "print('once')"}),
    );
    assert_eq!(r["stdout"], "once\n", "{r}");
    assert!(
        kiln_tests::wait_until(Duration::from_secs(10), || !dir.exists()
            && processes_matching(&dir.to_string_lossy()).is_empty()),
        "the workspace outlived its exec"
    );
    assert_eq!(
        s.request("GET", &format!("/v1/sandboxes/{id}"), None)
            .status,
        404
    );

    // A workspace whose exec never ends: its TTL ends the restored guest.
    let (status, sb) = s.json(
        "POST",
        "/v1/sandboxes",
        &json!({"template": "python", "ttl_s": 3}),
    );
    assert_eq!(status, 201, "{sb}");
    let id = sb["id"].as_str().unwrap().to_owned();
    let dir = s.scope.state_dir.join("qemu").join(&id);
    assert!(restored(&dir), "the workspace's guest was not restored");
    let (_, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"code": "while True: pass", "limits": {"timeout_ms": 60000}}),
    );
    assert_eq!(r["outcome"], "killed", "{r}");
    assert!(
        kiln_tests::wait_until(Duration::from_secs(10), || !dir.exists()
            && processes_matching(&dir.to_string_lossy()).is_empty()),
        "the expired guest is still there"
    );

    // A crash: the restored guests die with the server (their QEMU has a
    // parent-death signal), their records stay for `kiln reap`.
    assert!(!vm_dirs(&s.scope).is_empty(), "no pooled guest to orphan");
    s.kill();
    let left = wait_empty(Duration::from_secs(10), || {
        processes_matching(&s.scope.state_dir.to_string_lossy())
    });
    assert!(left.is_empty(), "VMs outlived the server: {left:?}");
    reap(&s.scope);
    assert!(leftovers(&s.scope).is_empty(), "{:?}", leftovers(&s.scope));
    let _ = std::fs::remove_dir_all(&s.scope.state_dir);
}

#[test]
fn a_template_build_killed_midway_leaves_nothing_after_reap() {
    if !kiln_tests::has_guest() {
        return;
    }
    let scope = Scope::new("qemu-template-kill");
    let mut build = Command::new(bin("kiln"))
        .args(["template", "build", "--runtime", "python"])
        .args(qemu_flags(&scope))
        .arg("--state-dir")
        .arg(&scope.state_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed once the template VM runs and its memory file exists.
    let mut lines = BufReader::new(build.stderr.take().unwrap()).lines();
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .take(50)
        .any(|l| l.contains("template VM started"));
    let _ = build.kill();
    let _ = build.wait();
    assert!(started, "the build never started its VM");
    let building: Vec<_> = std::fs::read_dir(store(&scope).join("building"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(
        building.len(),
        1,
        "the build's files are not where expected"
    );
    // The template VM dies with its builder (a parent-death signal).
    let left = wait_empty(Duration::from_secs(10), || {
        processes_matching(&scope.state_dir.to_string_lossy())
    });
    assert!(
        left.is_empty(),
        "the template VM outlived its builder: {left:?}"
    );
    reap(&scope);
    assert!(leftovers(&scope).is_empty(), "{:?}", leftovers(&scope));
    let listed: Value = serde_json::from_str(&ok(&template(&scope, &["ls", "--json"]))).unwrap();
    assert_eq!(listed, json!([]), "a killed build published something");
    let _ = std::fs::remove_dir_all(&scope.state_dir);
}

//! OCI images as the root of qemu microVMs, end to end through the `kiln`
//! binary: an image built from host files (the host's Python and a marker
//! file, tests/src/images.rs) is pushed to a real registry on loopback
//! with skopeo, pulled by `kiln image pull`, and `kiln run --backend qemu
//! --image` runs Python in a real Linux guest booted from the image's root
//! disk: the marker is there, the files of the host and of Kiln's own
//! guest image are not, the image's Env applies, the root is writable and
//! the writes die with the guest. The disk is built once and reused; a
//! template made for the image restores sandboxes of that image only; and
//! `kiln serve` with the image as the runtime's default pools guests of it,
//! builds the image's template, and serves a job warm from the pool.
//!
//! Needs root, QEMU, vhost-device-vsock, docker-registry, skopeo and the
//! guest artefacts (the newest in `KILN_GUEST_CACHE`, default
//! /var/cache/kiln/guest). Without the artefacts the tests say SKIPPED,
//! unless `KILN_REQUIRE_GUEST=1`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kiln_protocol::{JobResult, Outcome};
use kiln_tests::images::{kiln_image, write_test_layout, MARKER_PATH, PYTHON, WRITABLE_DIR};
use kiln_tests::registry::Registry;
use kiln_tests::server::Server;
use kiln_tests::{processes_matching, Scope};
use serde_json::json;

/// A store under `s` holding the test's Python image, pulled by tag from a
/// registry on loopback; returns the store, the tag and the digest.
fn pulled(s: &Scope, marker: &str) -> (PathBuf, String, String) {
    let layout = s.state_dir.join("layout");
    write_test_layout(&layout, "py", "bare", marker);
    let reg = Registry::start(&s.state_dir.join("registry"), None);
    reg.push(&layout, "py", "kiln/python:3");
    let tag = format!("{}/kiln/python:3", reg.host);
    let images = s.state_dir.join("images");
    kiln_image(&images, &["pull", "--insecure", &tag]);
    let listed: serde_json::Value =
        serde_json::from_str(&kiln_image(&images, &["ls", "--json"])).unwrap();
    let digest = listed[0]["digest"].as_str().unwrap().to_owned();
    (images, tag, digest)
}

/// `kiln run --backend qemu --json <args>` in `s`, with `RUST_LOG` at info
/// for the sandbox crate; the result, the exit code and the log.
fn run(s: &Scope, args: &[&str]) -> (JobResult, i32, String) {
    let mut all = vec!["--backend", "qemu", "--timeout", "120s"];
    all.extend_from_slice(args);
    let out = s
        .command(&all, &["--json", "--no-stdin"])
        .env("RUST_LOG", "kiln_sandbox=info")
        .stdin(Stdio::null())
        .output()
        .expect("running kiln run");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let r: JobResult = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "kiln run did not print a JobResult ({e}); stdout: {} stderr: {log}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_clean(s);
    (r, out.status.code().unwrap_or(-1), log)
}

/// Nothing of the VMs left: no directory under the state dir, no process
/// naming it.
fn assert_clean(s: &Scope) {
    let left: Vec<_> = ["qemu", "qemu-templates"]
        .iter()
        .flat_map(|d| std::fs::read_dir(s.state_dir.join(d)).into_iter().flatten())
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left on the host: {left:?}");
    let procs = processes_matching(&s.state_dir.to_string_lossy());
    assert!(procs.is_empty(), "processes left: {procs:?}");
}

/// The root disks in the store `images`.
fn disks(images: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(images.join("disks"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "ext4"))
        .collect()
}

#[test]
fn python_from_a_pulled_image_runs_in_a_guest_booted_from_the_images_disk() {
    if !kiln_tests::has_guest() {
        return;
    }
    let s = Scope::new("qemu-image-boot");
    let (images, tag, digest) = pulled(&s, "pulled-for-qemu");
    let code = format!(
        "import os, platform, sys\n\
         print(open('{MARKER_PATH}').read())\n\
         print(platform.release().startswith('6.1.'), os.getuid())\n\
         print(sys.executable, os.path.exists('/usr/lib/python3/dist-packages'), os.path.exists('/usr/bin/node'))\n\
         print(sorted(os.listdir('/usr/bin')))\n\
         print(os.environ.get('KILN_IMAGE_ENV'))\n\
         open('{WRITABLE_DIR}/written', 'w').write('x')\n\
         print(os.path.exists('{WRITABLE_DIR}/written'))\n"
    );
    let (r, status, log) = run(
        &s,
        &[
            "--snapshot-templates",
            "false",
            "--images-dir",
            images.to_str().unwrap(),
            "--image",
            &tag,
            "-r",
            "python",
            "-c",
            &code,
        ],
    );
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}\n{log}");
    assert_eq!(status, 0);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "pulled-for-qemu", "{}", r.stdout);
    // The guest's kernel, the job's own uid.
    assert_eq!(lines[1], "True 1000", "{}", r.stdout);
    assert_eq!(
        lines[2],
        format!("{PYTHON} False False"),
        "neither the host's nor the guest image's files may be visible"
    );
    assert!(
        lines[3].contains("'python3'") && !lines[3].contains("'bash'"),
        "only the image's /usr/bin: {}",
        lines[3]
    );
    assert_eq!(
        lines[4], "from-the-image",
        "the image's Env reaches the job"
    );
    assert_eq!(lines[5], "True", "the root is writable");
    assert_eq!(r.image.as_deref(), Some(digest.as_str()));
    assert!(
        log.contains("guest agent is listening"),
        "not booted:\n{log}"
    );
    let built = disks(&images);
    assert_eq!(built.len(), 1, "{built:?}");
    let hex = digest.trim_start_matches("sha256:");
    assert!(
        built[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&format!("{hex}-")),
        "{built:?}"
    );
    let made = std::fs::metadata(&built[0]).unwrap().modified().unwrap();

    // By digest: the same disk, not rebuilt; a fresh guest, without the
    // first one's write, whose root takes the sandbox's disk size (more
    // than the 64 MiB a guest boots with).
    let (r, _, log) = run(
        &s,
        &[
            "--snapshot-templates",
            "false",
            "--disk",
            "128M",
            "--images-dir",
            images.to_str().unwrap(),
            "--image",
            &digest,
            "-r",
            "python",
            "-c",
            &format!(
                "import os\n\
                 print(open('{MARKER_PATH}').read(), os.path.exists('{WRITABLE_DIR}/written'))\n\
                 open('{WRITABLE_DIR}/big', 'wb').write(b'x' * (96 << 20))\n\
                 s = os.statvfs('/')\n\
                 print(os.path.getsize('{WRITABLE_DIR}/big') >> 20, s.f_blocks * s.f_frsize >> 20)\n"
            ),
        ],
    );
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}\n{log}");
    assert_eq!(r.stdout, "pulled-for-qemu False\n96 128\n");
    assert_eq!(disks(&images), built);
    assert_eq!(
        std::fs::metadata(&built[0]).unwrap().modified().unwrap(),
        made
    );

    // gc keeps the disk of a stored image, and removes it with the image.
    let gc: serde_json::Value =
        serde_json::from_str(&kiln_image(&images, &["gc", "--json"])).unwrap();
    assert_eq!(gc["disks_removed"], 0, "{gc}");
    kiln_image(&images, &["rm", &tag]);
    let gc: serde_json::Value =
        serde_json::from_str(&kiln_image(&images, &["gc", "--json"])).unwrap();
    assert_eq!(gc["disks_removed"], 1, "{gc}");
    assert!(disks(&images).is_empty());
}

#[test]
fn a_template_made_for_an_image_restores_sandboxes_of_that_image_only() {
    if !kiln_tests::has_guest() {
        return;
    }
    let s = Scope::new("qemu-image-template");
    let (images, tag, _) = pulled(&s, "templated");
    let store = s.state_dir.join("templates");
    let code = format!("import os; print(os.path.exists('{MARKER_PATH}'))");
    let args = |image: Option<&str>| -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--snapshot-store".into(),
            store.to_string_lossy().into_owned(),
            "--images-dir".into(),
            images.to_string_lossy().into_owned(),
        ];
        if let Some(i) = image {
            a.extend(["--image".into(), i.into()]);
        }
        a.extend(["-r".into(), "python".into(), "-c".into(), code.clone()]);
        a
    };
    let strs = |v: &[String]| v.iter().map(String::clone).collect::<Vec<_>>();

    // The first job of the image builds its template, then restores from it.
    let a = strs(&args(Some(&tag)));
    let (r, _, log) = run(&s, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}\n{log}");
    assert_eq!(r.stdout, "True\n", "the image's marker");
    let built = template_built(&log);
    assert!(
        built.contains("-img"),
        "not a template of the image: {built}\n{log}"
    );
    assert!(
        log.contains("guest restored") && log.contains(&built),
        "not restored from {built}:\n{log}"
    );

    // A job of the same runtime and size without the image must not get
    // the image's template: it builds and restores its own, on Kiln's
    // guest image (no marker there).
    let b = strs(&args(None));
    let (r, _, log) = run(&s, &b.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}\n{log}");
    assert_eq!(r.stdout, "False\n", "the guest image's own root");
    let own = template_built(&log);
    assert!(!own.contains("-img") && own != built, "{own}\n{log}");
    assert!(!log.contains(&built), "the image's template served:\n{log}");

    // The image's again: its template is there and serves at once.
    let (r, _, log) = run(&s, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(r.stdout, "True\n", "{r:?}\n{log}");
    assert!(!log.contains("building template"), "built twice:\n{log}");
    assert!(
        log.contains(&format!("template {built} is current")),
        "{log}"
    );
}

#[test]
fn serve_pools_guests_of_a_runtimes_default_image_and_builds_its_template() {
    if !kiln_tests::has_guest() {
        return;
    }
    let scope = Scope::new("qemu-image-serve");
    let (images, tag, digest) = pulled(&scope, "served-by-qemu");
    let config = scope.state_dir.join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "[images]\ndir = {:?}\n[images.defaults]\npython = {tag:?}\n",
            images.display().to_string()
        ),
    )
    .unwrap();
    let templates = scope.state_dir.join("templates");
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--backend",
        "qemu",
        "--snapshot-store",
        templates.to_str().unwrap(),
        "--pool-runtimes",
        "python",
        "--min-idle",
        "1",
    ];
    let mut s = Server::start_in(scope, &args);
    // A spare of the image (booted, or restored once the template is).
    assert!(
        kiln_tests::wait_until(Duration::from_secs(180), || s
            .request("GET", "/readyz", None)
            .status
            == 200),
        "the pool never became ready"
    );
    // The image's template, built in the background at start-up.
    let hex = digest.trim_start_matches("sha256:");
    let published = || -> Vec<String> {
        std::fs::read_dir(templates.join("snapshots"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert!(
        kiln_tests::wait_until(Duration::from_secs(180), || !published().is_empty()),
        "no template was published"
    );
    let built = published();
    assert!(
        built.len() == 1 && built[0].contains(&format!("-img{}", &hex[..12])),
        "the pool's template is not the image's: {built:?}"
    );
    let code = format!("print(open('{MARKER_PATH}').read(), end='')");
    let (status, r) = s.json(
        "POST",
        "/v1/jobs?wait=true",
        &json!({"runtime": "python", "code": code}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(r["stdout"], "served-by-qemu", "{r}");
    assert_eq!(r["image"], digest.as_str(), "{r}");
    assert_eq!(r["timings"]["acquire"], "warm", "{r}");
    let st = s.term(Duration::from_secs(60));
    assert!(st.success(), "kiln serve exited with {st}");
    assert_clean(&s.scope);
    let _ = std::fs::remove_dir_all(&s.scope.state_dir);
}

/// The id of the template `kiln run` said it built.
fn template_built(log: &str) -> String {
    let line = log
        .lines()
        .find(|l| l.contains("building template"))
        .unwrap_or_else(|| panic!("no template was built:\n{log}"));
    line.split_whitespace()
        .skip_while(|w| *w != "template")
        .nth(1)
        .unwrap_or_else(|| panic!("no id in {line:?}"))
        .to_owned()
}

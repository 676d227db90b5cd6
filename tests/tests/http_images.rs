//! Images over the HTTP API of a real `kiln serve` (jail backend): the
//! stored images in `GET /v1/images`, a job in an image through
//! `POST /v1/jobs` with the image's digest in its result, a workspace
//! rooted in an image whose root keeps a job's writes for its life, and
//! unknown images or images without the runtime refused with a 4xx
//! naming them. The images are made from host files (tests/src/images.rs).

use kiln_tests::images::{kiln_image, static_agent, write_test_layout, MARKER_PATH, WRITABLE_DIR};
use kiln_tests::server::Server;
use kiln_tests::Scope;
use serde_json::{json, Value};

const PY: &str = "kiln.test/python:3";
const BARE: &str = "kiln.test/bare:1";

/// A server whose image store holds the two test images; the Python
/// image's digest.
fn server(test: &str) -> (Server, String) {
    server_with(test, "", &["--min-idle", "0"])
}

/// The same, with `config` as the `[images]` section's other keys.
fn server_with(test: &str, config: &str, flags: &[&str]) -> (Server, String) {
    let scope = Scope::new(test);
    let layout = scope.state_dir.join("layout");
    let (py, _) = write_test_layout(&layout, PY, BARE, "served");
    let images = scope.state_dir.join("images");
    kiln_image(&images, &["import", layout.to_str().unwrap()]);
    let agent = static_agent();
    let config_file = scope.state_dir.join("kiln.toml");
    std::fs::write(
        &config_file,
        format!(
            "[images]\ndir = {:?}\n{config}",
            images.display().to_string()
        ),
    )
    .unwrap();
    let mut args = vec![
        "--config",
        config_file.to_str().unwrap(),
        "--agent",
        agent.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    let s = Server::start_in(scope, &args);
    (s, py.to_string())
}

#[test]
fn jobs_run_in_images_named_by_the_api_and_unknown_ones_are_refused() {
    let (s, digest) = server("http-images-jobs");
    let (st, v) = s.json("GET", "/v1/images", &Value::Null);
    assert_eq!(st, 200, "{v}");
    let listed = v["images"].as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|i| i["name"] == PY && i["digest"] == digest.as_str()),
        "{v}"
    );
    let code = format!("print(open('{MARKER_PATH}').read())");
    let (st, r) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "python", "code": code, "image": PY}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(r["stdout"], "served\n");
    assert_eq!(r["image"], digest.as_str());
    let metrics = s.request("GET", "/metrics", None).text();
    assert!(
        metrics.contains(&format!("kiln_image_jobs_total{{image=\"{digest}\"}} 1")),
        "{metrics}"
    );
    // Kept as a workspace, the sandbox says which image it is.
    let r = s.request(
        "POST",
        "/v1/jobs?remove_on_exit=false",
        Some(
            json!({"runtime": "python", "code": "print(1)", "image": PY})
                .to_string()
                .as_bytes(),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let kept = r
        .header("kiln-sandbox")
        .expect("a Kiln-Sandbox header")
        .to_owned();
    let (st, info) = s.json("GET", &format!("/v1/sandboxes/{kept}"), &Value::Null);
    assert_eq!(st, 200, "{info}");
    assert_eq!(info["image"], digest.as_str());
    // Without an image: the host root, and no digest.
    let (_, r) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "python", "code": code}),
    );
    assert_eq!(r["outcome"], "error", "the host has no marker: {r}");
    assert!(r.get("image").is_none(), "{r}");
    for (image, names) in [
        ("kiln.test/absent:1", "kiln.test/absent:1"),
        (BARE, "/usr/bin/python3"),
    ] {
        let (st, r) = s.json(
            "POST",
            "/v1/jobs",
            &json!({"runtime": "python", "code": "print(1)", "image": image}),
        );
        assert!((400..500).contains(&st), "{image}: {st} {r}");
        assert!(r.to_string().contains(names), "{image}: {r}");
    }
}

#[test]
fn a_workspace_rooted_in_an_image_keeps_its_root_writes_for_its_life() {
    let (s, digest) = server("http-images-ws");
    let (st, info) = s.json(
        "POST",
        "/v1/sandboxes",
        &json!({"template": "python", "image": PY, "ttl_s": 120}),
    );
    assert_eq!(st, 201, "{info}");
    assert_eq!(info["image"], digest.as_str());
    assert_eq!(info["env"]["KILN_IMAGE_ENV"], "from-the-image");
    let id = info["id"].as_str().unwrap();
    let exec = |code: String| {
        let (st, r) = s.json(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            &json!({"code": code}),
        );
        assert_eq!(st, 200, "{r}");
        r
    };
    let r = exec(format!("open('{WRITABLE_DIR}/kept', 'w').write('1')"));
    assert_eq!(r["outcome"], "ok", "{r}");
    let r = exec(format!(
        "import os; print(open('{WRITABLE_DIR}/kept').read(), os.environ['KILN_IMAGE_ENV'])"
    ));
    assert_eq!(r["stdout"], "1 from-the-image\n", "{r}");
    // Removed and collected while the workspace lives: its root stays.
    let images = s.scope.state_dir.join("images");
    let image = |args: &[&str]| kiln_image(&images, args);
    image(&["rm", PY]);
    let gc: Value = serde_json::from_str(&image(&["gc", "--json"])).unwrap();
    assert_eq!(
        (gc["roots_removed"].as_u64(), gc["roots_in_use"].as_u64()),
        (Some(0), Some(1)),
        "{gc}"
    );
    let r = exec(format!("print(open('{MARKER_PATH}').read())"));
    assert_eq!(
        r["stdout"], "served\n",
        "the workspace still has its root: {r}"
    );
    let r = s.request("DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(r.status, 204);
    let mut removed = 0;
    for _ in 0..100 {
        let gc: Value = serde_json::from_str(&image(&["gc", "--json"])).unwrap();
        removed += gc["roots_removed"].as_u64().unwrap();
        if removed == 1 {
            break;
        }
        // The jail's teardown finishes after the DELETE answers.
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(removed, 1, "the root goes once the workspace is gone");
    let (st, r) = s.json(
        "POST",
        "/v1/sandboxes",
        &json!({"template": "python", "image": BARE}),
    );
    assert_eq!(st, 400, "{r}");
    assert_eq!(r["error"]["field"], "image", "{r}");
    assert!(r.to_string().contains(BARE), "{r}");
}

#[test]
fn the_configuration_gives_a_runtime_its_default_image_and_limits_the_allowed_ones() {
    let (s, digest) = server_with(
        "http-images-config",
        "allowed = [\"kiln.test/python*\"]\n[images.defaults]\npython = \"kiln.test/python:3\"\n",
        &["--min-idle", "0"],
    );
    let code = format!("print(open('{MARKER_PATH}').read())");
    let (st, r) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "python", "code": code}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["stdout"], "served\n", "python's default image: {r}");
    assert_eq!(r["image"], digest.as_str());
    let (_, r) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "bash", "code": "echo host"}),
    );
    assert_eq!(r["outcome"], "ok", "bash keeps the host root: {r}");
    assert!(r.get("image").is_none(), "{r}");
    let (st, r) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "bash", "code": "true", "image": BARE}),
    );
    assert_eq!(st, 400, "{r}");
    assert!(r.to_string().contains("not allowed"), "{r}");
}

#[test]
fn the_pool_keeps_spares_of_a_default_image_and_uses_each_for_one_job() {
    let (s, digest) = server_with(
        "http-images-pool",
        "[images.defaults]\npython = \"kiln.test/python:3\"\n",
        &["--min-idle", "1", "--pool-runtimes", "python"],
    );
    // A spare idle in the pool (readyz latches once the pool first fills;
    // the pool's own gauge says when it has refilled).
    let ready = || {
        for _ in 0..1200 {
            let m = s.request("GET", "/metrics", None).text();
            if m.contains("kiln_pool_idle_sandboxes{template=\"python\"} 1") {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the pool did not fill within 60 s");
    };
    ready();
    let (st, r) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "python", "code": format!("open('{WRITABLE_DIR}/left', 'w').write('x'); print(open('{MARKER_PATH}').read())")}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["stdout"], "served\n", "{r}");
    assert_eq!(
        r["timings"]["acquire"], "warm",
        "a spare rooted in the image: {r}"
    );
    assert_eq!(r["image"], digest.as_str());
    ready();
    let (_, r) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "python", "code": format!("import os; print(os.path.exists('{WRITABLE_DIR}/left'))")}),
    );
    assert_eq!(r["timings"]["acquire"], "warm", "{r}");
    assert_eq!(
        r["stdout"], "False\n",
        "the first job's writes went with its sandbox: {r}"
    );
}

/// An OCI layout directory as one tar archive (what `skopeo copy …
/// oci-archive:…` writes).
fn tar_of(dir: &std::path::Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap()
}

/// The operator's side of `kiln image import|rm|gc` over the API: an
/// archive uploaded as the body is imported and listed, a body that is
/// no image archive and one above `import_max_mb` are refused saying
/// why, a name is removed (then unknown), and garbage collection frees
/// what only the removed image used.
#[test]
fn an_operator_imports_removes_and_collects_images_over_the_api() {
    use kiln_images::layout::{write_layout, LayoutImage};
    let (s, _) = server_with(
        "http-images-admin",
        "import_max_mb = 1\n",
        &["--min-idle", "0"],
    );
    let dir = std::env::temp_dir().join(format!("kiln-http-images-admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_layout(
        &dir.join("small"),
        &[LayoutImage {
            name: "kiln.test/uploaded:1",
            layers: vec![kiln_tests::images::file_layer(MARKER_PATH, "uploaded")],
            env: Vec::new(),
            working_dir: None,
        }],
    )
    .unwrap();
    let small = tar_of(&dir.join("small"));
    let r = s.request("POST", "/v1/images/import", Some(&small));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["images"][0]["name"], "kiln.test/uploaded:1", "{v}");
    let (_, listed) = s.json("GET", "/v1/images", &Value::Null);
    assert!(
        listed["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "kiln.test/uploaded:1"),
        "{listed}"
    );
    // Stored and known: a Python job in it is refused for the interpreter
    // it lacks, not for an unknown name.
    let (st, e) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "python", "code": "1", "image": "kiln.test/uploaded:1"}),
    );
    assert_eq!(st, 400, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("python3"),
        "{e}"
    );

    let r = s.request(
        "POST",
        "/v1/images/import",
        Some(b"not a tar archive at all"),
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "bad_archive");
    write_test_layout(
        &dir.join("big"),
        "kiln.test/big:1",
        "kiln.test/big-bare:1",
        "x",
    );
    let r = s.request("POST", "/v1/images/import", Some(&tar_of(&dir.join("big"))));
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));

    let (st, v) = s.json("DELETE", "/v1/images/kiln.test/uploaded:1", &Value::Null);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["removed"][0]["name"], "kiln.test/uploaded:1", "{v}");
    let (st, v) = s.json("DELETE", "/v1/images/kiln.test/uploaded:1", &Value::Null);
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );
    let (st, report) = s.json("POST", "/v1/images/gc", &Value::Null);
    assert_eq!(st, 200, "{report}");
    assert!(report["blobs_removed"].as_u64().unwrap() >= 3, "{report}");
    // The images the server started with are still there.
    let (_, listed) = s.json("GET", "/v1/images", &Value::Null);
    assert!(
        listed["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == PY),
        "{listed}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

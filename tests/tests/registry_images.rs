//! `kiln image pull` against a real registry on loopback (Debian's
//! docker-registry), with images built from host files and pushed with
//! skopeo: pulled by tag and by digest, a Python job run from the pulled
//! image; a registry behind basic auth, and one behind bearer tokens from a
//! token service of the test's own; a corrupted blob refused (digest
//! mismatch) and the pull restarted cleanly once the registry is repaired.
//! No public registry is involved.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_protocol::Outcome;
use kiln_tests::images::{static_agent, write_test_layout, MARKER_PATH};
use kiln_tests::registry::{Auth, Registry};
use kiln_tests::{bin, Scope};
use serde_json::Value;

fn kiln_image(images: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin("kiln"))
        .arg("image")
        .args(args)
        .arg("--images-dir")
        .arg(images)
        .env_remove("KILN_REGISTRY_USER")
        .env_remove("KILN_REGISTRY_PASSWORD")
        .envs(env.iter().copied())
        .output()
        .expect("spawning kiln image")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kiln image failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn listed(images: &Path) -> Vec<Value> {
    let out = ok(&kiln_image(images, &["ls", "--json"], &[]));
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn layout(s: &Scope, marker: &str) -> PathBuf {
    let dir = s.state_dir.join("layout");
    write_test_layout(&dir, "py", "bare", marker);
    dir
}

#[test]
fn an_image_pulled_by_tag_and_by_digest_runs_python_from_the_registry() {
    let s = Scope::new("pull-tag-digest");
    let layout = layout(&s, "pulled");
    let reg = Registry::start(&s.state_dir.join("registry"), None);
    reg.push(&layout, "py", "kiln/python:3");
    let by_tag = format!("{}/kiln/python:3", reg.host);
    let a = s.state_dir.join("images-a");
    ok(&kiln_image(&a, &["pull", "--insecure", &by_tag], &[]));
    let images = listed(&a);
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["name"], by_tag.as_str());
    let digest = images[0]["digest"].as_str().unwrap().to_owned();
    let agent = static_agent();
    let run = |store: &Path, image: &str| {
        s.run_json(&[
            "--agent",
            agent.to_str().unwrap(),
            "--images-dir",
            store.to_str().unwrap(),
            "--image",
            image,
            "--runtime",
            "python",
            "-c",
            &format!(
                "import os; print(open('{MARKER_PATH}').read(), os.path.exists('/usr/lib/python3/dist-packages'))"
            ),
        ])
    };
    let (r, _) = run(&a, &by_tag);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.stdout, "pulled False\n");
    assert_eq!(r.image.as_deref(), Some(digest.as_str()));
    // By digest, into another store: the same manifest.
    let by_digest = format!("{}/kiln/python@{digest}", reg.host);
    let b = s.state_dir.join("images-b");
    ok(&kiln_image(&b, &["pull", "--insecure", &by_digest], &[]));
    assert_eq!(listed(&b)[0]["digest"], digest.as_str());
    let (r, _) = run(&b, &by_digest);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    // Plain HTTP is for loopback registries only.
    let out = kiln_image(&b, &["pull", "--insecure", "registry.invalid/x:1"], &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only for a registry on loopback"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pushes an image to a registry started with `auth` for user `kiln`,
/// then pulls it: anonymously and with a wrong password (both refused,
/// nothing stored), then with the right one. `between`: checks after the
/// refusals.
fn pulls_only_with_the_credentials(name: &str, auth: Auth<'_>, between: impl Fn(&Registry)) {
    let password = match auth {
        Auth::Basic(_, p) | Auth::Token(_, p) => p,
        Auth::None => unreachable!("a registry with credentials"),
    };
    let s = Scope::new(name);
    let layout = layout(&s, "m");
    let reg = Registry::start_with(&s.state_dir.join("registry"), auth);
    reg.push(&layout, "bare", "kiln/bare:1");
    let r = format!("{}/kiln/bare:1", reg.host);
    let store = s.state_dir.join("images");
    let pull = |password: Option<&str>| {
        let env = password.map(|p| {
            [
                ("KILN_REGISTRY_USER", "kiln"),
                ("KILN_REGISTRY_PASSWORD", p),
            ]
        });
        kiln_image(
            &store,
            &["pull", "--insecure", &r],
            env.as_ref().map_or(&[][..], |e| &e[..]),
        )
    };
    assert!(!pull(None).status.success(), "an anonymous pull must fail");
    assert!(
        !pull(Some("wrong")).status.success(),
        "a wrong password must fail"
    );
    assert!(listed(&store).is_empty());
    between(&reg);
    ok(&pull(Some(password)));
    assert_eq!(listed(&store)[0]["name"], r.as_str());
}

#[test]
fn a_registry_behind_basic_auth_needs_the_credentials() {
    pulls_only_with_the_credentials("pull-auth", Auth::Basic("kiln", "s3cret"), |_| {});
}

/// A registry behind bearer tokens (the distribution token protocol, as
/// Docker Hub and GHCR use): the registry answers 401 with a challenge
/// naming the token service; Kiln asks it for a token with the
/// credentials and retries with the token. Without them, or with wrong
/// ones, the service refuses and nothing is stored.
#[test]
fn a_registry_behind_bearer_tokens_is_pulled_with_a_token_for_the_credentials() {
    pulls_only_with_the_credentials("pull-token", Auth::Token("kiln", "t0ken"), |reg| {
        let (issued, refused) = reg.token_counts();
        assert!(issued > 0, "skopeo's push went through the token service");
        assert!(refused > 0, "the token service refused the wrong password");
    });
}

#[test]
fn a_corrupted_blob_is_refused_and_the_pull_restarts_cleanly() {
    let s = Scope::new("pull-corrupt");
    let layout = layout(&s, "m");
    let reg = Registry::start(&s.state_dir.join("registry"), None);
    reg.push(&layout, "bare", "kiln/bare:1");
    let r = format!("{}/kiln/bare:1", reg.host);
    let store = s.state_dir.join("images");
    // Learn the layer's digest from a first pull, then forget everything.
    ok(&kiln_image(&store, &["pull", "--insecure", &r], &[]));
    let layer = listed(&store)[0]["layers"][0].as_str().unwrap().to_owned();
    ok(&kiln_image(&store, &["rm", &r], &[]));
    ok(&kiln_image(&store, &["gc"], &[]));
    let blob = reg.blob_file(layer.trim_start_matches("sha256:"));
    let good = std::fs::read(&blob).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    std::fs::write(&blob, &bad).unwrap();
    let out = kiln_image(&store, &["pull", "--insecure", &r], &[]);
    assert!(!out.status.success(), "a corrupted blob must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&layer) && err.to_lowercase().contains("digest"),
        "{err}"
    );
    assert!(listed(&store).is_empty());
    let hex = layer.trim_start_matches("sha256:");
    assert!(!store.join("blobs/sha256").join(hex).exists());
    // Repaired: the same pull now completes.
    std::fs::write(&blob, &good).unwrap();
    ok(&kiln_image(&store, &["pull", "--insecure", &r], &[]));
    assert!(store.join("blobs/sha256").join(hex).is_file());
}

#[test]
fn an_operator_pulls_over_the_api_and_jobs_run_in_the_image() {
    use kiln_tests::server::Server;
    use serde_json::json;
    let s = Scope::new("pull-api");
    let layout = layout(&s, "over-the-api");
    let reg = Registry::start(&s.state_dir.join("registry"), None);
    reg.push(&layout, "py", "kiln/python:3");
    let images = s.state_dir.join("images");
    let agent = static_agent();
    let server = Server::start_in(
        s,
        &[
            "--min-idle",
            "0",
            "--agent",
            agent.to_str().unwrap(),
            "--images-dir",
            images.to_str().unwrap(),
        ],
    );
    let reference = format!("{}/kiln/python:3", reg.host);
    let (st, image) = server.json(
        "POST",
        "/v1/images",
        &json!({"reference": reference, "insecure": true}),
    );
    assert_eq!(st, 201, "{image}");
    assert_eq!(image["name"], reference.as_str());
    let (st, r) = server.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "python", "image": reference, "code": format!("print(open('{MARKER_PATH}').read())")}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["stdout"], "over-the-api\n", "{r}");
    assert_eq!(r["image"], image["digest"]);
    let (st, r) = server.json(
        "POST",
        "/v1/images",
        &json!({"reference": format!("{}/kiln/absent:1", reg.host), "insecure": true}),
    );
    assert_eq!(st, 502, "{r}");
}

/// `[images] pull_on_use`: an image `allowed` lists is pulled when a job
/// first names it (once, however many jobs ask at the same time) and the
/// job runs in it; a name `allowed` does not list is refused at once; a
/// registry that never answers holds up only the job that named it (the
/// job waits for its pull without a run slot) until `pull_timeout_s`,
/// when it is rejected naming the pull.
#[test]
fn an_allowed_image_is_pulled_on_first_use_while_other_jobs_go_on() {
    use kiln_tests::server::Server;
    use serde_json::json;
    let s = Scope::new("pull-on-use");
    let layout = layout(&s, "first-use");
    let reg = Registry::start(&s.state_dir.join("registry"), None);
    reg.push(&layout, "py", "kiln/python:3");
    // A "registry" that never answers: the kernel completes the
    // connections (backlog), nobody reads or writes.
    let tarpit = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tarpit = tarpit.local_addr().map(|a| (tarpit, a)).unwrap();
    let images = s.state_dir.join("images");
    let config = s.state_dir.join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "[images]\ndir = {:?}\nallowed = [\"{}/kiln/*\", \"{}/kiln/*\"]\npull_on_use = true\npull_insecure = true\npull_timeout_s = 20\n",
            images.display(),
            reg.host,
            tarpit.1
        ),
    )
    .unwrap();
    let agent = static_agent();
    let server = Server::start_in(
        s,
        &[
            "--config",
            config.to_str().unwrap(),
            "--min-idle",
            "0",
            "--agent",
            agent.to_str().unwrap(),
        ],
    );
    let job = |image: &str, code: &str| json!({"runtime": "python", "image": image, "code": code});
    let read_marker = format!("print(open('{MARKER_PATH}').read())");

    // Not allowed: refused before admission, nothing pulled.
    let (st, r) = server.json(
        "POST",
        "/v1/jobs",
        &job(&format!("{}/other/python:3", reg.host), "1"),
    );
    assert_eq!(
        (st, r["error"]["field"].as_str()),
        (400, Some("image")),
        "{r}"
    );

    // The tarpit's pull hangs: its job waits, the next job runs.
    let (st, hung) = server.json(
        "POST",
        "/v1/jobs?wait=false",
        &job(&format!("{}/kiln/python:3", tarpit.1), "1"),
    );
    assert_eq!(st, 202, "{hung}");
    let hung = format!("/v1/jobs/{}", hung["id"].as_str().unwrap());
    let (st, r) = server.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "python", "code": "print(7)"}),
    );
    assert_eq!((st, r["stdout"].as_str()), (200, Some("7\n")), "{r}");
    let (_, h) = server.json("GET", &hung, &json!(null));
    assert_ne!(
        h["state"], "done",
        "the hung pull's job is still waiting: {h}"
    );

    // Two jobs name the registry's image at once: one pull, both run in it.
    let reference = format!("{}/kiln/python:3", reg.host);
    let answers: Vec<(u16, serde_json::Value)> = std::thread::scope(|t| {
        let asks: Vec<_> = (0..2)
            .map(|_| t.spawn(|| server.json("POST", "/v1/jobs", &job(&reference, &read_marker))))
            .collect();
        asks.into_iter().map(|a| a.join().unwrap()).collect()
    });
    for (st, r) in &answers {
        assert_eq!(
            (*st, r["stdout"].as_str()),
            (200, Some("first-use\n")),
            "{r}"
        );
    }
    assert_eq!(answers[0].1["image"], answers[1].1["image"]);
    let (_, listed) = server.json("GET", "/v1/images", &json!(null));
    let names: Vec<&str> = listed
        .as_array()
        .or(listed["images"].as_array())
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names, [reference.as_str()], "{listed}");

    // The hung pull gives up at its timeout, and says so.
    assert!(kiln_tests::wait_until(
        std::time::Duration::from_secs(60),
        || server.json("GET", &hung, &json!(null)).1["state"] == "done"
    ));
    let (_, h) = server.json("GET", &hung, &json!(null));
    let r = &h["result"];
    assert_eq!(r["outcome"], "rejected", "{h}");
    assert!(
        r["message"].as_str().unwrap().contains("pull_timeout_s"),
        "{h}"
    );
    drop(tarpit);
}

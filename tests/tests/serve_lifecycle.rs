//! `kiln serve`'s life: SIGTERM drains (in-flight jobs get their results,
//! new ones are refused, nothing is left on the host), a restart after
//! SIGKILL reaps what the killed server left, probes and metrics, and the
//! configuration's precedence (flag > environment > file > default).

use std::io::Write as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_tests::server::Server;
use kiln_tests::{bin, Scope};
use serde_json::json;

#[test]
fn sigterm_finishes_in_flight_jobs_refuses_new_ones_and_leaves_nothing() {
    let mut s = Server::start("drain", &["--min-idle", "1", "--drain-grace-s", "30"]);
    let results = std::thread::scope(|t| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let s = &s;
                t.spawn(move || {
                    s.json(
                        "POST",
                        "/v1/jobs",
                        &json!({"runtime": "bash", "code": format!("sleep 1.5; echo done {i}")}),
                    )
                })
            })
            .collect();
        // Let them start, then ask the server to stop.
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: kill has no memory-safety preconditions; the pid is the server we started.
        unsafe { libc::kill(s.pid(), libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(200));
        let refused = s.request(
            "POST",
            "/v1/jobs",
            Some(
                json!({"runtime": "bash", "code": "echo late"})
                    .to_string()
                    .as_bytes(),
            ),
        );
        assert_eq!(refused.status, 503, "{}", refused.text());
        assert_eq!(refused.json()["error"]["code"], "shutting_down");
        assert_eq!(s.request("GET", "/readyz", None).status, 503);
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    for (i, (st, r)) in results.iter().enumerate() {
        assert_eq!(*st, 200, "{r}");
        assert_eq!(r["outcome"], "ok", "{r}");
        assert_eq!(r["stdout"], format!("done {i}\n"));
    }
    assert!(s.wait(Duration::from_secs(60)).success());
    let left = s.scope.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_restart_after_sigkill_reaps_what_the_killed_server_left() {
    let mut s = Server::start("restart", &["--min-idle", "2", "--pool-runtimes", "python"]);
    let (st, _) = s.json(
        "POST",
        "/v1/sandboxes",
        &json!({"template": "bash", "ttl_s": 600}),
    );
    assert_eq!(st, 201);
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.scope.leftovers().len() < 3 * 3 {
        assert!(
            Instant::now() < deadline,
            "pool never filled: {:?}",
            s.scope.leftovers()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s.kill();
    assert!(!s.scope.leftovers().is_empty());
    let scope = Scope {
        state_dir: s.scope.state_dir.clone(),
        cgroup_parent: s.scope.cgroup_parent.clone(),
    };
    std::mem::forget(s);
    let mut again = Server::start_in(scope, &["--min-idle", "0"]);
    let left = again.scope.leftovers();
    assert!(left.is_empty(), "not reaped: {left:?}");
    assert!(again.term(Duration::from_secs(30)).success());
}

#[test]
fn probes_and_metrics_tell_the_truth() {
    let s = Server::start("probes", &["--min-idle", "1", "--pool-runtimes", "bash"]);
    assert_eq!(s.request("GET", "/healthz", None).status, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.request("GET", "/readyz", None).status != 200 {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, r) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "bash", "code": "echo x"}),
    );
    assert_eq!(r["outcome"], "ok");
    let m = s.request("GET", "/metrics", None);
    assert_eq!(m.status, 200);
    assert!(m
        .header("content-type")
        .unwrap()
        .contains("openmetrics-text"));
    let text = m.text();
    let helps: Vec<&str> = text.lines().filter(|l| l.starts_with("# HELP ")).collect();
    let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    assert_eq!(helps.len(), types.len(), "every family has help text");
    for h in &helps {
        assert!(h.split_whitespace().count() > 3, "help text present: {h}");
    }
    for name in [
        "kiln_jobs_total{source=\"http\",outcome=\"ok\"} 1",
        "kiln_pool_hits_total{template=\"bash\"}",
        "# UNIT kiln_job_phase_seconds seconds",
        "kiln_job_acquires_total{acquire=\"warm\"} 1",
        "kiln_http_requests_total",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
}

#[test]
fn config_comes_from_file_env_and_flags_in_that_order() {
    let scope = Scope::new("config");
    let file = scope.state_dir.join("kiln.toml");
    let mut f = std::fs::File::create(&file).unwrap();
    writeln!(f, "[server]\nbind = \"127.0.0.1:9999\"\n[scheduler]\nqueue_depth = 7\nmax_running = 3\n[pool]\nmin_idle = 5\n[backend]\nstate_dir = \"/from/file\"").unwrap();
    let out = std::process::Command::new(bin("kiln"))
        .args(["serve", "--print-config", "--config"])
        .arg(&file)
        .args(["--max-running", "4"])
        .env("KILN_QUEUE_DEPTH", "9")
        .env("KILN_MAX_RUNNING", "11")
        .env_remove("KILN_STATE_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(v["server"]["bind"].as_str(), Some("127.0.0.1:9999"), "file");
    assert_eq!(
        v["scheduler"]["queue_depth"].as_integer(),
        Some(9),
        "env over file"
    );
    assert_eq!(
        v["scheduler"]["max_running"].as_integer(),
        Some(4),
        "flag over env"
    );
    assert_eq!(v["pool"]["min_idle"].as_integer(), Some(5), "file");
    assert_eq!(
        v["backend"]["state_dir"].as_str(),
        Some("/from/file"),
        "file over default"
    );
    assert_eq!(
        v["sandboxes"]["default_ttl_s"].as_integer(),
        Some(600),
        "default"
    );

    let bad = scope.state_dir.join("bad.toml");
    std::fs::write(&bad, "[scheduler]\nmax_runing = 3\n").unwrap();
    let out = std::process::Command::new(bin("kiln"))
        .args(["serve", "--print-config", "--config"])
        .arg(&bad)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_runing"));
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&bad);
}

#[test]
fn the_example_config_and_the_docs_cover_every_key() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(bin("kiln"))
        .args(["serve", "--print-config", "--config"])
        .arg(root.join("deploy/kiln.example.toml"))
        .env_remove("KILN_STATE_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective: toml::Table = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let docs = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
    let example = std::fs::read_to_string(root.join("deploy/kiln.example.toml")).unwrap();
    for (section, keys) in &effective {
        assert!(
            docs.contains(&format!("`[{section}]`")),
            "section {section} undocumented"
        );
        for key in keys.as_table().unwrap().keys() {
            assert!(
                docs.contains(&format!("| `{key}` |")),
                "{section}.{key} undocumented"
            );
            assert!(
                example.contains(&format!("{key} = ")),
                "{section}.{key} not in the example"
            );
        }
    }
}

#[test]
fn jobs_past_the_drain_grace_are_stopped_with_a_result() {
    let mut s = Server::start("grace", &["--min-idle", "0", "--drain-grace-s", "1"]);
    let (st, r) = std::thread::scope(|t| {
        let h = t.spawn(|| {
            s.json(
                "POST",
                "/v1/jobs",
                &json!({"runtime": "bash", "code": "sleep 60", "limits": {"timeout_ms": 120000}}),
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: kill has no memory-safety preconditions; the pid is the server we started.
        unsafe { libc::kill(s.pid(), libc::SIGTERM) };
        h.join().unwrap()
    });
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["outcome"], "killed", "{r}");
    assert!(r["message"].as_str().unwrap().contains("shut down"), "{r}");
    assert!(s.wait(Duration::from_secs(30)).success());
    let left = s.scope.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}

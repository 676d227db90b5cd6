//! `/v1/jobs` over real HTTP against a real `kiln serve`: sync and async
//! jobs, the SSE output stream, input errors, auth, remove-on-exit,
//! concurrency and back-pressure.

#[path = "support/sse.rs"]
mod sse;

use std::time::{Duration, Instant};

use kiln_tests::server::Server;
use serde_json::{json, Value};

fn wait_ready(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.request("GET", "/readyz", None).status != 200 {
        assert!(Instant::now() < deadline, "/readyz never turned 200");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_sync_job_answers_its_result_with_timings_warm_from_the_pool() {
    let s = Server::start("sync", &["--min-idle", "1", "--pool-runtimes", "python"]);
    wait_ready(&s);
    let (st, r) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "python", "code": "print(6*7)"}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["outcome"], "ok");
    assert_eq!(r["stdout"], "42\n");
    let t = &r["timings"];
    for k in ["queued_ms", "acquire_ms", "run_ms", "total_ms"] {
        assert!(t[k].as_f64().unwrap() >= 0.0, "{k} in {t}");
    }
    assert_eq!(t["acquire"], "warm", "{t}");
    assert!(
        t.get("sandbox").is_none(),
        "a pooled sandbox's making is not the job's: {t}"
    );
    assert!(t["total_ms"].as_f64() >= t["run_ms"].as_f64());
    // A job whose work dir differs from the template's gets its own sandbox.
    let (_, r) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "python", "code": "print(1)", "limits": {"disk_mb": 8}}),
    );
    assert_eq!(r["outcome"], "ok");
    let t = &r["timings"];
    assert_eq!(t["acquire"], "cold");
    // Its making, step by step, within the acquire time.
    let sb = &t["sandbox"];
    assert_eq!(sb["how"], "boot", "{t}");
    let steps: f64 = ["start_ms", "connect_ms", "setup_ms"]
        .iter()
        .map(|k| sb[k].as_f64().unwrap_or_else(|| panic!("{k} in {t}")))
        .sum();
    assert!(
        steps > 0.0 && steps <= t["acquire_ms"].as_f64().unwrap(),
        "{t}"
    );
}

#[test]
fn an_async_job_is_accepted_then_looked_up_and_streamed() {
    let s = Server::start("async", &["--min-idle", "0"]);
    let code = "echo one; sleep 0.5; echo two >&2; sleep 0.3; echo three";
    let r = s.request(
        "POST",
        "/v1/jobs?wait=false",
        Some(
            json!({"runtime": "bash", "code": code, "id": "job-a1"})
                .to_string()
                .as_bytes(),
        ),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let v = r.json();
    assert_eq!(v["id"], "job-a1");
    assert_eq!(r.header("location"), Some("/v1/jobs/job-a1"));

    // Follow it live with a real SSE parser.
    let st = s.open("GET", "/v1/jobs/job-a1/events", &[], None);
    assert_eq!(st.status, 200);
    assert!(st
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let evs: Vec<_> = sse::events(st.body).collect();
    let names: Vec<&str> = evs.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names.last(), Some(&"exit"), "{names:?}");
    let text = |kind: &str| -> String {
        evs.iter()
            .filter(|e| e.event == kind)
            .map(|e| {
                serde_json::from_str::<Value>(&e.data).unwrap()["data"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(text("stdout"), "one\nthree\n");
    assert_eq!(text("stderr"), "two\n");
    let first_err = names.iter().position(|n| *n == "stderr").unwrap();
    let last_out = names.iter().rposition(|n| *n == "stdout").unwrap();
    assert!(
        first_err < last_out,
        "events in the order they happened: {names:?}"
    );
    let exit: Value = serde_json::from_str(&evs.last().unwrap().data).unwrap();
    assert_eq!(exit["outcome"], "ok");

    let (st, v) = s.json("GET", "/v1/jobs/job-a1", &Value::Null);
    assert_eq!(st, 200);
    assert_eq!(v["state"], "done");
    assert_eq!(v["result"]["stdout"], "one\nthree\n");

    // Replay after the fact: the same events.
    let again: Vec<_> =
        sse::events(s.open("GET", "/v1/jobs/job-a1/events", &[], None).body).collect();
    assert_eq!(again.len(), evs.len());

    // The id is taken now.
    let (st, e) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "bash", "code": "true", "id": "job-a1"}),
    );
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["error"]["code"], "duplicate_id");
    let (st, _) = s.json("GET", "/v1/jobs/nope", &Value::Null);
    assert_eq!(st, 404);
}

#[test]
fn bad_input_gets_a_4xx_naming_the_problem() {
    let s = Server::start(
        "badinput",
        &["--min-idle", "0", "--max-body-bytes", "65536"],
    );
    let post = |body: &[u8]| {
        let r = s.request("POST", "/v1/jobs", Some(body));
        (r.status, r.json())
    };
    let (st, e) = post(b"{\"runtime\": \"python\", \"code\": ");
    assert_eq!(st, 400);
    assert_eq!(e["error"]["code"], "malformed_json");
    let (st, e) = post(
        json!({"runtime": "cobol", "code": "x"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(st, 400);
    assert_eq!(e["error"]["code"], "unknown_runtime");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("cobol"),
        "{e}"
    );
    let big = json!({"runtime": "python", "code": "#".repeat(100_000)}).to_string();
    let (st, e) = post(big.as_bytes());
    assert_eq!(st, 413);
    assert_eq!(e["error"]["code"], "body_too_large");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("65536"),
        "{e}"
    );
    for (limits, field) in [
        (json!({"timeout_ms": -5}), "limits.timeout_ms"),
        (json!({"memory_mb": 1_000_000_000}), "limits.memory_mb"),
        (json!({"pids": 0}), "limits.pids"),
        (json!({"cpus": 1e9}), "limits.cpus"),
    ] {
        let (st, e) = post(
            json!({"runtime": "python", "code": "1", "limits": limits})
                .to_string()
                .as_bytes(),
        );
        assert_eq!(st, 400, "{e}");
        assert_eq!(e["error"]["field"], field, "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().starts_with(field),
            "{e}"
        );
    }
    let (st, e) = post(
        json!({"runtime": "python", "code": "1", "colour": "red"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(st, 400);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("colour"),
        "{e}"
    );
    let (st, e) = post(json!({"runtime": "python"}).to_string().as_bytes());
    assert_eq!(st, 400);
    assert_eq!(e["error"]["field"], "code", "{e}");
    let r = s.request("POST", "/v1/jobs?wait=maybe", Some(b"{}"));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["field"], "wait");
    assert_eq!(s.request("DELETE", "/v1/jobs", None).status, 405);
    assert_eq!(s.request("GET", "/v2/nothing", None).status, 404);
}

#[test]
fn auth_rejects_missing_and_wrong_tokens() {
    let mut s = Server::start("auth", &["--min-idle", "0", "--token", "s3cret"]);
    let job = json!({"runtime": "bash", "code": "echo ok"}).to_string();
    let r = s.request("POST", "/v1/jobs", Some(job.as_bytes()));
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "unauthorized");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = s.request_with(
        "POST",
        "/v1/jobs",
        &[("Authorization", "Bearer wrong")],
        Some(job.as_bytes()),
    );
    assert_eq!(r.status, 401);
    assert_eq!(s.request("GET", "/v1/sandboxes", None).status, 401);
    assert_eq!(s.request("GET", "/metrics", None).status, 401);
    // Probes stay open for orchestrators.
    assert_eq!(s.request("GET", "/healthz", None).status, 200);
    s.token = Some("s3cret".into());
    let r = s.request("POST", "/v1/jobs", Some(job.as_bytes()));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["stdout"], "ok\n");
}

#[test]
fn a_job_with_remove_on_exit_leaves_nothing_behind() {
    // One pooled sandbox: the next job runs in the very sandbox the first
    // one used, after its reset.
    let s = Server::start("removeonexit", &["--min-idle", "1", "--max-running", "1"]);
    let (_, r) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "bash", "code": "setsid sleep 31 & echo bg; touch /work/x /tmp/y /dev/shm/z"}),
    );
    assert_eq!(r["outcome"], "ok", "{r}");
    let sandboxes = s.scope.leftovers();
    assert!(
        kiln_tests::wait_processes_gone("sleep 31", Duration::from_secs(10)).is_empty(),
        "the job's background process outlived it"
    );
    let (_, r) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "bash", "code": "ls -A /work /tmp /dev/shm; ps -e -o comm= | grep -c sleep"}),
    );
    assert_eq!(r["outcome"], "error", "grep finds no sleep: {r}");
    // The job's own file, and nothing of the first job's.
    assert_eq!(
        r["stdout"], "/dev/shm:\n\n/tmp:\n\n/work:\nmain.sh\n0\n",
        "{r}"
    );
    assert_eq!(
        s.scope.leftovers(),
        sandboxes,
        "the same pooled sandbox served both jobs"
    );
    // Keeping the sandbox instead makes it a workspace.
    let resp = s.request(
        "POST",
        "/v1/jobs?remove_on_exit=false",
        Some(
            json!({"runtime": "bash", "code": "echo kept > /work/k"})
                .to_string()
                .as_bytes(),
        ),
    );
    let ws = resp
        .header("kiln-sandbox")
        .expect("kiln-sandbox header")
        .to_owned();
    let (_, r) = s.json(
        "POST",
        &format!("/v1/sandboxes/{ws}/exec"),
        &json!({"runtime": "bash", "code": "cat /work/k"}),
    );
    assert_eq!(r["stdout"], "kept\n", "{r}");
    let mut s = s;
    assert!(s.term(Duration::from_secs(60)).success());
    let left = s.scope.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn with_max_uses_1_every_job_gets_a_new_sandbox_and_none_stays() {
    let s = Server::start("maxuses1", &["--min-idle", "0", "--pool-max-uses", "1"]);
    for _ in 0..3 {
        let (_, r) = s.json(
            "POST",
            "/v1/jobs",
            &json!({"runtime": "bash", "code": "setsid sleep 32 & echo bg"}),
        );
        assert_eq!(r["outcome"], "ok", "{r}");
        let left = s.wait_clean(Duration::from_secs(10));
        assert!(left.is_empty(), "left behind: {left:?}");
    }
    assert!(kiln_tests::wait_processes_gone("sleep 32", Duration::from_secs(5)).is_empty());
}

#[test]
fn fifty_concurrent_jobs_all_succeed_and_nothing_leaks() {
    let s = Server::start(
        "fifty",
        &[
            "--min-idle",
            "2",
            "--max-running",
            "8",
            "--queue-depth",
            "64",
        ],
    );
    wait_ready(&s);
    let results: Vec<Value> = std::thread::scope(|t| {
        let hs: Vec<_> = (0..50)
            .map(|i| {
                let s = &s;
                let rt = ["python", "node", "bash"][i % 3];
                let code = match rt {
                    "python" => format!("print({i})"),
                    "node" => format!("console.log({i})"),
                    _ => format!("echo {i}"),
                };
                t.spawn(move || s.json("POST", "/v1/jobs", &json!({"runtime": rt, "code": code})))
            })
            .collect();
        hs.into_iter()
            .enumerate()
            .map(|(i, h)| {
                let (st, r) = h.join().unwrap();
                assert_eq!(st, 200, "job {i}: {r}");
                assert_eq!(r["stdout"], format!("{i}\n"), "job {i}: {r}");
                r
            })
            .collect()
    });
    assert!(results.iter().all(|r| r["outcome"] == "ok"));
    assert!(results.iter().any(|r| r["timings"]["acquire"] == "warm"));
    let mut s = s;
    assert!(s.term(Duration::from_secs(60)).success());
    let left = s.scope.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_saturated_server_answers_429_with_retry_after_and_recovers() {
    let s = Server::start(
        "saturate",
        &[
            "--min-idle",
            "0",
            "--max-running",
            "1",
            "--queue-depth",
            "1",
        ],
    );
    let slow = json!({"runtime": "bash", "code": "sleep 1; echo slow"}).to_string();
    let statuses: Vec<(u16, Option<String>)> = std::thread::scope(|t| {
        let hs: Vec<_> = (0..6)
            .map(|_| {
                let (s, slow) = (&s, &slow);
                t.spawn(move || {
                    let r = s.request("POST", "/v1/jobs", Some(slow.as_bytes()));
                    (r.status, r.header("retry-after").map(str::to_owned))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = statuses.iter().filter(|(st, _)| *st == 200).count();
    let busy: Vec<_> = statuses.iter().filter(|(st, _)| *st == 429).collect();
    assert!((1..=2).contains(&ok), "{statuses:?}");
    assert_eq!(ok + busy.len(), 6, "{statuses:?}");
    for (_, ra) in &busy {
        let secs: u64 = ra.as_deref().expect("Retry-After on 429").parse().unwrap();
        assert!(secs >= 1, "{ra:?}");
    }
    let (st, r) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "bash", "code": "echo back"}),
    );
    assert_eq!(st, 200, "recovered: {r}");
    assert_eq!(r["stdout"], "back\n");
    assert!(
        kiln_tests::wait_processes_gone("sleep 1; echo slow", Duration::from_secs(10)).is_empty()
    );
    // What stays is the pool: one reset sandbox, idle, until the end.
    let mut s = s;
    assert!(s.term(Duration::from_secs(60)).success());
    let left = s.scope.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn an_oom_in_a_pooled_sandbox_is_its_jobs_alone() {
    // One pooled sandbox, so that both jobs run in it.
    let s = Server::start("oompool", &["--min-idle", "1", "--max-running", "1"]);
    wait_ready(&s);
    let bomb = json!({
        "runtime": "python",
        "code": "b = []\nwhile True: b.append(bytearray(1 << 20))",
        "limits": {"memory_mb": 64}
    });
    let (_, r) = s.json("POST", "/v1/jobs", &bomb);
    assert_eq!(r["outcome"], "oom", "{r}");
    let sandboxes = s.scope.leftovers();
    let (_, r) = s.json(
        "POST",
        "/v1/jobs",
        &json!({"runtime": "python", "code": "print(1)"}),
    );
    assert_eq!(r["outcome"], "ok", "the next job is not blamed: {r}");
    assert_eq!(r["stdout"], "1\n");
    assert_eq!(s.scope.leftovers(), sandboxes, "it ran in the same sandbox");
}

#[test]
fn a_job_with_more_or_less_memory_than_the_template_still_gets_a_warm_sandbox() {
    let s = Server::start("resize", &["--min-idle", "1", "--max-running", "1"]);
    wait_ready(&s);
    for memory_mb in [512, 64, 256] {
        let (_, r) = s.json(
            "POST",
            "/v1/jobs",
            &json!({
                "runtime": "python",
                "code": "print(1)",
                "limits": {"memory_mb": memory_mb}
            }),
        );
        assert_eq!(r["outcome"], "ok", "{memory_mb} MiB: {r}");
        assert_eq!(r["timings"]["acquire"], "warm", "{memory_mb} MiB: {r}");
    }
}

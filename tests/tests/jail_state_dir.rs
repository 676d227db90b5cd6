//! A state directory that the jails' ids cannot search (`mktemp -d` makes
//! one: mode 0700, owned by root) stops `kiln run` and `kiln serve` at
//! start-up with a message naming the directory and the fix, instead of
//! failing every jail at its first mount (and keeping a daemon's `/readyz`
//! at 503 for ever). Directories kiln makes itself are searchable whatever
//! the umask.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_protocol::Outcome;
use kiln_tests::server::Server;
use kiln_tests::{bin, Scope};

fn chmod(dir: &Path, mode: u32) {
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).unwrap();
}

/// What the message must say about `dir`: which directory, its mode and
/// owner, and the fix.
fn assert_names_the_fix(stderr: &str, dir: &Path) {
    let d = dir.display();
    assert!(
        stderr.contains(&format!("cannot search {d} (mode 0700, owner 0:0)")),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("chmod o+x {d}")), "{stderr}");
}

#[test]
fn an_unsearchable_state_dir_stops_kiln_run_naming_it_and_the_fix() {
    let s = Scope::new("closed-run");
    chmod(&s.state_dir, 0o700);
    let job = ["--runtime", "bash", "-c", "echo hi"];
    let out = s.run(&job, &["--json", "--no-stdin"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_names_the_fix(&stderr, &s.state_dir);

    // The fix the message gives is enough.
    chmod(&s.state_dir, 0o711);
    let (r, code) = s.run_json(&job);
    assert_eq!((r.outcome, code), (Outcome::Ok, 0), "{r:?}");
    assert_eq!(r.stdout, "hi\n");
}

#[test]
fn an_unsearchable_state_dir_stops_kiln_serve_naming_it_and_the_fix() {
    let s = Scope::new("closed-serve");
    chmod(&s.state_dir, 0o700);
    let mut child = Server::command(&s, &["--min-idle", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning kiln serve");
    // Bounded: before the check, kiln serve ran on with every jail failing.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kiln serve kept running with a state directory its jails cannot reach");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert_names_the_fix(&stderr, &s.state_dir);
    chmod(&s.state_dir, 0o755);
}

#[test]
fn state_directories_kiln_makes_are_searchable_whatever_the_umask() {
    let s = Scope::new("umask");
    let state = s.state_dir.join("made/by/kiln");
    let mut c = Command::new(bin("kiln"));
    c.args(["run", "--json", "--no-stdin", "--state-dir"])
        .arg(&state)
        .arg("--cgroup-parent")
        .arg(&s.cgroup_parent)
        .args(["--runtime", "bash", "-c", "echo hi"])
        .stdin(Stdio::null());
    // SAFETY: umask is async-signal-safe and touches no memory.
    unsafe {
        c.pre_exec(|| {
            libc::umask(0o077);
            Ok(())
        });
    }
    let out = c.output().expect("spawning kiln run");
    let r: kiln_protocol::JobResult = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JobResult ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.stdout, "hi\n");
    for d in [
        s.state_dir.join("made"),
        s.state_dir.join("made/by"),
        state.clone(),
        state.join("jails"),
    ] {
        let mode = fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "{}", d.display());
    }
}

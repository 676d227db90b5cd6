//! The jail's template root option (`--rootfs DIR`): a job sees the
//! template, and nothing of the host. The template is built here from the
//! host's bash and the shared libraries `ldd` names for it and the agent.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_protocol::Outcome;
use kiln_tests::Scope;

/// Shared libraries of `bin` as absolute paths (ldd's `=> /path` and the
/// loader's own line).
fn libs(bin: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect()
}

/// Copies `src` to `root/src`, creating parents.
fn copy_in(root: &Path, src: &Path) {
    let dst = root.join(src.strip_prefix("/").unwrap());
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::copy(std::fs::canonicalize(src).unwrap(), &dst).unwrap();
}

#[test]
fn a_template_root_is_all_the_job_sees() {
    let s = Scope::new("template");
    let root = s.state_dir.join("template");
    for d in ["proc", "dev", "tmp", "work", "usr/bin"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    copy_in(&root, Path::new("/usr/bin/bash"));
    let agent = kiln_tests::bin("kiln-agent");
    for lib in libs(Path::new("/usr/bin/bash"))
        .into_iter()
        .chain(libs(&agent))
    {
        copy_in(&root, &lib);
    }
    std::fs::write(root.join("MARKER"), "template\n").unwrap();
    let (r, _) = s.run_json(&[
        "--rootfs",
        root.to_str().unwrap(),
        "--runtime",
        "bash",
        "-c",
        "echo $(< /MARKER); for p in /usr/bin/python3 /etc/passwd /root; do [ -e $p ] && echo \"visible $p\"; done; echo done",
    ]);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.stdout, "template\ndone\n");
    // The template is seen through overlays of the jail's own (no inode
    // of the template, or of the host's /dev, is shared between jails; see
    // jail_shared_inodes.rs), and nothing can be written to them.
    let (r, _) = s.run_json(&[
        "--rootfs",
        root.to_str().unwrap(),
        "--runtime",
        "bash",
        "-c",
        r#"while read -r l; do set -- $l; r=${l#* - }; case $5 in /|/dev) echo "$5 ${r%% *}";; esac; done < /proc/self/mountinfo; echo x 2>/dev/null > /MARKER || echo read-only"#,
    ]);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.stdout, "/ overlay\n/dev overlay\nread-only\n", "{r:?}");
    // Python is not in the template: the runtime's interpreter is missing.
    let (r, _) = s.run_json(&[
        "--rootfs",
        root.to_str().unwrap(),
        "--runtime",
        "python",
        "-c",
        "print(1)",
    ]);
    assert_ne!(r.outcome, Outcome::Ok, "{r:?}");
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_template_without_mount_points_is_refused_clearly() {
    let s = Scope::new("template-bad");
    let root = s.state_dir.join("empty-template");
    std::fs::create_dir_all(&root).unwrap();
    let out = s.run(
        &[
            "--rootfs",
            root.to_str().unwrap(),
            "--runtime",
            "bash",
            "-c",
            "true",
        ],
        &["--no-stdin"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mount point /proc"), "{err}");
    std::fs::remove_dir(&root).unwrap();
}

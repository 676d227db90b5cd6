//! `kiln template` as an operator meets it: a backend without templates
//! says so and what to use instead. (Building, listing and removing real
//! templates is tested with the qemu backend, in its own tests.)

use std::process::Stdio;

use kiln_tests::{bin, Scope};

#[test]
fn the_jail_backend_has_no_templates_and_says_which_backends_do() {
    let scope = Scope::new("template-jail");
    for args in [
        vec!["template", "ls"],
        vec!["template", "build", "--runtime", "python"],
        vec!["template", "rm", "x"],
    ] {
        let out = std::process::Command::new(bin("kiln"))
            .args(&args)
            .arg("--state-dir")
            .arg(&scope.state_dir)
            .args(["--cgroup-parent", &scope.cgroup_parent])
            .env_remove("KILN_BACKEND")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("jail backend has no templates")
                && err.contains("--backend qemu or firecracker"),
            "{args:?}: {err}"
        );
    }
}

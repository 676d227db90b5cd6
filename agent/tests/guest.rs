//! `--guest-init` outside a guest: it must refuse before touching any mount
//! (as PID 1 of a real guest it is exercised by the qemu backend's tests in
//! `sandbox/src/qemu/guest_tests.rs`, which boot Kiln's guest image).

use std::process::Command;

#[test]
fn guest_init_refuses_to_run_unless_it_is_pid_1() {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .arg("--guest-init")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only runs as PID 1"), "{err}");
}

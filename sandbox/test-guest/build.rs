//! Builds the test guest (`guest/main.rs`) with the toolchain that builds
//! this crate: `$RUSTC` for the host target, but freestanding (no std, no C
//! runtime, static, not position-independent), linked at 16 MiB by
//! `guest/linker.ld`, into `$OUT_DIR/kiln-test-guest`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let source = dir.join("guest/main.rs");
    let script = dir.join("guest/linker.ld");
    for input in [&source, &script, &dir.join("src/pattern.rs")] {
        println!("cargo:rerun-if-changed={}", input.display());
    }
    let elf = out.join("kiln-test-guest");
    // The guest is x86-64 code entered by Firecracker's x86-64 boot path.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64") {
        println!("cargo:warning=the Firecracker test guest is x86-64 only; not built");
        println!("cargo:rustc-env=KILN_TEST_GUEST_ELF=");
        return;
    }
    let status = Command::new(&rustc)
        .args(["--edition", "2021", "--crate-type", "bin"])
        .args(["--crate-name", "kiln_test_guest"])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .args([
            "-C",
            "opt-level=2",
            "-C",
            "debuginfo=0",
            "-C",
            "strip=symbols",
        ])
        // No unwinding tables or landing pads; the guest has nowhere to unwind to.
        .args(["-C", "panic=abort"])
        // Absolute addresses: the image runs where it is linked.
        .args(["-C", "relocation-model=static"])
        // Interrupts arrive on the running stack (ring 0, no IST): nothing
        // may live below the stack pointer.
        .args(["-C", "no-redzone=yes"])
        // No SSE: under this machine's nested KVM (PVM) ring-0 guest code is
        // emulated by KVM's x86 emulator, which stops the VM with an
        // internal error ("INTERNAL_ERROR in batch emul" in the host's log)
        // at the first SSE instruction, and LLVM uses SSE registers for
        // plain copies and zeroing. rustc warns that turning `sse2` off on
        // this target will one day be refused (rust-lang/rust#116344); the
        // guest has no floating point, so the ABI concern does not arise.
        .args([
            "-C",
            "target-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2",
        ])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .args([
            "-C",
            "link-arg=-static",
            "-C",
            "link-arg=-Wl,--build-id=none",
        ])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", script.display()))
        .arg("-o")
        .arg(&elf)
        .arg(&source)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", rustc.to_string_lossy()));
    assert!(
        status.success(),
        "building the test guest failed ({status})"
    );
    println!("cargo:rustc-env=KILN_TEST_GUEST_ELF={}", elf.display());
}

//! Writes the test images of `tests/src/images.rs` (the host's Python
//! plus a marker layer, named `py`; the marker alone, named `bare`) as an
//! OCI layout in the directory given, for benchmarks and for trying
//! `kiln image import` by hand:
//!
//! `cargo run -p kiln-tests --example make_test_image -- /tmp/layout`

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .expect("usage: make_test_image DIR");
    let (py, bare) =
        kiln_tests::images::write_test_layout(std::path::Path::new(&dir), "py", "bare", "bench");
    println!("py {py}\nbare {bare}");
}

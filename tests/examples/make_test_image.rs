//! Writes the test images of `tests/src/images.rs` (the host's Python
//! plus a marker layer, named `py`; the marker alone, named `bare`) as an
//! OCI layout in the directory given, for benchmarks and for trying
//! `kiln image import` by hand. With `--big`, one image named `big`
//! instead: the host's Python, numpy and pip (~110 MiB uncompressed), the
//! "~100 MiB image" of the image benchmarks.
//!
//! `cargo run -p kiln-tests --example make_test_image -- /tmp/layout [--big]`

use std::path::Path;

use kiln_images::layout::{write_layout, LayoutImage};
use kiln_tests::images::{host_tree_layer, python_layer};

fn main() {
    let mut args = std::env::args_os().skip(1);
    let dir = args.next().expect("usage: make_test_image DIR [--big]");
    if args.next().is_some_and(|a| a == "--big") {
        let extra = [
            "/usr/lib/python3/dist-packages/numpy",
            "/usr/lib/python3/dist-packages/pip",
        ]
        .map(Path::new);
        let d = write_layout(
            Path::new(&dir),
            &[LayoutImage {
                name: "big",
                layers: vec![python_layer(), host_tree_layer(&extra)],
                env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".to_owned()],
                working_dir: None,
            }],
        )
        .expect("writing the layout");
        println!("big {}", d[0]);
        return;
    }
    let (py, bare) = kiln_tests::images::write_test_layout(Path::new(&dir), "py", "bare", "bench");
    println!("py {py}\nbare {bare}");
}

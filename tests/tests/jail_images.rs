//! Jobs in OCI image roots with the jail backend, end to end through the
//! `kiln` binary: an image made from the host's Python plus a marker file
//! (tests/src/images.rs) is imported into a store, and `kiln run --image`
//! runs Python from inside it: the marker is there, the host's `/usr` is
//! not, the root is writable for the job and the writes die with the
//! sandbox (and bounded by its disk size), and the result names the
//! image's digest. An image without the
//! runtime's interpreter and an unknown image are refused with messages
//! naming them. Real namespaces, overlays and cgroups; needs root.

use std::path::{Path, PathBuf};

use kiln_protocol::{JobResult, Outcome};
use kiln_tests::images::{
    empty_header, kiln_image, static_agent, write_test_layout, MARKER_PATH, PYTHON, WRITABLE_DIR,
};
use kiln_tests::Scope;

const PY: &str = "kiln.test/python:3";
const BARE: &str = "kiln.test/bare:1";

/// `kiln run` of Python `code` in `image` from the store at `images`, with
/// the static agent and `extra` flags.
fn run_in_image(
    s: &Scope,
    images: &Path,
    image: &str,
    extra: &[&str],
    code: &str,
) -> (JobResult, i32) {
    let agent = static_agent();
    let mut args = vec![
        "--agent",
        agent.to_str().unwrap(),
        "--images-dir",
        images.to_str().unwrap(),
        "--image",
        image,
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--runtime", "python", "-c", code]);
    s.run_json(&args)
}

/// A store with both test images imported; returns its directory and the
/// Python image's digest.
fn store(s: &Scope, marker: &str) -> (PathBuf, String) {
    let layout = s.state_dir.join("layout");
    let (py, _) = write_test_layout(&layout, PY, BARE, marker);
    let images = s.state_dir.join("images");
    kiln_image(&images, &["import", layout.to_str().unwrap()]);
    let listed = kiln_image(&images, &["ls"]);
    assert!(
        listed.contains(PY) && listed.contains(py.as_str()),
        "{listed}"
    );
    (images, py.to_string())
}

#[test]
fn python_runs_inside_an_image_root_with_its_marker_and_without_the_host_usr() {
    let s = Scope::new("image-python");
    let (images, digest) = store(&s, "made-for-this-test");
    let code = format!(
        "import os, sys\n\
         print(open('{MARKER_PATH}').read())\n\
         print(sys.executable, os.path.exists('/usr/lib/python3/dist-packages'))\n\
         print(sorted(os.listdir('/usr/bin')))\n\
         print(os.environ.get('KILN_IMAGE_ENV'))\n\
         open('{WRITABLE_DIR}/written', 'w').write('x')\n\
         print(os.path.exists('{WRITABLE_DIR}/written'))\n"
    );
    let (r, status) = run_in_image(&s, &images, PY, &[], &code);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(status, 0);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "made-for-this-test", "{}", r.stdout);
    assert_eq!(
        lines[1],
        format!("{PYTHON} False"),
        "the host's dist-packages must not be visible"
    );
    assert!(
        lines[2].contains("'python3'")
            && !lines[2].contains("'kiln'")
            && !lines[2].contains("'ls'"),
        "only the image's /usr/bin: {}",
        lines[2]
    );
    assert_eq!(
        lines[3], "from-the-image",
        "the image's Env reaches the job"
    );
    assert_eq!(lines[4], "True", "the root is writable");
    assert_eq!(r.image.as_deref(), Some(digest.as_str()));
    // The write went to that sandbox's own layer, not to the shared image.
    let root = images
        .join("roots")
        .join(digest.trim_start_matches("sha256:"));
    assert!(root.join("etc/kiln-image-marker").is_file());
    assert!(root.join("var/scratch").is_dir());
    assert!(!root.join("var/scratch/written").exists());
    // By digest too; the next sandbox starts from the image again.
    let (r, _) = run_in_image(
        &s,
        &images,
        &digest,
        &[],
        &format!("import os; print(os.path.exists('{WRITABLE_DIR}/written'))"),
    );
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.stdout, "False\n");
    assert!(s.leftovers().is_empty(), "{:?}", s.leftovers());
}

#[test]
fn an_image_without_the_interpreter_or_not_stored_is_refused_naming_it() {
    let s = Scope::new("image-refused");
    let (images, _) = store(&s, "m");
    let (r, status) = run_in_image(&s, &images, BARE, &[], "print(1)");
    assert_eq!(r.outcome, Outcome::Rejected, "{r:?}");
    assert_eq!(status, 2);
    let msg = r.message.unwrap_or_default();
    assert!(msg.contains(BARE) && msg.contains(PYTHON), "{msg}");
    let (r, _) = run_in_image(&s, &images, "kiln.test/nothing:1", &[], "print(1)");
    assert_eq!(r.outcome, Outcome::Rejected, "{r:?}");
    assert!(
        r.message
            .unwrap_or_default()
            .contains("kiln.test/nothing:1"),
        "the message names the image"
    );
    // A dynamically linked agent cannot run in an image: said so.
    let (r, _) = s.run_json(&[
        "--images-dir",
        images.to_str().unwrap(),
        "--image",
        PY,
        "--runtime",
        "python",
        "-c",
        "print(1)",
    ]);
    assert_eq!(r.outcome, Outcome::Internal, "{r:?}");
    let msg = r.message.unwrap_or_default();
    assert!(
        msg.contains("dynamically linked") && msg.contains("crt-static"),
        "{msg}"
    );
}

#[test]
fn rm_and_gc_leave_only_what_remaining_images_use() {
    let s = Scope::new("image-gc");
    let (images, _) = store(&s, "m");
    kiln_image(&images, &["rm", PY]);
    let out = kiln_image(&images, &["gc", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The Python image's manifest, config and Python layer; its root.
    assert_eq!(report["blobs_removed"], 3, "{report}");
    assert_eq!(report["roots_removed"], 1, "{report}");
    let blobs = std::fs::read_dir(images.join("blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(
        blobs, 3,
        "the bare image's manifest, config and marker layer"
    );
}

#[test]
fn the_writable_layer_of_an_image_root_is_bounded_by_the_disk_size() {
    let s = Scope::new("image-disk");
    let (images, _) = store(&s, "m");
    let code = format!(
        "import errno\n\
         try:\n    open('{WRITABLE_DIR}/big', 'wb').write(b'x' * (16 << 20))\n    print('written')\n\
         except OSError as e:\n    print(errno.errorcode[e.errno])\n"
    );
    let (r, _) = run_in_image(&s, &images, PY, &["--disk", "8M"], &code);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.stdout, "ENOSPC\n", "{r:?}");
}

/// A layer that moves the interpreter where official language images keep
/// theirs: `/usr/bin/python3` whited out, `/usr/local/bin/python3` a link
/// to the real binary.
fn relocating_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = empty_header(tar::EntryType::Regular, 0o644);
    b.append_data(&mut h, "usr/bin/.wh.python3", &[][..])
        .unwrap();
    let mut l = empty_header(tar::EntryType::Symlink, 0o777);
    let real = std::fs::canonicalize(PYTHON).unwrap();
    b.append_link(&mut l, "usr/local/bin/python3", &real)
        .unwrap();
    b.into_inner().unwrap()
}

#[test]
fn an_interpreter_kept_under_usr_local_bin_is_found_and_used() {
    let s = Scope::new("image-relocated");
    let layout = s.state_dir.join("layout");
    kiln_images::layout::write_layout(
        &layout,
        &[kiln_images::layout::LayoutImage {
            name: "kiln.test/local-python:1",
            layers: vec![kiln_tests::images::python_layer(), relocating_layer()],
            env: Vec::new(),
            working_dir: None,
        }],
    )
    .unwrap();
    let images = s.state_dir.join("images");
    kiln_image(&images, &["import", layout.to_str().unwrap()]);
    let (r, _) = run_in_image(
        &s,
        &images,
        "kiln.test/local-python:1",
        &[],
        "import os, sys; print(sys.executable, os.path.exists('/usr/bin/python3'))",
    );
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert_eq!(r.stdout, "/usr/local/bin/python3 False\n");
}

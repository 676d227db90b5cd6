//! Test images made from the host's own files, without a registry or the
//! internet: the host's Python 3 (its binary, the libraries `ldd` names,
//! the standard library without its tests and GUI parts) as one layer,
//! and a marker file as another, written as an OCI image layout with
//! kiln-images' layout writer. Also a small image with no interpreter.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_images::layout::{write_layout, LayoutImage};
use kiln_images::Digest;

/// The interpreter the built-in runtime table's `python` runs.
pub const PYTHON: &str = "/usr/bin/python3";

/// What the marker layer puts in the image, and where.
pub const MARKER_PATH: &str = "/etc/kiln-image-marker";

/// Standard library parts left out (tests, GUI, installers): ~20 MiB less.
const SKIPPED: [&str; 9] = [
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "config-3.11-x86_64-linux-gnu",
];

/// Adds host paths to a layer, each at the path it has on the host, links
/// as links (and what they point to), parents made canonical (the host's
/// `/lib` is a link to `usr/lib`; the image gets the same links).
struct HostLayer {
    builder: tar::Builder<Vec<u8>>,
    seen: BTreeSet<PathBuf>,
}

impl HostLayer {
    fn new() -> Self {
        let mut builder = tar::Builder::new(Vec::new());
        builder.follow_symlinks(false);
        Self {
            builder,
            seen: BTreeSet::new(),
        }
    }

    fn add(&mut self, path: &Path) {
        let parent = fs::canonicalize(path.parent().expect("not /")).expect("host parent");
        let path = parent.join(path.file_name().expect("a name"));
        if !self.seen.insert(path.clone()) {
            return;
        }
        let meta =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.strip_prefix("/").expect("absolute");
        self.builder
            .append_path_with_name(&path, name)
            .unwrap_or_else(|e| panic!("adding {}: {e}", path.display()));
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&path).expect("link");
            self.add(&parent.join(target));
        } else if meta.is_dir() {
            for e in fs::read_dir(&path).expect("a host directory") {
                let e = e.expect("an entry");
                if !SKIPPED.contains(&e.file_name().to_string_lossy().as_ref()) {
                    self.add(&e.path());
                }
            }
        }
    }

    fn link(&mut self, name: &str, target: &str) {
        let mut h = empty_header(tar::EntryType::Symlink, 0o777);
        self.builder
            .append_link(&mut h, name, target)
            .expect("a link entry");
    }

    fn finish(self) -> Vec<u8> {
        self.builder.into_inner().expect("the layer")
    }
}

/// A header of an entry with no data (a directory, a link, a whiteout)
/// of this kind and mode, owned by root, at time 0.
pub fn empty_header(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(0);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// The libraries `ldd` says `bin` needs.
fn libraries(bin: &Path, out: &mut BTreeSet<PathBuf>) {
    let o = Command::new("ldd").arg(bin).output().expect("running ldd");
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            out.insert(PathBuf::from(p));
        }
    }
}

/// The layer of the host's Python: binary, libraries, standard library,
/// and the merged-/usr links.
pub fn python_layer() -> Vec<u8> {
    let real = fs::canonicalize(PYTHON).expect("the host has /usr/bin/python3");
    let version = real
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("python")
        .to_owned();
    let stdlib = PathBuf::from(format!("/usr/lib/python{version}"));
    let mut libs = BTreeSet::new();
    libraries(&real, &mut libs);
    for e in fs::read_dir(stdlib.join("lib-dynload"))
        .expect("lib-dynload")
        .flatten()
    {
        libraries(&e.path(), &mut libs);
    }
    let mut layer = HostLayer::new();
    for (name, target) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("sbin", "usr/sbin"),
    ] {
        if fs::read_link(Path::new("/").join(name)).is_ok() {
            layer.link(name, target);
        }
    }
    layer.add(Path::new(PYTHON));
    for l in &libs {
        layer.add(l);
    }
    layer.add(&stdlib);
    if Path::new("/etc/ld.so.cache").exists() {
        layer.add(Path::new("/etc/ld.so.cache"));
    }
    layer.finish()
}

/// A layer of the host's trees (files, directories, links, as they are),
/// for images of a chosen size in benchmarks.
pub fn host_tree_layer(paths: &[&Path]) -> Vec<u8> {
    let mut layer = HostLayer::new();
    for p in paths {
        layer.add(p);
    }
    layer.finish()
}

/// A directory in the marker layer that jobs (not the jail's root) may
/// write to: mode 1777, like `/tmp`.
pub const WRITABLE_DIR: &str = "/var/scratch";

/// A layer with one file, `path` (absolute), holding `content`, and
/// [`WRITABLE_DIR`].
pub fn file_layer(path: &str, content: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut d = empty_header(tar::EntryType::Directory, 0o1777);
    b.append_data(&mut d, WRITABLE_DIR.trim_start_matches('/'), &[][..])
        .expect("a directory entry");
    let mut h = tar::Header::new_gnu();
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, path.trim_start_matches('/'), content.as_bytes())
        .expect("a file entry");
    b.into_inner().expect("the layer")
}

/// Writes an OCI layout at `dir` with two images: `python` (the host's
/// Python and a marker file holding `marker`) and `bare` (the marker
/// only). Returns their manifest digests.
pub fn write_test_layout(dir: &Path, python: &str, bare: &str, marker: &str) -> (Digest, Digest) {
    let env = vec![
        "PATH=/usr/local/bin:/usr/bin:/bin".to_owned(),
        "KILN_IMAGE_ENV=from-the-image".to_owned(),
    ];
    let d = write_layout(
        dir,
        &[
            LayoutImage {
                name: python,
                layers: vec![python_layer(), file_layer(MARKER_PATH, marker)],
                env: env.clone(),
                working_dir: None,
            },
            LayoutImage {
                name: bare,
                layers: vec![file_layer(MARKER_PATH, marker)],
                env,
                working_dir: None,
            },
        ],
    )
    .expect("writing the layout");
    (d[0].clone(), d[1].clone())
}

/// `kiln image ARGS --images-dir IMAGES`, which must succeed; its stdout.
pub fn kiln_image(images: &Path, args: &[&str]) -> String {
    let out = Command::new(crate::bin("kiln"))
        .arg("image")
        .args(args)
        .arg("--images-dir")
        .arg(images)
        .output()
        .expect("spawning kiln image");
    assert!(
        out.status.success(),
        "kiln image {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A statically linked `kiln-agent` built from this checkout: a jail
/// rooted in an image has the image's libraries, not the host's, so its
/// agent must need none. Built once (cargo keeps it up to date) in
/// `target/static-agent`, with the same flags as the microVM guest's
/// agent (deploy/guest/build-rootfs.sh).
pub fn static_agent() -> PathBuf {
    static AGENT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    AGENT
        .get_or_init(|| {
            let target = crate::bin_dir()
                .parent()
                .expect("target/")
                .join("static-agent");
            let triple = "x86_64-unknown-linux-gnu";
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .env("CARGO_TARGET_DIR", &target)
                .env("CARGO_INCREMENTAL", "0")
                .args(["build", "--quiet", "--target", triple, "-p", "kiln-agent"])
                .status()
                .expect("running cargo");
            assert!(status.success(), "building the static kiln-agent failed");
            target.join(triple).join("debug/kiln-agent")
        })
        .clone()
}

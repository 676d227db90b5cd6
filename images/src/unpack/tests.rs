use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::*;
use crate::testing::{gzip, scratch, tarball, Item};

/// A root to unpack into and, beside it, a directory that a hostile layer
/// would like to write to.
struct Place {
    top: PathBuf,
    root: PathBuf,
    outside: PathBuf,
}

impl Place {
    fn new(name: &str) -> Self {
        let top = scratch(name);
        let root = top.join("root");
        let outside = top.join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        Self { top, root, outside }
    }

    fn apply(&self, layer: &[u8]) -> Result<LayerStats, UnpackError> {
        self.apply_with(layer, &Limits::default())
    }

    fn apply_with(&self, layer: &[u8], limits: &Limits) -> Result<LayerStats, UnpackError> {
        apply_layer(&self.root, "sha256:feed", layer, limits, None)
    }

    fn outside_is_untouched(&self) {
        let left: Vec<_> = fs::read_dir(&self.outside).unwrap().collect();
        assert!(left.is_empty(), "something was written outside: {left:?}");
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.top);
    }
}

/// The error's message names the layer and the entry, and says why.
fn refused(r: Result<LayerStats, UnpackError>, entry: &str, why: &str) {
    let e = r.expect_err("the layer must be refused");
    let msg = e.to_string();
    assert!(msg.contains("sha256:feed"), "no layer in {msg:?}");
    assert!(msg.contains(entry), "no entry {entry:?} in {msg:?}");
    assert!(msg.contains(why), "no {why:?} in {msg:?}");
}

#[test]
fn an_entry_climbing_out_with_dotdot_is_refused() {
    let p = Place::new("dotdot");
    refused(
        p.apply(&tarball(&[Item::File("../outside/x", b"pwned")])),
        "../outside/x",
        "`..`",
    );
    refused(
        p.apply(&tarball(&[Item::File("a/../../outside/y", b"pwned")])),
        "a/../../outside/y",
        "`..`",
    );
    p.outside_is_untouched();
}

#[test]
fn an_absolute_entry_is_refused() {
    let p = Place::new("absolute");
    let target = format!("{}/x", p.outside.display());
    refused(
        p.apply(&tarball(&[Item::File(&target, b"pwned")])),
        &target,
        "absolute",
    );
    p.outside_is_untouched();
}

#[test]
fn a_relative_symlink_climbing_out_is_refused() {
    let p = Place::new("symlink-out");
    refused(
        p.apply(&tarball(&[Item::Symlink("a/link", "../../outside")])),
        "a/link",
        "outside the root",
    );
    // Climbing and coming back down stays inside: allowed.
    p.apply(&tarball(&[Item::Symlink("a/b/link", "../../etc/x")]))
        .unwrap();
    // An absolute target is the image's own root inside the sandbox.
    p.apply(&tarball(&[Item::Symlink(
        "abs",
        "/etc/alternatives/python3",
    )]))
    .unwrap();
    assert_eq!(
        fs::read_link(p.root.join("abs")).unwrap(),
        Path::new("/etc/alternatives/python3")
    );
    p.outside_is_untouched();
}

#[test]
fn a_hard_link_to_outside_the_root_is_refused() {
    let p = Place::new("hardlink-out");
    fs::write(p.top.join("secret"), b"host file").unwrap();
    let absolute = format!("{}/secret", p.top.display());
    refused(
        p.apply(&tarball(&[Item::HardLink("x", &absolute)])),
        "\"x\"",
        "outside the root",
    );
    refused(
        p.apply(&tarball(&[Item::HardLink("y", "../secret")])),
        "\"y\"",
        "outside the root",
    );
    // Through a symlink planted in the root first.
    refused(
        p.apply(&tarball(&[
            Item::Symlink("up", "/"),
            Item::HardLink("z", "up/etc/passwd"),
        ])),
        "\"z\"",
        "not a file in the root",
    );
    assert_eq!(fs::metadata(p.top.join("secret")).unwrap().nlink(), 1);
    p.outside_is_untouched();
}

#[test]
fn a_file_beneath_a_symlinked_directory_is_refused() {
    let p = Place::new("beneath-symlink");
    let outside = p.outside.display().to_string();
    refused(
        p.apply(&tarball(&[
            Item::Symlink("lib", &outside),
            Item::File("lib/x", b"pwned"),
        ])),
        "lib/x",
        "symlink",
    );
    // Even a link that stays inside is not written through.
    refused(
        p.apply(&tarball(&[
            Item::Dir("real"),
            Item::Symlink("alias", "real"),
            Item::File("alias/y", b"y"),
        ])),
        "alias/y",
        "symlink",
    );
    p.outside_is_untouched();
}

#[test]
fn a_huge_entry_is_refused_before_its_bytes_are_read() {
    let p = Place::new("huge");
    let limits = Limits {
        max_entry_bytes: 1 << 20,
        ..Limits::default()
    };
    refused(
        p.apply_with(&tarball(&[Item::Claimed("big", 1 << 40)]), &limits),
        "big",
        "above the limit",
    );
    assert!(!p.root.join("big").exists());
}

#[test]
fn a_sparse_entry_is_refused() {
    let p = Place::new("sparse");
    refused(
        p.apply(&tarball(&[Item::Sparse("holes")])),
        "holes",
        "sparse",
    );
}

#[test]
fn a_decompression_bomb_stops_at_the_layer_limit() {
    let p = Place::new("bomb");
    let zeros = vec![0u8; 8 << 20];
    let layer = gzip(&tarball(&[Item::File("zeros", &zeros)]));
    assert!(layer.len() < 64 << 10, "the bomb should compress well");
    let limits = Limits {
        max_layer_bytes: 1 << 20,
        ..Limits::default()
    };
    let e = p.apply_with(&layer, &limits).unwrap_err().to_string();
    assert!(
        e.contains("sha256:feed") && e.contains("decompression bomb"),
        "{e}"
    );
}

#[test]
fn a_layer_with_too_many_entries_is_refused() {
    let p = Place::new("entries");
    let names: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
    let items: Vec<Item> = names.iter().map(|n| Item::File(n, b"")).collect();
    let limits = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    let e = p
        .apply_with(&tarball(&items), &limits)
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than 10 entries"), "{e}");
}

#[test]
fn a_zstd_layer_applies_like_a_gzip_one() {
    let p = Place::new("zstd");
    let tar = tarball(&[Item::File("etc/hello", b"zstd")]);
    let layer =
        ruzstd::encoding::compress_to_vec(&tar[..], ruzstd::encoding::CompressionLevel::Fastest);
    assert!(layer.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]));
    p.apply(&layer).unwrap();
    assert_eq!(fs::read(p.root.join("etc/hello")).unwrap(), b"zstd");
}

#[test]
fn layers_apply_in_order_with_whiteouts_and_opaque_directories() {
    let p = Place::new("whiteouts");
    p.apply(&gzip(&tarball(&[
        Item::File("etc/keep", b"1"),
        Item::File("etc/gone", b"1"),
        Item::File("opt/old/a", b"1"),
        Item::File("opt/old/b", b"1"),
        Item::File("tree/deep/file", b"1"),
    ])))
    .unwrap();
    p.apply(&tarball(&[
        Item::File("etc/.wh.gone", b""),
        Item::File(".wh.tree", b""),
        Item::Dir("opt/old"),
        Item::File("opt/old/new", b"2"),
        Item::File("opt/old/.wh..wh..opq", b""),
        Item::File("etc/keep", b"2"),
    ]))
    .unwrap();
    assert_eq!(fs::read(p.root.join("etc/keep")).unwrap(), b"2");
    assert!(!p.root.join("etc/gone").exists());
    assert!(!p.root.join("tree").exists());
    let mut old: Vec<_> = fs::read_dir(p.root.join("opt/old"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    old.sort();
    assert_eq!(
        old,
        ["new"],
        "the opaque directory keeps only this layer's files"
    );
    assert!(!p.root.join("opt/old/.wh..wh..opq").exists());
}

#[test]
fn links_modes_and_times_are_kept_and_devices_skipped() {
    let p = Place::new("kinds");
    let stats = p
        .apply(&tarball(&[
            Item::FileMode("bin/tool", b"#!/bin/sh\n", 0o755),
            Item::HardLink("bin/same", "bin/tool"),
            Item::Symlink("usr/bin/tool", "../../bin/tool"),
            Item::FileMode("etc/shadow", b"x", 0o600),
            Item::CharDevice("dev/null"),
        ]))
        .unwrap();
    assert_eq!(stats.skipped, 1);
    assert!(!p.root.join("dev/null").exists());
    let tool = fs::metadata(p.root.join("bin/tool")).unwrap();
    assert_eq!(tool.permissions().mode() & 0o7777, 0o755);
    assert_eq!(tool.mtime(), 1_700_000_000);
    assert_eq!(tool.nlink(), 2);
    assert_eq!(
        fs::metadata(p.root.join("etc/shadow"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o600
    );
    assert_eq!(
        fs::read(p.root.join("usr/bin/tool")).unwrap(),
        b"#!/bin/sh\n"
    );
    // A later layer replacing a hard-linked file leaves the other name.
    p.apply(&tarball(&[Item::File("bin/same", b"new")]))
        .unwrap();
    assert_eq!(fs::read(p.root.join("bin/tool")).unwrap(), b"#!/bin/sh\n");
}

#[test]
fn ownership_is_shifted_into_the_sandbox_id_range() {
    let p = Place::new("owners");
    // lchown to other ids needs CAP_CHOWN; Kiln's tests run as root.
    assert!(nix_is_root(), "this test needs root");
    apply_layer(
        &p.root,
        "sha256:feed",
        &tarball(&[Item::File("f", b"x")])[..],
        &Limits::default(),
        Some(1_000_000_000),
    )
    .unwrap();
    assert_eq!(fs::metadata(p.root.join("f")).unwrap().uid(), 1_000_000_000);
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Extended attributes (PAX `SCHILY.xattr.*`): `user.*` and file
/// capabilities are set, after the ownership (a chown clears
/// capabilities); `trusted.overlay.*`, which would steer the overlay the
/// root becomes a lower of, and other `security.*` labels are left out;
/// a symlink's are skipped.
#[test]
fn user_attributes_and_capabilities_are_kept_and_overlay_ones_are_not() {
    let p = Place::new("xattrs");
    // cap_net_raw+ep, as `setcap cap_net_raw+ep` writes it (VFS v2).
    let caps: &[u8] = &[
        0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>,
               name: &str,
               kind: tar::EntryType,
               attrs: &[(&str, &[u8])]| {
        b.append_pax_extensions(attrs.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(0o755);
        h.set_size(if kind.is_file() { 2 } else { 0 });
        if kind.is_symlink() {
            h.set_link_name("ping").unwrap();
        }
        b.append_data(
            &mut h,
            name,
            if kind.is_file() { &b"hi"[..] } else { &b""[..] },
        )
        .unwrap();
    };
    add(
        &mut b,
        "dir",
        tar::EntryType::Directory,
        &[
            ("SCHILY.xattr.user.mime", b"dir/x"),
            ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
        ],
    );
    add(
        &mut b,
        "dir/ping",
        tar::EntryType::Regular,
        &[
            ("SCHILY.xattr.security.capability", caps),
            ("SCHILY.xattr.user.origin", b"image"),
            (
                "SCHILY.xattr.security.selinux",
                b"system_u:object_r:bin_t:s0",
            ),
        ],
    );
    add(
        &mut b,
        "dir/link",
        tar::EntryType::Symlink,
        &[("SCHILY.xattr.user.origin", b"image")],
    );
    let stats = p.apply(&b.into_inner().unwrap()).unwrap();
    let get = |rel: &str, name: &str| -> Option<Vec<u8>> {
        let path = std::ffi::CString::new(p.root.join(rel).as_os_str().as_bytes()).unwrap();
        let name = std::ffi::CString::new(name).unwrap();
        let mut buf = vec![0u8; 256];
        // SAFETY: NUL-terminated strings and a buffer of its own length.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        (n >= 0).then(|| buf[..n as usize].to_vec())
    };
    assert_eq!(get("dir", "user.mime").as_deref(), Some(&b"dir/x"[..]));
    assert_eq!(get("dir", "trusted.overlay.opaque"), None);
    assert_eq!(
        get("dir/ping", "user.origin").as_deref(),
        Some(&b"image"[..])
    );
    assert_eq!(
        get("dir/ping", "security.capability").as_deref(),
        Some(caps)
    );
    assert_eq!(get("dir/ping", "security.selinux"), None);
    assert_eq!(get("dir/link", "user.origin"), None);
    assert_eq!((stats.xattrs, stats.xattrs_skipped), (3, 3), "{stats:?}");
}

use std::fs;
use std::path::Path;

use super::*;
use crate::import::{import, ImportError};
use crate::layout::{write_layout, LayoutImage};
use crate::testing::{gzip, scratch, tarball, Item};

fn image<'a>(name: &'a str, layers: Vec<Vec<u8>>) -> LayoutImage<'a> {
    LayoutImage {
        name,
        layers,
        env: vec!["PATH=/usr/bin:/bin".into()],
        working_dir: Some("/srv".into()),
    }
}

fn base_layer() -> Vec<u8> {
    gzip(&tarball(&[
        Item::FileMode("usr/bin/tool", b"#!/bin/sh\n", 0o755),
        Item::Symlink("bin", "usr/bin"),
        Item::File("etc/os-release", b"ID=kiln-test\n"),
    ]))
}

fn blob_count(store: &ImageStore) -> usize {
    fs::read_dir(store.dir().join("blobs/sha256"))
        .unwrap()
        .count()
}

/// A tar of the directory `dir` (regular files and directories).
fn tar_of(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn an_oci_layout_imports_with_shared_layers_stored_once_and_unpacks() {
    let top = scratch("store-import");
    let layout = top.join("layout");
    let app = tarball(&[
        Item::File("srv/app.py", b"print(1)\n"),
        Item::File("etc/.wh.os-release", b""),
    ]);
    let digests = write_layout(
        &layout,
        &[
            image("kiln.test/base:1", vec![base_layer()]),
            image("kiln.test/app:1", vec![base_layer(), app]),
        ],
    )
    .unwrap();
    let store = ImageStore::open(top.join("store")).unwrap();
    let images = import(&store, &layout, None).unwrap();
    assert_eq!(images.len(), 2);
    // 2 manifests, 2 configs, 2 distinct layers.
    assert_eq!(blob_count(&store), 6);
    let app = store.resolve("kiln.test/app:1").unwrap();
    assert_eq!(app.digest, digests[1]);
    assert_eq!(
        store.resolve(digests[1].as_str()).unwrap().name,
        "kiln.test/app:1"
    );
    assert_eq!(
        store
            .resolve(&format!("kiln.test/app@{}", digests[1]))
            .unwrap()
            .digest,
        digests[1]
    );
    let root = store.root(&app).unwrap();
    assert_eq!(fs::read(root.join("srv/app.py")).unwrap(), b"print(1)\n");
    assert!(
        !root.join("etc/os-release").exists(),
        "the whiteout of the upper layer applies"
    );
    for m in MOUNT_POINTS {
        assert!(root.join(m).is_dir(), "/{m} is made");
    }
    assert_eq!(lookup(&root, "/bin/tool"), Some(root.join("usr/bin/tool")));
    let config = store.config(&app).unwrap();
    let c = config.config().as_ref().unwrap();
    assert_eq!(c.working_dir().as_deref(), Some("/srv"));
    fs::remove_dir_all(&top).unwrap();
}

#[test]
fn a_tarred_layout_imports_and_a_name_without_tag_means_latest() {
    let top = scratch("store-tar");
    let layout = top.join("layout");
    write_layout(
        &layout,
        &[image("kiln.test/tool:latest", vec![base_layer()])],
    )
    .unwrap();
    let archive = top.join("image.tar");
    fs::write(&archive, tar_of(&layout)).unwrap();
    let store = ImageStore::open(top.join("store")).unwrap();
    import(&store, &archive, None).unwrap();
    assert_eq!(
        store.resolve("kiln.test/tool").unwrap().name,
        "kiln.test/tool:latest"
    );
    let e = store.resolve("kiln.test/other").unwrap_err();
    assert!(matches!(e, StoreError::Unknown(_)), "{e}");
    assert!(e.to_string().contains("kiln.test/other"));
    fs::remove_dir_all(&top).unwrap();
}

#[test]
fn a_docker_save_archive_imports_under_its_repo_tag() {
    let top = scratch("store-docker");
    let dir = top.join("save");
    fs::create_dir_all(dir.join("abc")).unwrap();
    fs::write(
        dir.join("abc/layer.tar"),
        tarball(&[Item::File("hello", b"hi")]),
    )
    .unwrap();
    let config = br#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    fs::write(dir.join("cfg.json"), config).unwrap();
    fs::write(
        dir.join("manifest.json"),
        br#"[{"Config":"cfg.json","RepoTags":["legacy/app:2"],"Layers":["abc/layer.tar"]}]"#,
    )
    .unwrap();
    let archive = top.join("save.tar");
    fs::write(&archive, tar_of(&dir)).unwrap();
    let store = ImageStore::open(top.join("store")).unwrap();
    let images = import(&store, &archive, None).unwrap();
    assert_eq!(images[0].name, "legacy/app:2");
    let root = store.root(&images[0]).unwrap();
    assert_eq!(fs::read(root.join("hello")).unwrap(), b"hi");
    fs::remove_dir_all(&top).unwrap();
}

#[test]
fn a_corrupt_blob_is_refused_and_nothing_is_stored() {
    let top = scratch("store-corrupt");
    let layout = top.join("layout");
    let layer = base_layer();
    let layer_digest = crate::Digest::of(&layer);
    write_layout(&layout, &[image("kiln.test/bad:1", vec![layer])]).unwrap();
    let p = layout.join("blobs/sha256").join(layer_digest.hex());
    let mut bytes = fs::read(&p).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&p, bytes).unwrap();
    let store = ImageStore::open(top.join("store")).unwrap();
    let e = import(&store, &layout, None).unwrap_err();
    assert!(
        matches!(&e, ImportError::Store(StoreError::DigestMismatch { expected, .. }) if *expected == layer_digest),
        "{e}"
    );
    assert!(store.list().unwrap().is_empty());
    assert!(!store.has_blob(&layer_digest));
    fs::remove_dir_all(&top).unwrap();
}

#[test]
fn gc_leaves_only_the_blobs_and_roots_images_refer_to() {
    let top = scratch("store-gc");
    let layout = top.join("layout");
    let extra = tarball(&[Item::File("extra", b"x")]);
    write_layout(
        &layout,
        &[
            image("kiln.test/a:1", vec![base_layer()]),
            image("kiln.test/b:1", vec![base_layer(), extra]),
        ],
    )
    .unwrap();
    let store = ImageStore::open(top.join("store")).unwrap();
    import(&store, &layout, None).unwrap();
    let b = store.resolve("kiln.test/b:1").unwrap();
    store.root(&b).unwrap();
    assert_eq!(
        store.gc().unwrap(),
        GcReport::default(),
        "nothing to collect yet"
    );
    let gone = store.remove("kiln.test/b:1").unwrap();
    assert_eq!(gone.len(), 1);
    let report = store.gc().unwrap();
    // b's manifest, config and its own layer; its root.
    assert_eq!(report.blobs_removed, 3);
    assert_eq!(report.roots_removed, 1);
    let a = store.resolve("kiln.test/a:1").unwrap();
    let mut left: Vec<String> = fs::read_dir(store.dir().join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut want: Vec<String> = [&a.digest, &a.config]
        .into_iter()
        .chain(&a.layers)
        .map(|d| d.hex().to_owned())
        .collect();
    want.sort();
    assert_eq!(left, want);
    fs::remove_dir_all(&top).unwrap();
}

#[test]
fn a_hostile_archive_is_refused_at_import() {
    let top = scratch("store-hostile");
    let archive = top.join("evil.tar");
    fs::write(&archive, tarball(&[Item::File("../escaped", b"x")])).unwrap();
    let store = ImageStore::open(top.join("store")).unwrap();
    let e = import(&store, &archive, None).unwrap_err().to_string();
    assert!(e.contains("../escaped") && e.contains("`..`"), "{e}");
    assert!(!top.join("store/roots/escaped").exists());
    fs::remove_dir_all(&top).unwrap();
}

#[test]
fn lookup_follows_links_inside_the_root_only() {
    let top = scratch("store-lookup");
    let root = top.join("root");
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::write(root.join("usr/bin/python3.11"), b"").unwrap();
    std::os::unix::fs::symlink("python3.11", root.join("usr/bin/python3")).unwrap();
    std::os::unix::fs::symlink("/usr/bin", root.join("bin")).unwrap();
    std::os::unix::fs::symlink("../../../../../../etc", root.join("up")).unwrap();
    assert_eq!(
        lookup(&root, "/bin/python3"),
        Some(root.join("usr/bin/python3.11"))
    );
    // `..` stops at the root: this is the root's own /etc, which is absent.
    assert_eq!(lookup(&root, "/up/passwd"), None);
    fs::remove_dir_all(&top).unwrap();
}

#[test]
fn gc_keeps_an_unreferenced_root_a_sandbox_still_holds() {
    use std::os::fd::AsRawFd;
    let top = scratch("store-gc-held");
    let layout = top.join("layout");
    write_layout(&layout, &[image("kiln.test/held:1", vec![base_layer()])]).unwrap();
    let store = ImageStore::open(top.join("store")).unwrap();
    let held = import(&store, &layout, None).unwrap().remove(0);
    let root = store.root(&held).unwrap();
    // What a jail rooted in it holds for its life.
    let lock = fs::File::open(&root).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH) }, 0);
    store.remove("kiln.test/held:1").unwrap();
    let report = store.gc().unwrap();
    assert_eq!((report.roots_removed, report.roots_in_use), (0, 1));
    assert!(
        root.join("usr/bin/tool").is_file(),
        "the root stays while in use"
    );
    drop(lock);
    let report = store.gc().unwrap();
    assert_eq!((report.roots_removed, report.roots_in_use), (1, 0));
    assert!(!root.exists());
    fs::remove_dir_all(&top).unwrap();
}

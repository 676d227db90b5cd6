//! An image layer as a registry or an archive hands it over: tar, gzip or
//! zstd bytes unpacked by `kiln_images::unpack::apply_layer` into a fresh
//! root, the way `kiln image pull|import` unpacks every layer.
//!
//! Input: the layer blob, as is.
//!
//! Properties: applying never panics; whatever the entries (`..`, absolute
//! paths, links pointing out, a file below a symlinked directory, bombs),
//! nothing appears beside the root and the canary file next to it keeps
//! its content; the limits hold (a refused layer is an error, never a
//! partial write past them).
#![no_main]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_images::unpack::{apply_layer, Limits};
use libfuzzer_sys::fuzz_target;

const CANARY: &[u8] = b"outside the root";

/// The process's playground: `root/` is unpacked into, `outside/canary`
/// must stay as it is.
fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kiln-fuzz-layer-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("outside")).unwrap();
        fs::write(dir.join("outside/canary"), CANARY).unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let root = base.join("root");
    fs::create_dir_all(&root).unwrap();
    let limits = Limits {
        max_entries: 256,
        max_entry_bytes: 1 << 20,
        max_layer_bytes: 4 << 20,
    };
    let _ = apply_layer(&root, "sha256:fuzz", data, &limits, None);
    let mut beside: Vec<String> = fs::read_dir(base)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    assert_eq!(beside, ["outside", "root"], "a layer wrote beside its root");
    let outside: Vec<_> = fs::read_dir(base.join("outside")).unwrap().collect();
    assert_eq!(outside.len(), 1, "a layer wrote into a sibling directory");
    assert_eq!(fs::read(base.join("outside/canary")).unwrap(), CANARY);
    // Entries may have left directories without write or search permission
    // (modes come from the layer); make them removable, then remove.
    let _ = fs::set_permissions(&root, fs::Permissions::from_mode(0o700));
    let_owner_in(&root);
    fs::remove_dir_all(&root).unwrap();
});

/// Gives the owner full access to every directory below `dir` (never
/// following a symlink), so that the root can be removed.
fn let_owner_in(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o700));
            let_owner_in(&path);
        }
    }
}

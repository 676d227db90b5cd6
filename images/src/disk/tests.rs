use std::fs;
use std::path::Path;
use std::process::Command;

use super::*;
use crate::import::import;
use crate::layout::{write_layout, LayoutImage};
use crate::testing::{scratch, tarball, Item};

/// What `debugfs -R <request>` says about the file system in `disk`
/// (read-only; nothing is mounted).
fn debugfs(disk: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(disk)
        .env("LC_ALL", "C")
        .output()
        .expect("running debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A store holding one image made of `layers`, named `kiln.test/vm:1`.
fn store_with(top: &Path, layers: Vec<Vec<u8>>) -> (ImageStore, Image) {
    let layout = top.join("layout");
    write_layout(
        &layout,
        &[LayoutImage {
            name: "kiln.test/vm:1",
            layers,
            env: vec![],
            working_dir: None,
        }],
    )
    .unwrap();
    let store = ImageStore::open(top.join("store")).unwrap();
    let image = import(&store, &layout, None).unwrap().remove(0);
    (store, image)
}

#[test]
fn a_disk_holds_the_image_with_its_own_ids_and_the_agent_as_init_in_its_sbin() {
    let top = scratch("disk-merged");
    let (store, image) = store_with(
        &top,
        vec![tarball(&[
            Item::Dir("usr/sbin"),
            Item::Symlink("sbin", "usr/sbin"),
            Item::Symlink("etc/resolv.conf", "../run/systemd/resolve/stub-resolv.conf"),
            Item::Owned("home/app/data", b"owned by 1234\n", 1234),
            Item::File("etc/marker", b"in the disk\n"),
        ])],
    );
    let agent = GuestAgent::new(b"\x7fELF pretend agent".to_vec());
    let disk = store.disk(&image, &agent).unwrap();
    assert_eq!(disk, store.disk_path(&image, &agent));
    assert!(disk
        .file_name()
        .unwrap()
        .to_string_lossy()
        .ends_with(&format!("-{}.ext4", agent.key())));
    assert_eq!(debugfs(&disk, "cat /etc/marker"), "in the disk\n");
    // Not shifted: the guest's uid 1234 is the image's.
    let stat = debugfs(&disk, "stat /home/app/data");
    assert!(
        stat.contains("User:  1234") && stat.contains("Group:  1234"),
        "{stat}"
    );
    // The agent went where /sbin leads (merged /usr), /sbin stays a link.
    assert_eq!(
        debugfs(&disk, "cat /usr/sbin/kiln-agent"),
        "\x7fELF pretend agent"
    );
    assert!(debugfs(&disk, "stat /sbin").contains("Type: symlink"));
    let init = debugfs(&disk, "stat /usr/sbin/init");
    assert!(
        init.contains("Type: symlink") && init.contains("\"kiln-agent\""),
        "{init}"
    );
    // The agent's to write: a plain file, not the image's link into /run.
    let resolv = debugfs(&disk, "stat /etc/resolv.conf");
    assert!(
        resolv.contains("Type: regular") && resolv.contains("Size: 0"),
        "{resolv}"
    );
    let ls = debugfs(&disk, "ls -l /");
    for m in GUEST_DIRS {
        assert!(ls.contains(&format!(" {m}")), "/{m} is missing: {ls}");
    }
    // Read-only, and the tree it was made from is gone.
    assert_eq!(
        fs::metadata(&disk).unwrap().permissions().mode() & 0o777,
        0o444
    );
    assert_eq!(
        fs::read_dir(store.dir().join("disks/tmp")).unwrap().count(),
        0
    );
    // Built once: a second call finds it.
    let before = fs::metadata(&disk).unwrap().modified().unwrap();
    assert_eq!(store.disk(&image, &agent).unwrap(), disk);
    assert_eq!(fs::metadata(&disk).unwrap().modified().unwrap(), before);
    fs::remove_dir_all(&top).unwrap();
}

#[test]
fn an_sbin_that_leads_nowhere_or_out_becomes_a_directory_and_nothing_is_written_outside() {
    let top = scratch("disk-sbin");
    let outside = top.join("outside");
    fs::create_dir_all(&outside).unwrap();
    // Absolute: inside the guest that is the image's own /nowhere; it must
    // not lead to the host's directory of that name.
    let target = outside.to_string_lossy().into_owned();
    let (store, image) = store_with(&top, vec![tarball(&[Item::Symlink("sbin", &target)])]);
    let agent = GuestAgent::new(b"agent".to_vec());
    let disk = store.disk(&image, &agent).unwrap();
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "wrote outside");
    assert!(debugfs(&disk, "stat /sbin").contains("Type: directory"));
    assert_eq!(debugfs(&disk, "cat /sbin/kiln-agent"), "agent");
    fs::remove_dir_all(&top).unwrap();
}

#[test]
fn a_mount_point_that_is_not_a_directory_is_refused_naming_it() {
    let top = scratch("disk-proc");
    let (store, image) = store_with(&top, vec![tarball(&[Item::File("proc", b"x")])]);
    let e = store
        .disk(&image, &GuestAgent::new(b"a".to_vec()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/proc is not a directory") && e.contains("kiln.test/vm:1"),
        "{e}"
    );
    assert!(fs::read_dir(store.dir().join("disks")).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".ext4")));
    fs::remove_dir_all(&top).unwrap();
}

#[test]
fn gc_removes_the_disks_of_removed_images_only() {
    let top = scratch("disk-gc");
    let (store, image) = store_with(&top, vec![tarball(&[Item::File("etc/x", b"x")])]);
    let agent = GuestAgent::new(b"agent".to_vec());
    let disk = store.disk(&image, &agent).unwrap();
    assert_eq!(store.gc().unwrap().disks_removed, 0);
    assert!(disk.is_file());
    store.remove("kiln.test/vm:1").unwrap();
    assert_eq!(store.gc().unwrap().disks_removed, 1);
    assert!(!disk.exists());
    fs::remove_dir_all(&top).unwrap();
}

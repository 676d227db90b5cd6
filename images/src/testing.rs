//! Crafting layers and images in tests: tar archives written header by
//! header, so that a test can say exactly what a hostile layer holds
//! (`tar::Builder` refuses to write most of what these tests need).

use std::fs;
use std::path::PathBuf;

/// One entry of a crafted archive.
pub enum Item<'a> {
    File(&'a str, &'a [u8]),
    /// A file with this mode.
    FileMode(&'a str, &'a [u8], u32),
    /// A file owned by this uid and gid.
    Owned(&'a str, &'a [u8], u64),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    CharDevice(&'a str),
    /// A header claiming `size` bytes, followed by none.
    Claimed(&'a str, u64),
    Sparse(&'a str),
}

/// A tar archive of `items`, in order.
pub fn tarball(items: &[Item<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        let owner = match *item {
            Item::Owned(_, _, id) => id,
            _ => 0,
        };
        let (name, kind, link, data, mode, size): (&str, u8, &str, &[u8], u32, Option<u64>) =
            match *item {
                Item::File(n, d) | Item::Owned(n, d, _) => (n, b'0', "", d, 0o644, None),
                Item::FileMode(n, d, m) => (n, b'0', "", d, m, None),
                Item::Dir(n) => (n, b'5', "", b"", 0o755, None),
                Item::Symlink(n, t) => (n, b'2', t, b"", 0o777, None),
                Item::HardLink(n, t) => (n, b'1', t, b"", 0o644, None),
                Item::CharDevice(n) => (n, b'3', "", b"", 0o666, None),
                Item::Claimed(n, s) => (n, b'0', "", b"", 0o644, Some(s)),
                Item::Sparse(n) => (n, b'S', "", b"", 0o644, None),
            };
        let mut h = tar::Header::new_gnu();
        {
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_mode(mode);
        h.set_size(size.unwrap_or(data.len() as u64));
        h.set_mtime(1_700_000_000);
        h.set_uid(owner);
        h.set_gid(owner);
        if kind == b'S' {
            // A valid GNU sparse header: 1 MiB of holes, no data.
            let gnu = h.as_gnu_mut().expect("a GNU header");
            gnu.realsize.copy_from_slice(b"00004000000\0");
            gnu.sparse[0].offset.copy_from_slice(b"00004000000\0");
            gnu.sparse[0].numbytes.copy_from_slice(b"00000000000\0");
        }
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// `bytes`, gzip-compressed.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-images-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

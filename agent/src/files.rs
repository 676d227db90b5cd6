//! The job's work directory, and the host's `PutFile` / `GetFile` requests
//! on it. The directory belongs to the job, which may have planted symlinks
//! or FIFOs in it before the host asks for a file: every path is therefore
//! resolved with openat2(RESOLVE_BENEATH) from a directory descriptor opened
//! once at `Hello`, and all filesystem work is done with the job's fs uid/gid,
//! so the agent can never write or read anything the job itself could not.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use kiln_protocol::limits::MAX_FILE_BYTES;

use crate::sys;

/// Why a file request failed; every message names the path.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path is not a clean relative path.
    #[error("{0}")]
    BadPath(String),
    /// The path resolves outside the work directory (a symlink escape).
    #[error("path {path:?} leads outside the work directory")]
    Escape { path: String },
    /// The path names something other than a regular file.
    #[error("path {path:?} is not a regular file")]
    NotRegular { path: String },
    /// The file is larger than the caller allows.
    #[error("file {path:?} is {size} bytes, more than the {max} asked for")]
    TooLarge { path: String, size: u64, max: u64 },
    /// The system refused.
    #[error("{op} {path:?} failed: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The work directory and the identity its files belong to.
#[derive(Debug)]
pub struct Workdir {
    path: String,
    dir: OwnedFd,
    uid: u32,
    gid: u32,
}

fn io_err<'a>(op: &'static str, path: &'a str) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| match source.raw_os_error() {
        Some(libc::EXDEV) | Some(libc::ELOOP) => FileError::Escape {
            path: path.to_owned(),
        },
        _ => FileError::Io {
            op,
            path: path.to_owned(),
            source,
        },
    }
}

fn cstring(path: &str) -> Result<CString, FileError> {
    CString::new(path).map_err(|_| FileError::BadPath(format!("path {path:?} contains NUL")))
}

impl Workdir {
    /// Opens the work directory `path` (absolute) for a job running as
    /// `uid`/`gid`, handing the directory to that user if it is not theirs.
    pub fn open(path: &str, uid: u32, gid: u32) -> Result<Self, FileError> {
        if !path.starts_with('/') {
            return Err(FileError::BadPath(format!(
                "workdir {path:?} must be an absolute path"
            )));
        }
        cstring(path)?;
        // The workdir itself is the host's choice, and trusted.
        let fd = std::fs::File::open(path)
            .map(OwnedFd::from)
            .map_err(io_err("opening workdir", path))?;
        let st = sys::fstat(fd.as_raw_fd()).map_err(io_err("stat workdir", path))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(FileError::BadPath(format!(
                "workdir {path:?} is not a directory"
            )));
        }
        if st.st_uid != uid || st.st_gid != gid {
            // Best effort: in a jail the host already made it the job's.
            if let Err(e) = sys::fchown(fd.as_raw_fd(), uid, gid) {
                crate::log_warn!("cannot hand workdir {path} to {uid}:{gid}: {e}");
            }
        }
        Ok(Self {
            path: path.trim_end_matches('/').to_owned(),
            dir: fd,
            uid,
            gid,
        })
    }

    /// A room's work directory: `root` is the root of its tmpfs (already
    /// owned by `uid`/`gid`), which jobs see at `path`.
    pub fn in_room(root: OwnedFd, path: &str, uid: u32, gid: u32) -> Result<Self, FileError> {
        if !path.starts_with('/') {
            return Err(FileError::BadPath(format!(
                "workdir {path:?} must be an absolute path"
            )));
        }
        Ok(Self {
            path: path.trim_end_matches('/').to_owned(),
            dir: root,
            uid,
            gid,
        })
    }

    /// The absolute path of the work directory.
    pub fn path(&self) -> &str {
        if self.path.is_empty() {
            "/"
        } else {
            &self.path
        }
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// The absolute path of `rel`, which must be a clean relative path.
    pub fn absolute(&self, rel: &str) -> Result<String, FileError> {
        kiln_protocol::check_rel_path("path", rel)
            .map_err(|e| FileError::BadPath(e.to_string()))?;
        Ok(format!("{}/{rel}", self.path))
    }

    /// Writes `data` to `rel` with permissions `mode & 0o777`, creating
    /// parent directories, as the job's user.
    pub fn put(&self, rel: &str, mode: u32, data: &[u8]) -> Result<(), FileError> {
        kiln_protocol::check_rel_path("path", rel)
            .map_err(|e| FileError::BadPath(e.to_string()))?;
        let _id = sys::FsIdentity::assume(self.uid, self.gid);
        let comps: Vec<&str> = rel.split('/').collect();
        for i in 0..comps.len() - 1 {
            let parent = if i == 0 {
                None
            } else {
                let prefix = comps[..i].join("/");
                Some(self.open_dir(&prefix)?)
            };
            let parent_fd = parent
                .as_ref()
                .map_or(self.dir.as_raw_fd(), |f| f.as_raw_fd());
            sys::mkdir_at(parent_fd, &cstring(comps[i])?, 0o755)
                .map_err(io_err("creating directory", rel))?;
        }
        let mode = (mode & 0o777) as libc::mode_t;
        let file = sys::open_beneath(
            self.dir.as_raw_fd(),
            &cstring(rel)?,
            // O_NONBLOCK: a FIFO planted by the job must not hang the agent
            // (ENXIO without a reader); O_NOCTTY for planted terminals.
            libc::O_WRONLY | libc::O_CREAT | libc::O_NONBLOCK | libc::O_NOCTTY,
            mode,
        )
        .map_err(io_err("opening", rel))?;
        self.check_regular(&file, rel)?;
        // Truncate only once we know it is a regular file.
        let mut f = std::fs::File::from(file);
        f.set_len(0).map_err(io_err("truncating", rel))?;
        io::Write::write_all(&mut f, data).map_err(io_err("writing", rel))?;
        sys::fchmod(f.as_raw_fd(), mode).map_err(io_err("chmod", rel))?;
        Ok(())
    }

    /// Reads `rel`, refusing files over `min(max_bytes, MAX_FILE_BYTES)`.
    pub fn get(&self, rel: &str, max_bytes: u64) -> Result<Vec<u8>, FileError> {
        kiln_protocol::check_rel_path("path", rel)
            .map_err(|e| FileError::BadPath(e.to_string()))?;
        let max = max_bytes.min(MAX_FILE_BYTES as u64);
        let _id = sys::FsIdentity::assume(self.uid, self.gid);
        let file = sys::open_beneath(
            self.dir.as_raw_fd(),
            &cstring(rel)?,
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
            0,
        )
        .map_err(io_err("opening", rel))?;
        let size = self.check_regular(&file, rel)?;
        let too_large = |size| FileError::TooLarge {
            path: rel.to_owned(),
            size,
            max,
        };
        if size > max {
            return Err(too_large(size));
        }
        // The file may grow while we read: read at most max + 1 bytes.
        let mut data = Vec::with_capacity(size as usize);
        io::Read::read_to_end(
            &mut io::Read::take(std::fs::File::from(file), max + 1),
            &mut data,
        )
        .map_err(io_err("reading", rel))?;
        if data.len() as u64 > max {
            return Err(too_large(data.len() as u64));
        }
        Ok(data)
    }

    fn open_dir(&self, rel: &str) -> Result<OwnedFd, FileError> {
        sys::open_beneath(
            self.dir.as_raw_fd(),
            &cstring(rel)?,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(io_err("opening directory", rel))
    }

    fn check_regular(&self, f: &OwnedFd, rel: &str) -> Result<u64, FileError> {
        let st = sys::fstat(f.as_raw_fd()).map_err(io_err("stat", rel))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(FileError::NotRegular {
                path: rel.to_owned(),
            });
        }
        Ok(st.st_size as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn tempdir(name: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("kiln-agent-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn me() -> (u32, u32) {
        // SAFETY: getuid/getgid cannot fail.
        unsafe { (libc::getuid(), libc::getgid()) }
    }

    #[test]
    fn put_then_get_round_trips_with_mode_and_parents() {
        let d = tempdir("rt");
        let (u, g) = me();
        let w = Workdir::open(d.to_str().unwrap(), u, g).unwrap();
        w.put("a/b/c.txt", 0o4755, b"hello").unwrap();
        let meta = std::fs::metadata(d.join("a/b/c.txt")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        assert_eq!(meta.uid(), u);
        assert_eq!(w.get("a/b/c.txt", 100).unwrap(), b"hello");
        w.put("a/b/c.txt", 0o644, b"hi").unwrap();
        assert_eq!(w.get("a/b/c.txt", 100).unwrap(), b"hi");
        let e = w.get("a/b/c.txt", 1).unwrap_err().to_string();
        assert!(e.contains("more than the 1"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn symlinks_out_and_traversal_are_refused() {
        let d = tempdir("esc");
        let outside = tempdir("esc-outside");
        let (u, g) = me();
        let w = Workdir::open(d.to_str().unwrap(), u, g).unwrap();
        std::os::unix::fs::symlink(&outside, d.join("out")).unwrap();
        std::os::unix::fs::symlink(outside.join("f"), d.join("f")).unwrap();
        std::os::unix::fs::symlink("../esc-outside-x", d.join("rel")).unwrap();
        for p in ["out/x", "f", "rel", "out/deeper/x"] {
            let e = w.put(p, 0o644, b"x").unwrap_err();
            assert!(matches!(e, FileError::Escape { .. }), "{p}: {e}");
        }
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        for p in ["../x", "/etc/passwd", "a/./b", ""] {
            assert!(matches!(
                w.put(p, 0o644, b"x").unwrap_err(),
                FileError::BadPath(_)
            ));
        }
        // A symlink that stays inside is fine.
        std::os::unix::fs::symlink("real", d.join("alias")).unwrap();
        w.put("real", 0o644, b"r").unwrap();
        assert_eq!(w.get("alias", 10).unwrap(), b"r");
        std::fs::remove_dir_all(d).unwrap();
        std::fs::remove_dir_all(outside).unwrap();
    }

    #[test]
    fn fifos_are_refused_without_hanging() {
        let d = tempdir("fifo");
        let (u, g) = me();
        let w = Workdir::open(d.to_str().unwrap(), u, g).unwrap();
        let c = CString::new(d.join("p").to_str().unwrap()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
        assert!(w.put("p", 0o644, b"x").is_err());
        assert!(matches!(
            w.get("p", 10).unwrap_err(),
            FileError::NotRegular { .. }
        ));
        std::fs::remove_dir_all(d).unwrap();
    }
}

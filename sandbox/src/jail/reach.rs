//! Whether the jail's ids can reach the place where a jail's root is
//! attached.
//!
//! A jail's init runs as the jail's root, which is `id_base` on the host,
//! and attaches its root at `<state_dir>/jails/<id>/root`. The kernel looks
//! that path up with the jail's ids, so every directory on the way must let
//! them search it. A state directory made by `mktemp -d` (mode 0700, owned
//! by root) does not: every jail then failed at its first mount with
//! "Permission denied", and a daemon's `/readyz` stayed 503 for ever. The
//! backend checks once at start-up, the way the jail will look the path up
//! (a thread of its own with the jail's filesystem ids), and names the
//! directory and the fix. Directories the backend makes itself are made
//! searchable whatever the umask.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::SandboxError;

/// Creates `dir` and any missing parents, each searchable by everyone
/// (mode 0755 whatever the umask); directories that exist are left alone.
pub fn create_searchable(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = dir.parent().ok_or(e)?;
            create_searchable(parent)?;
            match fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
}

/// Checks that a process with filesystem uid and gid `id` and no
/// supplementary groups (the jail's root as the host sees it) can search
/// every directory from `/` down to `dir`, and says which it cannot and
/// what to do.
pub fn check(dir: &Path, id: u32) -> Result<(), SandboxError> {
    let dir = std::path::absolute(dir).map_err(|error| SandboxError::Io {
        what: format!("making {} absolute", dir.display()),
        error,
    })?;
    let walk = dir.clone();
    let blocked = std::thread::spawn(move || first_unsearchable(&walk, id))
        .join()
        .map_err(|_| SandboxError::Io {
            what: "checking the state directory's permissions".into(),
            error: io::Error::other("the checking thread panicked"),
        })?;
    let Some((at, error)) = blocked else {
        return Ok(());
    };
    let how = match fs::metadata(&at) {
        Ok(m) => format!(
            "mode {:04o}, owner {}:{}",
            m.permissions().mode() & 0o7777,
            m.uid(),
            m.gid()
        ),
        Err(e) => format!("unreadable: {e}"),
    };
    Err(SandboxError::Io {
        what: format!(
            "the jails cannot reach their roots under {}: their ids (uid and gid {id} on the host, the jails' root) cannot search {} ({how}). \
             Let others search it (`chmod o+x {}`: they may pass through it, not list it) or choose a state directory whose every parent they can search (the default /run/kiln is)",
            dir.display(),
            at.display(),
            at.display(),
        ),
        error,
    })
}

/// In the calling thread, which it leaves with the jail's ids: the first
/// directory from `/` down to `dir` that `id` cannot search.
fn first_unsearchable(dir: &Path, id: u32) -> Option<(PathBuf, io::Error)> {
    // SAFETY: raw system calls without memory arguments (the null group
    // list has length 0). They change this thread's credentials only (the
    // kernel keeps them per thread; glibc's wrappers would broadcast
    // setgroups to every thread, the raw calls do not), and the thread ends
    // right after. A filesystem uid other than 0 also drops the thread's
    // CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, as for the jail.
    let took = unsafe {
        libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>());
        libc::syscall(libc::SYS_setfsgid, id);
        libc::syscall(libc::SYS_setfsuid, id);
        // setfsuid answers the previous value; -1 changes nothing.
        libc::syscall(libc::SYS_setfsuid, u32::MAX) == libc::c_long::from(id)
    };
    if !took {
        // Not root: nothing could make a jail anyway, and later steps say so.
        return None;
    }
    let mut at = PathBuf::new();
    for part in dir.components() {
        at.push(part);
        // Looking up "." in a directory needs search permission on it and
        // on everything above it, as the jail's own lookup will.
        let probe = at.join(".");
        let c = std::ffi::CString::new(probe.as_os_str().as_bytes()).ok()?;
        // SAFETY: a NUL-terminated path; the descriptor is closed at once.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::PermissionDenied {
                return Some((at, e));
            }
            // Missing or not a directory: the creation that follows says so.
            return None;
        }
        // SAFETY: closing the descriptor just opened.
        unsafe { libc::close(fd) };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-reach-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    /// A 0700 directory on the way is named, with its mode and the fix; a
    /// searchable path passes.
    #[test]
    fn an_unsearchable_parent_is_named_with_its_mode_and_the_fix() {
        let top = scratch("closed");
        let jails = top.join("state/jails");
        create_searchable(&jails).unwrap();
        check(&jails, 1_000_000_000).unwrap();
        fs::set_permissions(top.join("state"), fs::Permissions::from_mode(0o700)).unwrap();
        let e = check(&jails, 1_000_000_000).unwrap_err().to_string();
        let state = top.join("state");
        assert!(
            e.contains(&format!(
                "cannot search {} (mode 0700, owner 0:0)",
                state.display()
            )),
            "{e}"
        );
        assert!(e.contains(&format!("chmod o+x {}", state.display())), "{e}");
        fs::set_permissions(top.join("state"), fs::Permissions::from_mode(0o711)).unwrap();
        check(&jails, 1_000_000_000).unwrap();
        fs::remove_dir_all(&top).unwrap();
    }
}

//! VMM processes on the host: finding their programs, and starting them so
//! that they die with us.

use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;

/// Finds `prog` as given (a path) or on `PATH` (and `~/.cargo/bin`, where
/// `cargo install` puts vhost-device-vsock, often not on root's `PATH`).
pub fn find_program(prog: &Path) -> Option<PathBuf> {
    if prog.components().count() > 1 {
        return prog.is_file().then(|| prog.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(prog)).find(|p| p.is_file())
}

/// A request to the spawner thread.
type SpawnRequest = (Command, std::sync::mpsc::SyncSender<io::Result<Child>>);

/// Starts `cmd` so that it dies with us: `PR_SET_PDEATHSIG` fires when the
/// *thread* that forked exits, and runtime threads come and go (blocking
/// pool, `block_in_place`), so every VM process is forked by one thread
/// that lives as long as the process.
pub fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<SpawnRequest>>> =
        std::sync::OnceLock::new();
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("kiln-vm-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the VM spawner thread");
        Mutex::new(tx)
    });
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    tx.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .map_err(|_| io::Error::other("the VM spawner thread is gone"))?;
    // A fork and exec: short enough to wait for on a runtime thread.
    answer
        .recv()
        .map_err(|_| io::Error::other("the VM spawner thread is gone"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_by_path_or_on_path() {
        assert_eq!(find_program(Path::new("/bin/sh")), Some("/bin/sh".into()));
        assert!(find_program(Path::new("sh")).is_some());
        assert_eq!(find_program(Path::new("/nonexistent/qemu")), None);
        assert_eq!(find_program(Path::new("no-such-program-kiln")), None);
    }

    #[test]
    fn a_tied_child_runs_and_is_waited_for() {
        let mut c = spawn_tied(Command::new("/bin/true")).unwrap();
        assert!(c.wait().unwrap().success());
    }
}

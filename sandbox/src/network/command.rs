//! Running the data plane's tools (`ip` from iproute2, `nft` from
//! nftables, `conntrack`) inside a given network namespace: the child
//! joins it with `setns` between fork and exec, so that neither this
//! process nor any of its threads ever changes namespace for it; and
//! [`in_netns`], for sockets that must be made in the namespace.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};

/// Makes this thread (one that is about to serve in `netns` for its whole
/// life) a member of the network namespace `netns`.
pub fn enter_netns(netns: &File) -> std::io::Result<()> {
    // SAFETY: setns on a descriptor borrowed for the call, for the calling
    // thread only (CLONE_NEWNET); it changes no memory of this process.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the child `cmd` spawns join the network namespace `netns`
/// between fork and exec; `netns` must stay open until the spawn returns.
pub fn spawn_in_netns(cmd: &mut Command, netns: &File) {
    let fd = netns.as_raw_fd();
    // SAFETY: setns is async-signal-safe and touches no memory of the
    // parent; the descriptor stays open in the parent until the spawn
    // returns (the caller's promise), so it is valid in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `f` in the network namespace `netns` (here when `None`), on a
/// thread of its own that ends right after, so that no other thread of
/// this process ever changes namespace; what `f` makes (a socket) stays in
/// the namespace it was made in.
pub fn in_netns<T: Send>(
    netns: Option<&File>,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    let Some(ns) = netns else {
        return f();
    };
    std::thread::scope(|s| {
        s.spawn(move || {
            enter_netns(ns)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(std::io::Error::other(
                "the thread in the namespace panicked",
            ))
        })
    })
}

/// A data-plane command failed.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed: {reason}")]
pub struct CommandError {
    pub command: String,
    pub reason: String,
}

/// Runs `program args` (in `netns` when given), feeding `stdin`; returns
/// its standard output.
pub fn run(
    netns: Option<&File>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, CommandError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let fail = |reason: String| CommandError {
        command: command.clone(),
        reason,
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        spawn_in_netns(&mut cmd, ns);
    }
    let mut child = cmd.spawn().map_err(|e| {
        fail(if e.kind() == std::io::ErrorKind::NotFound {
            format!("{program} is not installed (Debian: iproute2, nftables, conntrack)")
        } else {
            e.to_string()
        })
    })?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes())
            .map_err(|e| fail(format!("writing its input: {e}")))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        let mut reason = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if let Some(input) = stdin {
            reason.push_str(&format!("\ninput was:\n{input}"));
        }
        return Err(fail(format!("{}: {reason}", out.status)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

//! Starting one Firecracker process, directly or under the jailer, up to
//! the point where its API socket accepts connections: the VM's state
//! directory and record, its root (the chroot when jailed) with every file
//! the VM needs made reachable in it, the spawn with the guest's console on
//! the VMM's stdin and stdout, the VMM's pid (from the jailer's pid file
//! under `--new-pid-ns`) held as a pidfd, and a bounded wait for the API.
//! Booting and restoring share this step and differ only in the API calls
//! that follow.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::api::ApiClient;
use super::config::{Binaries, FirecrackerConfig, PreflightError, VmResources};
use super::console::Console;
use super::jailer::{Jail, JailError};
use super::sys;
use super::teardown::{claims_dir, has_root, Remains, BACKEND, PID_FILE};
use crate::record::{Owner, Record};
use crate::vm::process::spawn_tied;
use crate::SandboxId;

/// Names of the VM's files inside its root.
pub(crate) mod names {
    pub const API_SOCKET: &str = "run/api.sock";
    pub const VSOCK_SOCKET: &str = "run/vsock.sock";
    pub const PAGES_SOCKET: &str = "run/pages.sock";
    pub const LOG: &str = "firecracker.log";
    pub const METRICS: &str = "metrics.json";
    pub const KERNEL: &str = "kernel";
    pub const ROOTFS: &str = "rootfs";
    pub const SCRATCH: &str = "scratch.img";
    pub const SNAPSHOT_DIR: &str = "snapshot";
    pub const VMSTATE: &str = "snapshot/vmstate";
    pub const MEMORY: &str = "snapshot/memory";
}

/// Where a VM's files are, for the host and for Firecracker.
#[derive(Debug, Clone)]
pub struct VmPaths {
    root: PathBuf,
    jailed: bool,
}

impl VmPaths {
    /// The VM's root on the host (the chroot's `/` when jailed).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the VMM is jailed (then it sees only its root).
    pub fn jailed(&self) -> bool {
        self.jailed
    }

    /// The host path of `name` in the root.
    pub fn host(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The path Firecracker is given for `name` in the root: inside the
    /// chroot when jailed, the host path otherwise.
    pub fn vmm(&self, name: &str) -> PathBuf {
        if self.jailed {
            Path::new("/").join(name)
        } else {
            self.root.join(name)
        }
    }
}

/// A host file the VM needs, made reachable in its root as `name`.
#[derive(Debug, Clone)]
pub(crate) struct RootFile {
    /// What it is, for messages ("the kernel").
    pub what: &'static str,
    pub source: PathBuf,
    pub name: &'static str,
    /// A unix socket the VMM connects to (needs write permission).
    pub socket: bool,
}

/// Why a Firecracker process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Firecracker cannot run here as configured.
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    /// The jail could not be planned.
    #[error(transparent)]
    Jail(#[from] JailError),
    /// A file or directory of the VM could not be created.
    #[error("cannot create {what} {path}: {source}")]
    Prepare {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file the VM needs could not be linked into its chroot.
    #[error("cannot make {what} {source_path} reachable in the jail as {target}: {source}{hint}", hint = if source.raw_os_error() == Some(libc::EXDEV) { " (hard links need one filesystem: put the jailer's chroot base on the same one)" } else { "" })]
    Link {
        what: &'static str,
        source_path: PathBuf,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file the VM needs does not exist.
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: PathBuf },
    /// The jailed VMM's uid could not use a file it needs.
    #[error("{what} {path} cannot be {action} by the jailed VMM (uid {uid}): {fix}")]
    Permission {
        what: &'static str,
        path: PathBuf,
        action: &'static str,
        uid: u32,
        fix: &'static str,
    },
    /// The process could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The jailer or Firecracker exited before the API was up.
    #[error("{program} exited ({status}) before Firecracker's API was up; stderr: {stderr}; Firecracker's log: {log}")]
    Exited {
        program: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
        log: String,
    },
    /// Firecracker exited before the API was up.
    #[error(
        "Firecracker exited before its API was up; stderr: {stderr}; Firecracker's log: {log}"
    )]
    Died { stderr: String, log: String },
    /// The jailer did not say which pid Firecracker has.
    #[error("the jailer exited without writing Firecracker's pid to {path}")]
    NoPid { path: PathBuf },
    /// A pidfd for Firecracker could not be opened (it died at once).
    #[error("cannot watch Firecracker (pid {pid}): {source}")]
    Watch {
        pid: u32,
        #[source]
        source: io::Error,
    },
    /// The API socket did not accept connections in time.
    #[error("Firecracker's API socket {socket} did not accept connections within {within:?}; stderr: {stderr}; Firecracker's log: {log}")]
    NotReady {
        socket: PathBuf,
        within: Duration,
        stderr: String,
        log: String,
    },
    /// The record could not be written.
    #[error("cannot write the VM's record in {dir}: {source}")]
    Record {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What a launch needs.
pub(crate) struct LaunchPlan<'a> {
    pub config: &'a FirecrackerConfig,
    pub id: SandboxId,
    pub resources: VmResources,
    pub files: Vec<RootFile>,
    /// Size of the per-sandbox writable disk to create, if any.
    pub scratch_mib: Option<u64>,
    /// The network namespace the VMM runs in.
    pub netns: NetnsPlan<'a>,
}

/// Where a VMM runs, network-wise.
pub(crate) enum NetnsPlan<'a> {
    /// A jailed VMM in a namespace of its own with only loopback
    /// (`JailerConfig::own_netns`), an unjailed one in ours.
    Default,
    /// A networked VM's: the host side's (this namespace when `None`),
    /// where its tap is.
    Join(Option<&'a std::fs::File>),
}

/// A Firecracker process whose API is up.
pub(crate) struct Launched {
    pub id: SandboxId,
    pub remains: Remains,
    pub api: ApiClient,
    pub console: Console,
    pub paths: VmPaths,
    pub pid: u32,
    /// The VMM's uid and gid when jailed.
    pub ids: Option<(u32, u32)>,
    /// From spawn to the API accepting a connection.
    pub api_ready: Duration,
}

/// Starts Firecracker for `plan` and waits until its API socket accepts a
/// connection. On error everything created so far is removed.
pub(crate) async fn launch(plan: LaunchPlan<'_>) -> Result<Launched, LaunchError> {
    let config = plan.config;
    let binaries = config.check()?;
    let layer = config.layer_dir();
    let dir = layer.join(plan.id.as_str());
    fs::create_dir_all(&dir).map_err(|source| LaunchError::Prepare {
        what: "the VM's state directory",
        path: dir.clone(),
        source,
    })?;
    let record_err = |source| LaunchError::Record {
        dir: dir.clone(),
        source,
    };
    let mut record = Record::new(
        BACKEND,
        plan.id.as_str(),
        Owner::current().map_err(record_err)?,
    );
    // Unjailed, the VM's files live in its state directory, whose removal
    // does not descend into subdirectories: the root is named.
    record.paths.push(dir.join("root"));
    record.write(&dir).map_err(record_err)?;
    let mut remains = Remains {
        record,
        dir: dir.clone(),
        vmm: None,
        children: Vec::new(),
        net: None,
    };
    match launch_in(&plan, &binaries, &mut remains).await {
        Ok(started) => Ok(Launched {
            id: plan.id.clone(),
            remains,
            api: started.api,
            console: started.console,
            paths: started.paths,
            pid: started.pid,
            ids: started.ids,
            api_ready: started.api_ready,
        }),
        Err(e) => {
            let report = tokio::task::spawn_blocking(move || remains.teardown())
                .await
                .unwrap_or_default();
            if !report.is_clean() {
                tracing::warn!(vm = %plan.id, leftovers = ?report.leftovers, "a failed launch left things behind");
            }
            Err(e)
        }
    }
}

/// [`Launched`] but for the remains, which the caller holds.
struct Started {
    api: ApiClient,
    console: Console,
    paths: VmPaths,
    pid: u32,
    ids: Option<(u32, u32)>,
    api_ready: Duration,
}

async fn launch_in(
    plan: &LaunchPlan<'_>,
    binaries: &Binaries,
    remains: &mut Remains,
) -> Result<Started, LaunchError> {
    let config = plan.config;
    let dir = remains.dir.clone();
    let record_err = |source| LaunchError::Record {
        dir: dir.clone(),
        source,
    };
    let jail = match (&config.jailer, &binaries.jailer) {
        (Some(jc), Some(_)) => {
            let jail = Jail::plan(
                jc,
                &claims_dir(&config.state_dir),
                &binaries.firecracker,
                &plan.id,
                plan.resources,
            )?;
            // Written down before anything of the jail exists (the claim
            // just made is named at once).
            remains.record.paths = vec![jail.dir.clone(), jail.claim.clone()];
            remains.record.cgroups = jail.cgroups.clone();
            remains.record.write(&dir).map_err(record_err)?;
            Some(jail)
        }
        _ => None,
    };
    let paths = VmPaths {
        root: jail
            .as_ref()
            .map_or_else(|| dir.join("root"), |j| j.root.clone()),
        jailed: jail.is_some(),
    };
    prepare_root(plan, &paths, jail.as_ref())?;

    let (program, args) = match &jail {
        Some(jail) => {
            let jc = config.jailer.as_ref().expect("jailed");
            let mut args = jail.args(jc, &binaries.firecracker, &plan.id);
            args.extend(firecracker_args(config, &paths, None));
            (binaries.jailer.clone().expect("jailed"), args)
        }
        None => (
            binaries.firecracker.clone(),
            firecracker_args(config, &paths, Some(&plan.id)),
        ),
    };
    let mut cmd = Command::new(&program);
    cmd.args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let own_netns = config.jailer.as_ref().is_some_and(|j| j.own_netns) && jail.is_some();
    match plan.netns {
        NetnsPlan::Default if own_netns => {
            // SAFETY: the closure only makes one async-signal-safe system call.
            unsafe { cmd.pre_exec(sys::unshare_network) };
        }
        NetnsPlan::Join(Some(ns)) => {
            let fd = std::os::fd::AsRawFd::as_raw_fd(ns);
            // SAFETY: setns is async-signal-safe and touches no memory;
            // `fd` is open until the spawn returns (the plan borrows it).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        NetnsPlan::Default | NetnsPlan::Join(None) => {}
    }
    let spawned = Instant::now();
    let mut child = spawn_tied(cmd).map_err(|source| LaunchError::Spawn {
        program: program.clone(),
        source,
    })?;
    let stdio = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let child_pid = child.id();
    remains.children.push(child);
    let (Some(stdin), Some(stdout), Some(stderr)) = stdio else {
        unreachable!("all three were piped");
    };
    let pipe = |source| LaunchError::Spawn {
        program: program.clone(),
        source,
    };
    let console = Console::attach(
        plan.id.as_str(),
        tokio::process::ChildStdin::from_std(stdin).map_err(pipe)?,
        tokio::process::ChildStdout::from_std(stdout).map_err(pipe)?,
        tokio::process::ChildStderr::from_std(stderr).map_err(pipe)?,
    );

    let socket = paths.host(names::API_SOCKET);
    let log = paths.host(names::LOG);
    let jailer_forks = jail.is_some() && config.jailer.as_ref().is_some_and(|j| j.new_pid_ns);
    let mut pid = (!jailer_forks).then_some(child_pid);
    let deadline = spawned + config.api_ready_timeout;
    loop {
        // The jailer under --new-pid-ns forks Firecracker, writes its pid
        // into the chroot and exits.
        let exited = remains.children[0].try_wait().ok().flatten();
        if let Some(status) = exited {
            if !(jailer_forks && status.success()) {
                return Err(LaunchError::Exited {
                    program: program.clone(),
                    status,
                    stderr: joined(&console.stderr_tail()),
                    log: log_tail(&log),
                });
            }
            if pid.is_none() {
                let pid_file = paths.host(PID_FILE);
                let found = fs::read_to_string(&pid_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok());
                pid = Some(found.ok_or(LaunchError::NoPid { path: pid_file })?);
            }
        }
        if let (Some(p), None) = (pid, &remains.vmm) {
            let fd = sys::pidfd_open(p).map_err(|source| LaunchError::Watch { pid: p, source })?;
            remains.vmm = Some(fd);
            remains.record.add_process(p as i32);
            remains.record.write(&dir).map_err(record_err)?;
        }
        if remains.vmm.is_some() && is_socket(&socket) && accepts(&socket).await {
            break;
        }
        if let Some(fd) = &remains.vmm {
            if sys::pidfd_wait_exit(fd, Duration::ZERO) {
                return Err(LaunchError::Died {
                    stderr: joined(&console.stderr_tail()),
                    log: log_tail(&log),
                });
            }
        }
        if Instant::now() >= deadline {
            return Err(LaunchError::NotReady {
                socket,
                within: config.api_ready_timeout,
                stderr: joined(&console.stderr_tail()),
                log: log_tail(&log),
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let api_ready = spawned.elapsed();
    let pid = pid.expect("the loop ends only once the pid is known");
    if let Some(j) = &jail {
        check_jailed(pid, j)?;
    }
    if jailer_forks {
        // The jailer has exited: reap it now rather than at teardown.
        for mut c in remains.children.drain(..) {
            let _ = c.wait();
        }
    }
    Ok(Started {
        api: ApiClient::new(socket, config.api_timeout),
        console,
        paths,
        pid,
        ids: jail.map(|j| (j.uid, j.gid)),
        api_ready,
    })
}

/// Firecracker's own arguments. Logs go to a file in the root (by default
/// they would go to stdout, mixed with the guest's console). Seccomp stays
/// on: Firecracker installs its built-in filters (which a build for a
/// target without upstream policies has empty; see docs/firecracker.md).
/// `id` is given when unjailed (the jailer passes its own `--id`).
fn firecracker_args(
    config: &FirecrackerConfig,
    paths: &VmPaths,
    id: Option<&SandboxId>,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--api-sock".into(),
        paths.vmm(names::API_SOCKET).into(),
        "--log-path".into(),
        paths.vmm(names::LOG).into(),
        "--level".into(),
        config.log_level.as_str().into(),
    ];
    if let Some(id) = id {
        args.push("--id".into());
        args.push(id.as_str().into());
    }
    args
}

/// Creates the VM's root with everything Firecracker opens: `run/`, the
/// log and metrics files, the writable disk, the snapshot directory, and
/// the host files of `plan` (hard-linked in when jailed). Files the VMM
/// writes are owned by its uid when jailed.
fn prepare_root(
    plan: &LaunchPlan<'_>,
    paths: &VmPaths,
    jail: Option<&Jail>,
) -> Result<(), LaunchError> {
    let root = paths.root();
    let prepare = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| LaunchError::Prepare { what, path, source }
    };
    for d in [
        root.to_owned(),
        paths.host("run"),
        paths.host(names::SNAPSHOT_DIR),
    ] {
        fs::create_dir_all(&d).map_err(prepare("a directory of the VM", &d))?;
        if let Some(j) = jail {
            j.own(&d).map_err(prepare("a directory of the VM", &d))?;
        }
    }
    for (what, name) in [
        ("Firecracker's log", names::LOG),
        ("Firecracker's metrics file", names::METRICS),
    ] {
        let p = paths.host(name);
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&p)
            .map_err(prepare(what, &p))?;
        if let Some(j) = jail {
            j.own(&p).map_err(prepare(what, &p))?;
        }
    }
    if let Some(mib) = plan.scratch_mib {
        let p = paths.host(names::SCRATCH);
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .map_err(prepare("the writable disk", &p))?;
        f.set_len(mib << 20)
            .map_err(prepare("the writable disk", &p))?;
        if let Some(j) = jail {
            j.own(&p).map_err(prepare("the writable disk", &p))?;
        }
    }
    for f in &plan.files {
        if !f.socket && !f.source.is_file() || f.socket && !is_socket(&f.source) {
            return Err(LaunchError::Missing {
                what: f.what,
                path: f.source.clone(),
            });
        }
        let Some(j) = jail else { continue };
        let target = j
            .link_in(&f.source, f.name)
            .map_err(|source| LaunchError::Link {
                what: f.what,
                source_path: f.source.clone(),
                target: paths.host(f.name),
                source,
            })?;
        let (allowed, action, fix) = if f.socket {
            (
                j.can_connect(&target),
                "connected to",
                "give the socket mode 0o666 (the page server's `socket_mode`) and keep its directory root-only",
            )
        } else {
            (
                j.can_read(&target),
                "read",
                "make it world-readable (mode 0o644 or 0o444)",
            )
        };
        if !allowed {
            return Err(LaunchError::Permission {
                what: f.what,
                path: f.source.clone(),
                action,
                uid: j.uid,
                fix,
            });
        }
    }
    Ok(())
}

/// Checks that the jailed VMM `pid` lives in its jail (its root is the
/// chroot), so that a pid read from the jailer's file is never someone
/// else's.
fn check_jailed(pid: u32, jail: &Jail) -> Result<(), LaunchError> {
    if has_root(pid, &jail.root) {
        return Ok(());
    }
    Err(LaunchError::Watch {
        pid,
        source: io::Error::other(format!(
            "its root directory is not the jail's {}",
            jail.root.display()
        )),
    })
}

fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

async fn accepts(socket: &Path) -> bool {
    tokio::net::UnixStream::connect(socket).await.is_ok()
}

fn joined(lines: &[String]) -> String {
    if lines.is_empty() {
        "(nothing)".into()
    } else {
        lines.join(" | ")
    }
}

/// The last lines of Firecracker's log, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(8)..];
    if tail.is_empty() {
        "(empty)".into()
    } else {
        tail.join(" | ")
    }
}

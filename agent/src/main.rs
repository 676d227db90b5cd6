//! `kiln-agent`: the program inside every Kiln sandbox. It is the init of
//! the sandbox (PID 1 of a jail's pid namespace, or of a microVM guest),
//! speaks the host<->agent frame protocol of `kiln-protocol` on one socket,
//! and runs the jobs the host asks for: it writes their files, starts them
//! (cold, or through a pre-warmed interpreter), streams their output, and
//! reports how they ended. See README.md for the design.

mod agent;
mod cli;
mod files;
mod guest;
mod log;
mod port;
mod room;
mod spawn;
mod sys;
mod zygote;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;

use cli::Mode;

fn main() -> ExitCode {
    log::init_from_env();
    // Started by a kernel with no arguments: the init of a guest.
    let bare_init = sys::getpid() == 1 && std::env::args().len() == 1;
    let mode = match cli::parse(std::env::args().skip(1)) {
        _ if bare_init => Mode::GuestInit,
        Ok(m) => m,
        Err(e) => {
            eprintln!("kiln-agent: {e}\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    match mode {
        Mode::Version => {
            println!("kiln-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Mode::Help => {
            println!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Mode::Fd(fd) => run(|agent| serve_fd(agent, fd)),
        Mode::Vsock(port) => run(|agent| serve_vsock(agent, port, || {})),
        Mode::GuestInit => match guest::setup() {
            Ok(cfg) => run(|agent| {
                agent.serve_guest();
                match &cfg.vport {
                    Some(name) => port::serve(agent, name),
                    None => serve_vsock(agent, cfg.port, || guest::announce(&cfg)),
                }
            }),
            Err(e) => {
                log_error!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Prepares the process (descriptors, reaping, signals), runs `serve`, then
/// kills and reaps everything that is left.
fn run(serve: impl FnOnce(&mut agent::Agent) -> Result<(), String>) -> ExitCode {
    if let Err(e) = prepare_descriptors() {
        log_error!("{e}");
        return ExitCode::FAILURE;
    }
    let is_init = sys::getpid() == 1;
    if !is_init {
        // Orphans of jobs must still come back to the agent to be reaped.
        if let Err(e) = sys::become_subreaper() {
            log_warn!("cannot become a child subreaper: {e}");
        }
    }
    let signals = match sys::block_signals_into_signalfd() {
        Ok(fd) => fd,
        Err(e) => {
            log_error!("cannot set up the signalfd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut agent = agent::Agent::new(signals, is_init);
    let result = serve(&mut agent);
    agent.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log_error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Makes sure fds 0-2 are open (so no job pipe lands on them) and that no
/// descriptor inherited from whoever started the agent leaks into jobs.
fn prepare_descriptors() -> Result<(), String> {
    for fd in 0..3 {
        if !sys::fd_is_open(fd) {
            let null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(|e| format!("cannot open /dev/null: {e}"))?;
            // Opening takes the lowest free number, which is `fd`; keep it.
            std::mem::forget(null);
        }
    }
    // SAFETY: marks descriptors close-on-exec; no memory arguments.
    let r = unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) };
    if r == -1 {
        // Kernels before 5.11: mark the ones that are open one by one.
        for entry in std::fs::read_dir("/proc/self/fd")
            .map_err(|e| format!("cannot list /proc/self/fd: {e}"))?
            .flatten()
        {
            if let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                if fd > 2 {
                    let _ = sys::set_cloexec(fd);
                }
            }
        }
    }
    Ok(())
}

fn serve_fd(agent: &mut agent::Agent, fd: i32) -> Result<(), String> {
    if fd < 3 || !sys::fd_is_open(fd) {
        return Err(format!(
            "--fd {fd}: not an open descriptor above stderr; the host must pass the connected socket"
        ));
    }
    // SAFETY: the descriptor is open and handed to the agent alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    log_info!("serving the host on fd {fd}");
    agent
        .serve(sock)
        .map_err(|e| format!("serving fd {fd} failed: {e}"))
}

/// Listens on vsock `port`, calls `listening` once it does, then serves
/// connections one after another.
fn serve_vsock(
    agent: &mut agent::Agent,
    port: u32,
    listening: impl FnOnce(),
) -> Result<(), String> {
    let listener = sys::vsock_listen(libc::VMADDR_CID_ANY, port)
        .map_err(|e| format!("cannot listen on vsock port {port}: {e}"))?;
    log_info!("listening on vsock port {port}");
    listening();
    loop {
        agent
            .wait_readable(listener.as_raw_fd())
            .map_err(|e| format!("waiting for a connection failed: {e}"))?;
        match sys::accept(listener.as_raw_fd()) {
            Ok(conn) => {
                if let Err(e) = agent.serve(conn) {
                    log_warn!("connection failed: {e}");
                }
            }
            Err(e) => log_warn!("accept on vsock port {port} failed: {e}"),
        }
    }
}

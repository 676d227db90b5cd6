//! The jail's seccomp filters: deny lists of the system calls that untrusted
//! code never needs and that widen the kernel's attack surface or would undo
//! the jail (new namespaces, mounts, tracing, kernel modules, eBPF,
//! io_uring, which bypasses seccomp for the operations it queues).
//! Everything else is allowed: interpreters use a long and changing tail of
//! system calls, and an allow list that breaks `pip` or `node` on the next
//! distribution upgrade protects nobody. Compiled with `seccompiler`.
//!
//! The list is split in two, because the agent needs a few of its calls to
//! make rooms (`clone` with new pid, mount, network and IPC namespaces;
//! `mount`, the new mount API calls that attach a tmpfs, and `setns`):
//! [`cell_filters`] holds the rest and is installed on the agent, so that
//! everything in the jail inherits it; [`job_filters`] holds those few and
//! is installed by every job process as its last step before job code (the
//! agent hands it on, see `Rooms::job_filters`). Filters stack, so a job is
//! bound by the whole list. A job installs only the short part: a fork of
//! the zygote compiles it per job, and the whole list cost it a tenth of its
//! CPU (two programs through the kernel's checker and JIT).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Why the filter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the rules (a bug in this module).
    #[error("building the seccomp filter failed")]
    Build(#[from] seccompiler::BackendError),
    /// seccompiler could not compile the filter to BPF.
    #[error("compiling the seccomp filter failed")]
    Compile(#[source] seccompiler::BackendError),
}

/// System calls answered with `EPERM`.
const DENIED: &[i64] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_userfaultfd,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_vhangup,
    libc::SYS_fanotify_init,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_lookup_dcookie,
    libc::SYS_uselib,
    libc::SYS_personality,
];

/// `clone` flags that create namespaces; `clone` with any of them is denied.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// What the agent keeps for making rooms (see the module docs).
const ROOM_MAKING: &[i64] = &[
    libc::SYS_mount,
    libc::SYS_setns,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_move_mount,
];

/// Namespaces a room has of its own, which the agent may `clone` into.
const ROOM_NAMESPACES: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
];

/// The filters every job process installs on top of the jail's, in
/// order: room making denied.
pub fn job_filters() -> Result<Vec<BpfProgram>, SeccompError> {
    let deny = deny_list(ROOM_MAKING, ROOM_NAMESPACES, false)?;
    Ok(vec![
        BpfProgram::try_from(deny).map_err(SeccompError::Compile)?
    ])
}

/// The filters of the agent and all of the jail, in order: everything but
/// room making.
pub fn cell_filters() -> Result<Vec<BpfProgram>, SeccompError> {
    let denied: Vec<i64> = DENIED
        .iter()
        .copied()
        .filter(|nr| !ROOM_MAKING.contains(nr))
        .collect();
    let clone_flags: Vec<u64> = NAMESPACE_FLAGS
        .iter()
        .copied()
        .filter(|f| !ROOM_NAMESPACES.contains(f))
        .collect();
    // Two programs because seccompiler gives a filter one match action:
    // the deny list answers `EPERM`, while `clone3` answers `ENOSYS` so that
    // libc falls back to `clone`, whose flags (unlike `clone3`'s, which sit
    // behind a pointer) the filter can inspect.
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?;
    [deny_list(&denied, &clone_flags, true)?, clone3]
        .into_iter()
        .map(|f| BpfProgram::try_from(f).map_err(SeccompError::Compile))
        .collect()
}

/// A program in the wire format `Rooms::job_filters` carries
/// (`kiln_sys::seccomp`).
pub fn to_bytes(program: &BpfProgram) -> Vec<u8> {
    let insns: Vec<libc::sock_filter> = program
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    kiln_sys::seccomp::encode(&insns)
}

/// A filter answering `EPERM` to `denied`, to `clone` with any of
/// `clone_flags`, and (`personality`) to changing the persona.
fn deny_list(
    denied: &[i64],
    clone_flags: &[u64],
    personality: bool,
) -> Result<SeccompFilter, SeccompError> {
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> =
        denied.iter().map(|&nr| (nr, Vec::new())).collect();
    if personality {
        // `personality` is used by some runtimes to query the persona; only
        // changing it is refused (0xffffffff queries).
        deny.insert(
            libc::SYS_personality,
            vec![SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Ne,
                0xffff_ffff,
            )?])?],
        );
    }
    let clone_rules = clone_flags
        .iter()
        .map(|&f| {
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(f),
                f,
            )?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    deny.insert(libc::SYS_clone, clone_rules);
    Ok(SeccompFilter::new(
        deny,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_to_nonempty_programs() {
        let (job, cell) = (job_filters().unwrap(), cell_filters().unwrap());
        assert_eq!((job.len(), cell.len()), (1, 2));
        for p in job.iter().chain(&cell) {
            assert!(!p.is_empty());
            assert_eq!(to_bytes(p).len(), p.len() * 8);
        }
        assert!(
            job[0].len() * 3 < cell[0].len(),
            "a job installs the short part: {} vs {} instructions",
            job[0].len(),
            cell[0].len()
        );
    }
}

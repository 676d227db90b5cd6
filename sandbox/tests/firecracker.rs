//! The Firecracker layer against a real Firecracker on real KVM, with
//! Kiln's test guest (`kiln-test-guest`): boot and the guest's line
//! protocol, the API's answers and refusals, machine configuration from the
//! limits, pause and resume, the jailer's confinement seen from the host,
//! metrics, teardown, and reaping after the owner is SIGKILLed. Needs root,
//! `KILN_FIRECRACKER_BIN` and `KILN_JAILER_BIN`; without them each test
//! says it was skipped and why (`KILN_REQUIRE_FIRECRACKER=1` makes that a
//! failure).

mod firecracker_harness;

use std::fs;
use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::MetadataExt as _;
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use firecracker_harness::{
    ask, assert_pattern, exists, ready, scope, small, ticks, write_pattern, GUEST, HOST,
};
use kiln_sandbox::firecracker::{
    reap_orphans, FirecrackerVm, Fleet, InstanceState, LaunchError, MachineConfig, PreflightError,
    StartError, VmResources,
};
use kiln_sandbox::SandboxSpec;
use kiln_test_guest::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_the_test_guest_and_exchanges_commands() {
    let Some(scope) = scope("boot") else { return };
    let vm = FirecrackerVm::start(&scope.config(false), &scope.boot_spec(small()))
        .await
        .expect("boot");
    ready(&vm).await;
    assert_eq!(
        ask(&vm, Command::Echo("hello kiln".into())).await,
        "echo hello kiln"
    );
    write_pattern(&vm, 11, 64).await;
    assert_pattern(&vm, 11, 64).await;
    // Another seed's pattern is not there.
    let other = kiln_test_guest::parse_check(
        &ask(
            &vm,
            Command::Check {
                seed: 12,
                pages: 64,
            },
        )
        .await,
    )
    .unwrap();
    assert_eq!((other.ok, other.bad), (0, 64));
    assert_eq!(
        ask(
            &vm,
            Command::Write {
                seed: 1,
                pages: 100_000
            }
        )
        .await,
        "error: too many pages"
    );

    let info = vm.info().await.unwrap();
    assert_eq!(info.state, InstanceState::Running);
    assert_eq!(info.id, vm.id().as_str());
    let version = vm.api().version().await.unwrap();
    assert_eq!(version.firecracker_version, info.vmm_version);
    let timings = vm.boot_timings().expect("a booted VM has boot timings");
    assert!(timings.api_ready > Duration::ZERO);

    let pid = vm.pid();
    let root = vm.paths().root().to_owned();
    assert!(exists(pid));
    let report = vm.destroy().await;
    assert!(report.is_clean(), "{report:?}");
    assert!(!exists(pid), "Firecracker {pid} is gone and reaped");
    assert!(!root.exists());
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_refusals_keep_its_status_and_fault_message() {
    let Some(scope) = scope("refusals") else {
        return;
    };
    let vm = FirecrackerVm::start(&scope.config(false), &scope.boot_spec(small()))
        .await
        .expect("boot");
    ready(&vm).await;
    let e = vm
        .api()
        .put_machine_config(&MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            smt: false,
            track_dirty_pages: false,
            huge_pages: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.status().map(|s| s.as_u16()), Some(400));
    assert_eq!(
        e.fault_message(),
        Some("The requested operation is not supported after starting the microVM.")
    );
    assert!(e.to_string().contains("PUT /machine-config"), "{e}");
    // So is moving the logger (possible before boot only; Kiln gives the
    // log file on the command line).
    let e = vm
        .api()
        .put_logger(&kiln_sandbox::firecracker::Logger {
            log_path: vm.paths().vmm("moved.log"),
            level: Some(kiln_sandbox::firecracker::LogLevel::Debug),
            show_level: true,
            show_log_origin: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.fault_message(),
        Some("The requested operation is not supported after starting the microVM.")
    );
    // The machine did not change, and the VM still answers.
    assert_eq!(vm.api().machine_config().await.unwrap().mem_size_mib, 128);
    assert!(
        fs::read_to_string(vm.log_path())
            .unwrap()
            .contains("/machine-config"),
        "Firecracker's log records the API calls"
    );
    assert_eq!(ask(&vm, Command::Echo("still".into())).await, "echo still");
    assert!(vm.destroy().await.is_clean());
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_machine_follows_the_sandbox_limits() {
    let Some(scope) = scope("machine") else {
        return;
    };
    let sandbox = SandboxSpec {
        memory_mb: 96,
        cpu_millis: 1500,
        ..SandboxSpec::for_job(&Default::default(), "python")
    };
    let resources = VmResources::for_sandbox(&sandbox, 64, 4);
    assert_eq!((resources.vcpus, resources.memory_mib), (2, 160));
    // A read-only root (any file will do: the test guest has no block
    // driver), a writable disk, vsock and entropy.
    let rootfs = scope.dir.join("rootfs.img");
    fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
    let mut spec = scope.boot_spec(resources);
    spec.root_drive = Some(rootfs.clone());
    spec.scratch_disk_mib = Some(sandbox.disk_mb);
    spec.vsock_cid = Some(3);
    spec.entropy = true;
    let vm = FirecrackerVm::start(&scope.config(true), &spec)
        .await
        .expect("boot");
    ready(&vm).await;

    // What the guest was told: e820 RAM and the MP table's processors.
    let mem = kiln_test_guest::parse_mem(&ask(&vm, Command::Mem).await).unwrap();
    assert_eq!(mem, 160 << 20);
    let cpus = kiln_test_guest::parse_cpus(&ask(&vm, Command::Cpus).await).unwrap();
    assert_eq!(cpus, 2);

    // What Firecracker holds.
    let config = vm.api().vm_config().await.unwrap();
    let machine = config.machine_config.unwrap();
    assert_eq!((machine.vcpu_count, machine.mem_size_mib), (2, 160));
    let mut drives: Vec<_> = config
        .drives
        .iter()
        .map(|d| {
            (
                d.drive_id.as_str(),
                d.is_root_device,
                d.is_read_only,
                d.path_on_host.to_string_lossy().into_owned(),
            )
        })
        .collect();
    drives.sort();
    // Paths given to a jailed Firecracker are inside its chroot.
    assert_eq!(
        drives,
        [
            ("rootfs", true, true, "/rootfs".into()),
            ("scratch", false, false, "/scratch.img".into())
        ]
    );
    assert_eq!(config.vsock.as_ref().map(|v| v.guest_cid), Some(3));
    assert!(config.entropy.is_some());
    let scratch = vm.paths().host("scratch.img");
    assert_eq!(fs::metadata(&scratch).unwrap().len(), sandbox.disk_mb << 20);
    let vsock = vm.vsock_uds().unwrap();
    tokio::net::UnixStream::connect(&vsock)
        .await
        .expect("the vsock device's host socket accepts connections");
    // The root disk was linked, not copied.
    assert_eq!(fs::metadata(&rootfs).unwrap().nlink(), 2);

    assert!(vm.destroy().await.is_clean());
    assert_eq!(fs::metadata(&rootfs).unwrap().nlink(), 1);
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_guest_stops_and_goes_on_after_resume() {
    let Some(scope) = scope("pause") else { return };
    let vm = FirecrackerVm::start(&scope.config(false), &scope.boot_spec(small()))
        .await
        .expect("boot");
    ready(&vm).await;
    let before = ticks(&vm).await;

    vm.pause().await.unwrap();
    assert_eq!(vm.info().await.unwrap().state, InstanceState::Paused);
    // A paused guest runs nothing, so it cannot answer; the command waits
    // in the UART.
    vm.console()
        .send_line(&Command::Count.line())
        .await
        .unwrap();
    let silent = vm.console().next_line(Duration::from_millis(1500)).await;
    assert!(silent.is_err(), "a paused guest answered: {silent:?}");

    vm.resume().await.unwrap();
    assert_eq!(vm.info().await.unwrap().state, InstanceState::Running);
    let answered = vm
        .console()
        .next_line(GUEST)
        .await
        .expect("the answer after resume");
    let at_resume = kiln_test_guest::parse_count(&answered).unwrap();
    assert!(at_resume >= before, "{at_resume} < {before}");
    // And its clock goes on.
    let deadline = Instant::now() + GUEST;
    let mut now = at_resume;
    while now <= at_resume && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = ticks(&vm).await;
    }
    assert!(
        now > at_resume,
        "the guest's ticks stayed at {now} after resume"
    );
    assert!(vm.destroy().await.is_clean());
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

/// `key:\tvalue...` of `/proc/<pid>/status`.
fn status_field(pid: u32, key: &str) -> Vec<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn namespace(pid: u32, kind: &str) -> std::path::PathBuf {
    fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jailer_confines_the_vmm() {
    let Some(scope) = scope("jailer") else { return };
    let resources = VmResources {
        vcpus: 1,
        memory_mib: 128,
        cpu_millis: 500,
    };
    let vm = FirecrackerVm::start(&scope.config(true), &scope.boot_spec(resources))
        .await
        .expect("boot under the jailer");
    ready(&vm).await;
    write_pattern(&vm, 3, 512).await;
    let pid = vm.pid();
    let (uid, gid) = vm.jail_ids().expect("a jailed VM has ids");
    assert!(scope.ids.contains(uid));

    // Chroot: its root is the jail's, which holds only what the VM needs.
    let root = vm.paths().root().to_owned();
    assert!(firecracker_harness::has_root(pid, &root));
    assert!(root.starts_with(scope.chroot_base()));
    let mut inside: Vec<String> = fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    inside.sort();
    assert_eq!(
        inside,
        [
            "dev",
            "firecracker",
            "firecracker.log",
            "firecracker.pid",
            "kernel",
            "metrics.json",
            "run",
            "snapshot"
        ]
    );
    // Its own uid and gid, no capabilities.
    assert!(status_field(pid, "Uid")
        .iter()
        .all(|u| *u == uid.to_string()));
    assert!(status_field(pid, "Gid")
        .iter()
        .all(|g| *g == gid.to_string()));
    assert_eq!(status_field(pid, "CapEff"), ["0000000000000000"]);
    // Pid 1 of its own pid namespace, in a network namespace of its own.
    assert_eq!(status_field(pid, "NSpid"), [pid.to_string(), "1".into()]);
    let me = std::process::id();
    assert_ne!(namespace(pid, "pid"), namespace(me, "pid"));
    assert_ne!(namespace(pid, "net"), namespace(me, "net"));
    assert_ne!(namespace(pid, "mnt"), namespace(me, "mnt"));
    // Seccomp is on (in this build the filter allows everything; see
    // docs/firecracker.md) on every Firecracker thread.
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let tid: u32 = task.file_name().to_str().unwrap().parse().unwrap();
        let name = fs::read_to_string(task.path().join("comm")).unwrap();
        if name.starts_with("fc_") || name.trim() == "firecracker" {
            assert_eq!(status_field(tid, "Seccomp"), ["2"], "thread {name}");
        }
    }
    // Cgroups: the limits, the VMM inside, its memory charged there.
    let cgroups = vm.cgroups().to_vec();
    let memory = cgroups
        .iter()
        .find(|d| d.starts_with("/sys/fs/cgroup/memory"))
        .expect("a memory cgroup");
    let read = |dir: &std::path::Path, file: &str| -> String {
        fs::read_to_string(dir.join(file))
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(
        read(memory, "memory.limit_in_bytes"),
        ((128u64 + 32) << 20).to_string()
    );
    assert!(read(memory, "cgroup.procs")
        .lines()
        .any(|p| p == pid.to_string()));
    let usage: u64 = read(memory, "memory.usage_in_bytes").parse().unwrap();
    assert!(
        usage > 512 * 4096,
        "the guest's pages are charged to the jail: {usage}"
    );
    let cpu = cgroups
        .iter()
        .find(|d| d.starts_with("/sys/fs/cgroup/cpu/"))
        .expect("a cpu cgroup");
    assert_eq!(read(cpu, "cpu.cfs_quota_us"), "50000");
    // No mount of the jail is visible on the host.
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&*root.to_string_lossy()));

    let report = vm.destroy().await;
    assert!(report.is_clean(), "{report:?}");
    assert!(
        !exists(pid),
        "the jailed Firecracker {pid} is gone and reaped"
    );
    for d in &cgroups {
        assert!(!d.exists(), "{} was removed", d.display());
    }
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_guests_exits() {
    let Some(scope) = scope("metrics") else {
        return;
    };
    let vm = FirecrackerVm::start(&scope.config(true), &scope.boot_spec(small()))
        .await
        .expect("boot");
    ready(&vm).await;
    // The backend's fleet, which feeds Kiln's /metrics, follows the VM.
    let fleet = Fleet::default();
    let ticket = fleet.enroll(vm.metrics_reader());
    let first = vm.metrics().await.unwrap();
    for i in 0..5 {
        assert_eq!(
            ask(&vm, Command::Echo(i.to_string())).await,
            format!("echo {i}")
        );
    }
    let then = vm.metrics().await.unwrap();
    assert!(then.lines > first.lines);
    // Each byte the guest reads or writes on COM1 is a port I/O exit.
    // Firecracker counts an exit after handling it, so the last byte of the
    // last answer may reach us before its count does; the four answers
    // before it are counted for sure (the guest could not read the next
    // command before the count of its last byte).
    let echoed = 4 * "echo 0\n".len() as u64;
    let delta = (
        then.vcpu.exit_io_out - first.vcpu.exit_io_out,
        then.uart.write_count - first.uart.write_count,
        then.uart.read_count - first.uart.read_count,
    );
    assert!(
        delta.0 >= echoed && delta.1 >= echoed && delta.2 >= echoed,
        "{delta:?} for {echoed} bytes each way; before {first:?}, after {then:?}"
    );
    assert_eq!((then.vmm.panic_count, then.seccomp.num_faults), (0, 0));
    let scrape = |fleet: &Fleet| {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(fleet.collector());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    };
    let exported = |text: &str, series: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    let live = scrape(&fleet);
    assert_eq!(exported(&live, "kiln_firecracker_vms"), 1, "{live}");
    let io_out = r#"kiln_firecracker_vcpu_exits_total{kind="io_out"}"#;
    assert!(exported(&live, io_out) >= then.vcpu.exit_io_out, "{live}");
    assert!(live.contains("# HELP kiln_firecracker_vcpu_exits vCPU exits"));
    // Retired (its sandbox destroyed), the VM's counts stay in the totals.
    drop(ticket);
    let after = scrape(&fleet);
    assert_eq!(exported(&after, "kiln_firecracker_vms"), 0, "{after}");
    assert_eq!(exported(&after, "kiln_firecracker_vms_started_total"), 1);
    assert!(
        exported(&after, io_out) >= exported(&live, io_out),
        "{after}"
    );
    assert_eq!(
        exported(&after, "kiln_firecracker_metrics_read_errors_total"),
        0
    );
    assert!(vm.destroy().await.is_clean());
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_binaries_fail_at_start_naming_the_setting() {
    // Needs no Firecracker: the point is what happens without one.
    let dir = std::env::temp_dir().join(format!("kfc-{}-missing", std::process::id()));
    let mut config = kiln_sandbox::firecracker::FirecrackerConfig::from_env();
    config.state_dir = dir.clone();
    config.firecracker_bin = dir.join("no-firecracker");
    config.jailer = None;
    let spec = kiln_sandbox::firecracker::BootSpec::new(kiln_test_guest::elf(), small());
    let e = FirecrackerVm::start(&config, &spec).await.unwrap_err();
    assert!(
        matches!(
            e,
            StartError::Launch(LaunchError::Preflight(
                PreflightError::FirecrackerMissing { .. }
            ))
        ),
        "{e}"
    );
    assert!(e.to_string().contains("KILN_FIRECRACKER_BIN"), "{e}");

    config.firecracker_bin = "/bin/true".into();
    config.jailer = Some(Default::default());
    config.jailer_bin = dir.join("no-jailer");
    let e = FirecrackerVm::start(&config, &spec).await.unwrap_err();
    assert!(e.to_string().contains("KILN_JAILER_BIN"), "{e}");
    assert!(!dir.exists(), "a failed preflight creates nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_that_is_not_there_is_named() {
    let Some(scope) = scope("nokernel") else {
        return;
    };
    let spec = scope.boot_spec(small());
    let mut spec = spec;
    spec.kernel = scope.dir.join("no-such-vmlinux");
    for jailed in [false, true] {
        let e = FirecrackerVm::start(&scope.config(jailed), &spec)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no-such-vmlinux"), "{e}");
    }
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

/// Where the owner child of the SIGKILL test takes its orders from.
const OWNER_VAR: &str = "KILN_TEST_FC_OWNER";

/// Entry point of the owner child (see the test below): starts one jailed
/// and one unjailed VM, tells the parent about them, then waits to be
/// killed.
#[test]
fn sigkilled_owner_child() {
    let Ok(dir) = std::env::var(OWNER_VAR) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let scope = firecracker_harness::Scope::with_tag(
            &std::env::var("KILN_TEST_FC_SCOPE").unwrap(),
            std::env::var_os("KILN_FIRECRACKER_BIN").unwrap().into(),
            std::env::var_os("KILN_JAILER_BIN").unwrap().into(),
        );
        assert_eq!(scope.dir.to_string_lossy(), dir);
        let mut vms = Vec::new();
        for jailed in [true, false] {
            let vm = FirecrackerVm::start(&scope.config(jailed), &scope.boot_spec(small()))
                .await
                .expect("boot in the owner child");
            ready(&vm).await;
            write_pattern(&vm, 5, 32).await;
            println!(
                "OWNED {} {} {}",
                vm.id(),
                vm.pid(),
                vm.paths().root().display()
            );
            vms.push(vm);
        }
        println!("OWNER READY");
        // Killed long before this ends; leak the scope so nothing is
        // cleaned up by us.
        std::mem::forget(scope);
        tokio::time::sleep(Duration::from_secs(120)).await;
        std::mem::forget(vms);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaping_after_the_owner_is_sigkilled_leaves_nothing() {
    let Some(scope) = scope("reap") else { return };
    // The owner uses this test's scope (same directory, cgroup parent and
    // uid range): its Scope::new recreates the same paths.
    let tag = format!("kfc-{}-reap-child", std::process::id());
    let child_scope =
        firecracker_harness::Scope::with_tag(&tag, scope.firecracker.clone(), scope.jailer.clone());
    let child_dir = child_scope.dir.clone();
    let mut child = Process::new(std::env::current_exe().unwrap())
        .args([
            "sigkilled_owner_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(OWNER_VAR, &child_dir)
        .env("KILN_TEST_FC_SCOPE", &tag)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // Read the child's report on a thread, bounded by a deadline.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut owned = Vec::new();
    let deadline = Instant::now() + GUEST * 2;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("OWNER READY") => break,
            Ok(line) => {
                if let Some(rest) = line.split("OWNED ").nth(1) {
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    owned.push((
                        f[0].to_owned(),
                        f[1].parse::<u32>().unwrap(),
                        f[2].to_owned(),
                    ));
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the owner child did not start its VMs in time");
            }
        }
    }
    assert_eq!(owned.len(), 2);
    // SIGKILL the owner: no teardown runs.
    child.kill().unwrap();
    child.wait().unwrap();
    let (jailed_id, jailed_pid, _) = owned[0].clone();
    let (plain_id, plain_pid, _) = owned[1].clone();
    // The unjailed VMM dies with its owner (parent-death signal); the
    // jailed one, dropped to another uid, does not.
    let plain_gone = kiln_tests::wait_empty(HOST, || {
        if fs::read_to_string(format!("/proc/{plain_pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
        {
            vec![plain_pid]
        } else {
            vec![]
        }
    });
    assert!(
        plain_gone.is_empty(),
        "the unjailed VMM died with its owner"
    );
    assert!(exists(jailed_pid), "the jailed VMM outlives its owner");
    assert!(!child_scope.leftovers().is_empty());

    let report = reap_orphans(&child_scope.state_dir());
    let mut reaped = report.reaped.clone();
    reaped.sort();
    let mut expected = vec![jailed_id, plain_id];
    expected.sort();
    assert_eq!(reaped, expected, "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(!exists(jailed_pid), "the jailed VMM was killed and reaped");
    assert_eq!(child_scope.wait_clean(), Vec::<String>::new());
    // A second reap finds nothing.
    assert_eq!(reap_orphans(&child_scope.state_dir()), Default::default());
    drop(child_scope);
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

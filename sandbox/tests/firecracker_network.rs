//! Network interfaces of Firecracker VMs on a real Firecracker, with
//! Kiln's test guest (this host's KVM runs no Linux guest, so no packet
//! crosses the NIC here; `tests/tests/qemu_network.rs` shows the data
//! plane with real guests). What runs for real: the sandbox's network
//! lease (Kiln's table and resolver in a host side the test makes), its
//! tap made in the host side and owned by the jailed VMM's uid, the VMM
//! started in that namespace, Firecracker accepting the interface with
//! rx/tx rate limiters from the lease's rate and opening the tap; the tap
//! gone after teardown, and after the owner is SIGKILLed and the VMM and
//! network reaped. Needs root, iproute2, nftables, conntrack,
//! `KILN_FIRECRACKER_BIN` and `KILN_JAILER_BIN` (else each test says it
//! was skipped and why; `KILN_REQUIRE_FIRECRACKER=1` makes that a
//! failure).

mod firecracker_harness;

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::sync::Arc;
use std::time::Instant;

use firecracker_harness::{exists, ready, scope, small, GUEST, HOST};
use kiln_sandbox::firecracker::{reap_orphans, FirecrackerVm, RateLimiter, VmNic};
use kiln_sandbox::network::{Network, NetworkSettings};
use kiln_tests::netlab::World;

const MBIT: u32 = 40;

fn network(world: &World, state_dir: &Path) -> Arc<Network> {
    let settings = NetworkSettings {
        enabled: true,
        pool: "10.213.0.0/24".into(),
        host_netns: Some(world.host_ns()),
        upstream_dns: vec!["198.18.0.2:53".into()],
        rate_mbit: MBIT,
        ..NetworkSettings::default()
    };
    Network::open(&settings, state_dir).unwrap()
}

/// The `ip -o link` line of `dev` in the host side, if it exists.
fn link(world: &World, dev: &str) -> Option<String> {
    let out = Process::new("ip")
        .args(["-n", &world.host, "-o", "link", "show", "dev", dev])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn netns_inode(path: &str) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vms_nic_is_its_leases_tap_with_rate_limiters_and_goes_with_it() {
    let Some(scope) = scope("net") else { return };
    let world = World::new("fcn");
    let net = network(&world, &scope.state_dir());
    for jailed in [true, false] {
        let mut spec = scope.boot_spec(small());
        spec.network = Some(VmNic {
            network: net.clone(),
        });
        let vm = FirecrackerVm::start(&scope.config(jailed), &spec)
            .await
            .expect("boot with a network interface");
        drop(spec);
        ready(&vm).await;
        // The lease is the VM's, by its id.
        let tap = {
            let lease = vm.network().expect("a networked VM has a lease");
            assert_eq!(lease.info().rate_mbit, MBIT);
            lease.slot().host_link()
        };
        // Firecracker took the interface with the lease's rate each way...
        let config = vm.api().vm_config().await.unwrap();
        let nic = &config.network_interfaces[0];
        assert_eq!(nic.host_dev_name, tap);
        assert_eq!(nic.rx_rate_limiter, RateLimiter::mbit(MBIT));
        assert_eq!(nic.tx_rate_limiter, RateLimiter::mbit(MBIT));
        assert_eq!(
            nic.rx_rate_limiter
                .as_ref()
                .unwrap()
                .bandwidth
                .as_ref()
                .unwrap()
                .size,
            u64::from(MBIT) * 1_000_000 / 8 / 10
        );
        // ...opened the tap (its carrier is up while a queue is attached)
        // from the host side's namespace, where it runs...
        let line = link(&world, &tap).expect("the tap exists while the VM lives");
        assert!(line.contains("LOWER_UP"), "{line}");
        assert_eq!(
            netns_inode(&format!("/proc/{}/ns/net", vm.pid())),
            netns_inode(&world.host_ns().to_string_lossy())
        );
        // A new rate on the running VM: Firecracker's limiters change.
        vm.set_rate_mbit(MBIT / 2).unwrap();
        let config = vm.api().vm_config().await.unwrap();
        let nic = &config.network_interfaces[0];
        assert_eq!(nic.rx_rate_limiter, RateLimiter::mbit(MBIT / 2));
        assert_eq!(nic.tx_rate_limiter, RateLimiter::mbit(MBIT / 2));
        assert_eq!(vm.network().unwrap().info().rate_mbit, MBIT / 2);
        // And none at all (a bucket of size 0 is Firecracker's "off").
        vm.set_rate_mbit(0).unwrap();
        assert_eq!(vm.network().unwrap().info().rate_mbit, 0);
        // ...and no tc on the tap: the rate is Firecracker's to keep.
        let qdisc = Process::new("ip")
            .args([
                "netns",
                "exec",
                &world.host,
                "tc",
                "qdisc",
                "show",
                "dev",
                &tap,
            ])
            .output()
            .unwrap();
        let qdisc = String::from_utf8_lossy(&qdisc.stdout);
        assert!(!qdisc.contains("tbf"), "{qdisc}");
        let report = vm.destroy().await;
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(link(&world, &tap), None, "the tap goes with the VM");
        assert_eq!(net.slots_taken(), 0);
    }
    drop(net);
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

const OWNER_VAR: &str = "KILN_TEST_FC_NET_OWNER";

/// Entry point of the owner child (see the test below): opens the
/// network, starts a jailed networked VM, reports it, waits to be killed.
#[test]
fn networked_owner_child() {
    let Ok(tag) = std::env::var(OWNER_VAR) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let scope = firecracker_harness::Scope::with_tag(
            &tag,
            std::env::var_os("KILN_FIRECRACKER_BIN").unwrap().into(),
            std::env::var_os("KILN_JAILER_BIN").unwrap().into(),
        );
        let host = std::env::var("KILN_TEST_FC_NET_HOST").unwrap();
        let settings = NetworkSettings {
            enabled: true,
            pool: "10.213.0.0/24".into(),
            host_netns: Some(format!("/run/netns/{host}").into()),
            upstream_dns: vec!["198.18.0.2:53".into()],
            rate_mbit: MBIT,
            ..NetworkSettings::default()
        };
        let net = Network::open(&settings, &scope.state_dir()).unwrap();
        let mut spec = scope.boot_spec(small());
        spec.network = Some(VmNic {
            network: net.clone(),
        });
        let vm = FirecrackerVm::start(&scope.config(true), &spec)
            .await
            .expect("boot in the owner child");
        drop(spec);
        ready(&vm).await;
        let tap = vm.network().unwrap().slot().host_link();
        println!("OWNED {} {tap} {}", vm.pid(), vm.id());
        std::mem::forget(scope);
        std::mem::forget(net);
        tokio::time::sleep(std::time::Duration::from_secs(120)).await;
        std::mem::forget(vm);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_owners_vm_and_tap_are_reaped() {
    let Some(scope) = scope("net-reap") else {
        return;
    };
    let world = World::new("fcr");
    let tag = format!("kfc-{}-net-reap-child", std::process::id());
    let child_scope =
        firecracker_harness::Scope::with_tag(&tag, scope.firecracker.clone(), scope.jailer.clone());
    let mut child = Process::new(std::env::current_exe().unwrap())
        .args([
            "networked_owner_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(OWNER_VAR, &tag)
        .env("KILN_TEST_FC_NET_HOST", &world.host)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + GUEST * 2;
    let (pid, tap, id) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.split("OWNED ").nth(1) {
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    break (
                        f[0].parse::<u32>().unwrap(),
                        f[1].to_owned(),
                        f[2].to_owned(),
                    );
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the owner child did not start its VM in time");
            }
        }
    };
    child.kill().unwrap();
    child.wait().unwrap();
    // The jailed VMM outlives its owner, and so does the persistent tap.
    assert!(exists(pid));
    assert!(link(&world, &tap).is_some());
    // What `kiln reap` does: the VMs, then the networks.
    let report = reap_orphans(&child_scope.state_dir());
    assert_eq!(report.reaped.len(), 1, "{report:?}");
    assert!(!exists(pid));
    let gone = kiln_sandbox::network::reap(&child_scope.state_dir()).unwrap();
    assert_eq!(gone, [id]);
    assert_eq!(link(&world, &tap), None);
    let table = Process::new("ip")
        .args(["netns", "exec", &world.host, "nft", "list", "tables"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&table.stdout).contains("kiln"),
        "the dead owner's table is gone"
    );
    assert_eq!(
        kiln_tests::wait_empty(HOST, || child_scope.leftovers()),
        Vec::<String>::new()
    );
    drop(child_scope);
    assert_eq!(scope.wait_clean(), Vec::<String>::new());
}

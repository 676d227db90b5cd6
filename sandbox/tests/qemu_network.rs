//! The qemu backend's networks through the backend itself, with the host
//! side in a namespace of the test's (`kiln_tests::netlab`), not this
//! process's: QEMU is started there to open the VM's tap. Shown: a
//! template of a networked spec carries the NIC but no address; VMs
//! restored from it each get their own from the guest setup and reach
//! the test internet under the rules; booted and restored alike leave
//! nothing behind. (`tests/tests/qemu_network.rs` shows the rules, private
//! networks, ports, rate limits and reaping through the daemon.)
//!
//! Needs root, QEMU, vhost-device-vsock, iproute2, nftables, conntrack and
//! the guest artefacts; without the artefacts it says SKIPPED, unless
//! `KILN_REQUIRE_GUEST=1`.

mod netjobs;

use kiln_protocol::RuntimeTable;
use kiln_sandbox::network::NetworkSettings;
use kiln_sandbox::qemu::{Origin, QemuBackend, QemuConfig};
use kiln_sandbox::vm::GuestImage;
use kiln_sandbox::{Backend, Sandbox, SandboxSpec};
use kiln_tests::netlab::{World, BODY, DNS, WEB_ALLOWED_BY_NETWORK, WEB_DENIED};
use kiln_tests::Scope;
use netjobs::probe;

fn guest() -> Option<GuestImage> {
    match GuestImage::from_env() {
        Ok(img) => Some(img),
        Err(e) => {
            let msg = format!("no guest kernel/rootfs ({e})");
            if std::env::var("KILN_REQUIRE_GUEST").as_deref() == Ok("1") {
                panic!("{msg}");
            }
            eprintln!("SKIPPED: {msg}");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_restored_from_a_networked_template_each_get_their_own_network() {
    let Some(img) = guest() else {
        return;
    };
    let world = World::new("qtpl");
    let scope = Scope::new("qemu-net-tpl");
    let mut cfg = QemuConfig::new(img.kernel, img.rootfs, RuntimeTable::default());
    cfg.state_dir = scope.state_dir.clone();
    cfg.templates = Some(scope.state_dir.join("templates"));
    cfg.network = Some(NetworkSettings {
        enabled: true,
        pool: "10.213.0.0/24".into(),
        host_netns: Some(world.host_ns()),
        upstream_dns: vec![format!("{DNS}:53")],
        allow: vec![
            "allowed.test".into(),
            format!("{WEB_ALLOWED_BY_NETWORK}/32"),
        ],
        ..NetworkSettings::default()
    });
    let backend = QemuBackend::new(cfg).unwrap();
    let mut spec = SandboxSpec::for_job(&Default::default(), "python");
    spec.allow_internet = true;

    // Booted first (no template yet), in the host side of the test.
    let booted = backend.create(&spec).await.unwrap();
    assert_eq!(booted.origin(), &Origin::Booted);
    let lines = [
        "tcp allowed.test:80".to_string(),
        format!("tcp {WEB_ALLOWED_BY_NETWORK}:80"),
        format!("tcp {WEB_DENIED}:80"),
    ];
    let expect = [
        format!("ok:{BODY}"),
        format!("ok:{BODY}"),
        "ECONNREFUSED".into(),
    ];
    assert_eq!(probe(&booted, &lines).await, expect);
    booted.destroy().await;
    assert!(world.host_links().is_empty(), "{:?}", world.host_links());

    // The template: built with the NIC on a hub port, no tap, no address.
    let info = backend.prepare_template(&spec, &|_| {}).await.unwrap();
    assert!(world.host_links().is_empty(), "{:?}", world.host_links());
    let a = backend.create(&spec).await.unwrap();
    let b = backend.create(&spec).await.unwrap();
    for vm in [&a, &b] {
        assert_eq!(
            vm.origin(),
            &Origin::Restored {
                template: info.id.clone()
            }
        );
    }
    let (na, nb) = (a.network().unwrap(), b.network().unwrap());
    assert_ne!(na.address(), nb.address());
    // (A lease lives on while anyone holds it.)
    drop((na, nb));
    assert_eq!(world.host_links().len(), 2);
    // Each guest has its own address (the one the host side expects: the
    // firewall drops any other source) and reaches the test internet.
    for vm in [&a, &b] {
        assert_eq!(probe(vm, &lines).await, expect);
        // Its traffic, as its tap counts it, is in its live figures.
        let s = vm.stats();
        assert!(s.net_rx_bytes.unwrap() >= 2 * BODY.len() as u64, "{s:?}");
        assert!(s.net_tx_bytes.unwrap() > 0, "{s:?}");
    }
    a.destroy().await;
    b.destroy().await;
    assert!(world.host_links().is_empty(), "{:?}", world.host_links());
    assert_eq!(backend.network().unwrap().slots_taken(), 0);
    let table = world.table();
    assert!(!table.contains("chain s"), "{table}");
}

//! Sandbox networks of the qemu backend (real Linux guests; TCG where KVM
//! cannot run them), against the test-made internet of `kiln_tests::netlab`
//! (host sides and internet in namespaces of their own; nothing leaves the
//! machine):
//!
//! 1. create and destroy, air-gapped and networked alternately (so both
//!    meet the same load), booted;
//! 2. the same, restored from a template of each kind (a networked
//!    template carries the NIC; the address comes with the setup);
//! 3. one TCP stream each way through a VM's tap, the firewall and the
//!    NAT, through a jail's veth pair, the firewall and the NAT (its own
//!    host side, same internet), and from a host side over the plain veth;
//! 4. the same stream through a VM limited to `--rate-mbit` (default 100;
//!    a `tbf` on the tap and on the `ifb` its ingress goes through).
//!
//! `eval "$(deploy/guest/build.sh)"; cargo build --bins; KILN_AGENT=target/debug/kiln-agent
//! cargo bench -p kiln-sandbox --bench qemu_network -- --runs 5 --rate-mbit 50
//! [--json-out FILE]` (as root; QEMU, vhost-device-vsock, iproute2,
//! nftables, conntrack).

mod common;
#[path = "../tests/netjobs/mod.rs"]
mod netjobs;

use std::time::{Duration, Instant};

use common::{backend_with, histogram, print_row, summary, Flags};
use kiln_protocol::{Limits, RuntimeTable};
use kiln_sandbox::network::NetworkSettings;
use kiln_sandbox::qemu::{Origin, QemuBackend, QemuConfig};
use kiln_sandbox::vm::GuestImage;
use kiln_sandbox::{Backend as _, Sandbox, SandboxSpec};
use kiln_tests::netlab::{World, DNS, WEB_ALLOWED_BY_NETWORK};
use netjobs::{bulk, host_side, mbit};

/// Bytes per throughput run, each way (TCG moves far less than a jail).
const STREAM_BYTES: u64 = 64 << 20;

fn settings(world: &World, rate_mbit: u32) -> NetworkSettings {
    NetworkSettings {
        enabled: true,
        pool: "10.213.0.0/20".into(),
        host_netns: Some(world.host_ns()),
        upstream_dns: vec![format!("{DNS}:53")],
        rate_mbit,
        ..NetworkSettings::default()
    }
}

fn qemu(world: &World, state: &str, rate_mbit: u32) -> QemuBackend {
    let img = GuestImage::from_env().expect("guest artefacts (deploy/guest/build.sh)");
    let mut cfg = QemuConfig::new(img.kernel, img.rootfs, RuntimeTable::default());
    cfg.state_dir = format!("/run/kiln-bench-{state}").into();
    let _ = std::fs::remove_dir_all(&cfg.state_dir);
    cfg.templates = Some(cfg.state_dir.join("templates"));
    cfg.network = Some(settings(world, rate_mbit));
    QemuBackend::new(cfg).expect("qemu backend")
}

async fn stream<S: Sandbox>(sb: &S, n: u64) -> (f64, f64) {
    let got = bulk(
        sb,
        &[
            format!("down {WEB_ALLOWED_BY_NETWORK} {n}"),
            format!("up {WEB_ALLOWED_BY_NETWORK} {n}"),
        ],
    )
    .await;
    (mbit(got[0]), mbit(got[1]))
}

/// Creates and destroys a VM of each kind `runs` times, alternately;
/// checks each came up the way expected (booted or restored).
async fn create_destroy(
    backend: &QemuBackend,
    runs: usize,
    restored: bool,
) -> [hdrhistogram::Histogram<u64>; 4] {
    let mut h = [histogram(), histogram(), histogram(), histogram()];
    let mut spec = SandboxSpec::for_job(&Limits::default(), "python");
    for _ in 0..runs {
        for (k, internet) in [false, true].into_iter().enumerate() {
            spec.allow_internet = internet;
            let t = Instant::now();
            let vm = backend.create(&spec).await.expect("create");
            h[k].saturating_record((t.elapsed().as_micros() as u64).max(1));
            assert_eq!(
                matches!(vm.origin(), Origin::Restored { .. }),
                restored,
                "{:?}",
                vm.origin()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            let t = Instant::now();
            vm.destroy().await;
            h[2 + k].saturating_record((t.elapsed().as_micros() as u64).max(1));
        }
    }
    h
}

fn main() {
    let flags = Flags::parse(5);
    let rate = flags.rate_mbit;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let load_before = common::load_average();
    rt.block_on(async {
        let world = World::new("qbench");
        let backend = qemu(&world, "qnet", 0);
        println!("accelerator: {}", backend.accel().as_str());

        // 1. Boots.
        let [gap_c, net_c, gap_d, net_d] = create_destroy(&backend, flags.runs, false).await;
        println!("qemu VMs booted, {} runs each", flags.runs);
        print_row("create, air-gapped", &gap_c);
        print_row("create, networked", &net_c);
        print_row("destroy, air-gapped", &gap_d);
        print_row("destroy, networked", &net_d);

        // 2. Restores, from a template of each kind.
        let mut spec = SandboxSpec::for_job(&Limits::default(), "python");
        for internet in [false, true] {
            spec.allow_internet = internet;
            backend
                .prepare_template(&spec, &|_| {})
                .await
                .expect("template");
        }
        let [gap_rc, net_rc, gap_rd, net_rd] = create_destroy(&backend, flags.runs, true).await;
        println!("qemu VMs restored, {} runs each", flags.runs);
        print_row("restore, air-gapped", &gap_rc);
        print_row("restore, networked", &net_rc);
        print_row("destroy, air-gapped", &gap_rd);
        print_row("destroy, networked", &net_rd);

        // 3. One stream each way: VM, jail, plain veth.
        spec.allow_internet = true;
        let vm = backend.create(&spec).await.expect("create");
        let (vm_down, vm_up) = stream(&vm, STREAM_BYTES).await;
        vm.destroy().await;
        let (veth_down, veth_up) = host_side(&world, STREAM_BYTES);
        drop(backend);
        let jail_world = World::new("qbenchj");
        let jails = backend_with(|cfg| {
            cfg.state_dir = "/run/kiln-bench-qjail".into();
            cfg.cgroup_parent = "kiln-bench-qjail".into();
            cfg.network = Some(settings(&jail_world, 0));
        });
        let jail = jails.create(&spec).await.expect("create");
        let (jail_down, jail_up) = stream(&jail, STREAM_BYTES).await;
        jail.destroy().await;
        drop(jails);
        println!(
            "one TCP stream, Mbit/s: VM through tap+rules+NAT down {vm_down:.0} up {vm_up:.0}; jail through veth+rules+NAT down {jail_down:.0} up {jail_up:.0}; host side over the plain veth down {veth_down:.0} up {veth_up:.0}"
        );

        // 4. A limited VM (its own host side: one Kiln per host side).
        let world2 = World::new("qbenchr");
        let limited = qemu(&world2, "qrate", rate);
        let vm = limited.create(&spec).await.expect("create");
        let n = u64::from(rate) * 1_000_000 / 8 * 4;
        let (lim_down, lim_up) = stream(&vm, n).await;
        vm.destroy().await;
        drop(limited);
        // The templates are guest RAM's size, and /run is RAM too.
        for state in ["qnet", "qrate"] {
            let _ = std::fs::remove_dir_all(format!("/run/kiln-bench-{state}"));
        }
        println!(
            "VM limited to {rate} Mbit/s: down {lim_down:.1} ({:+.1}%), up {lim_up:.1} ({:+.1}%)",
            (lim_down / f64::from(rate) - 1.0) * 100.0,
            (lim_up / f64::from(rate) - 1.0) * 100.0
        );
        let load_after = common::load_average();
        println!("load average: before {load_before}, after {load_after}");
        common::write_json(
            &flags,
            &serde_json::json!({
                "bench": "qemu_network",
                "boot_air_gapped_ms": summary(&gap_c),
                "boot_networked_ms": summary(&net_c),
                "destroy_booted_air_gapped_ms": summary(&gap_d),
                "destroy_booted_networked_ms": summary(&net_d),
                "restore_air_gapped_ms": summary(&gap_rc),
                "restore_networked_ms": summary(&net_rc),
                "destroy_restored_air_gapped_ms": summary(&gap_rd),
                "destroy_restored_networked_ms": summary(&net_rd),
                "stream_mbit": {"vm_down": vm_down, "vm_up": vm_up, "jail_down": jail_down, "jail_up": jail_up, "veth_down": veth_down, "veth_up": veth_up},
                "limited": {"rate_mbit": rate, "down": lim_down, "up": lim_up},
                "load_before": load_before,
                "load_after": load_after,
            }),
        );
    });
}

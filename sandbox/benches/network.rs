//! Sandbox networks of the jail backend, against the test-made internet of
//! `kiln_tests::netlab` (host side and internet in namespaces of their own;
//! nothing leaves the machine):
//!
//! 1. creation and destruction, air-gapped and networked alternately (so
//!    both meet the same load), and resets of one sandbox of each kind;
//! 2. 200 networked sandboxes, 20 alive at a time, then what is left of
//!    them (interfaces, chains, slots, jail records: all must be zero);
//! 3. throughput of one TCP stream through a sandbox's veth pair, the
//!    firewall and the NAT, against the same stream from the host side
//!    over the plain veth to the internet (no rules, no NAT), each way;
//! 4. the same through a sandbox limited to `--rate-mbit` (default 100).
//!
//! `cargo build --release --bins && cargo bench -p kiln-sandbox --bench
//! network -- --runs 50 [--json-out FILE]` (as root; iproute2, nftables,
//! conntrack).

mod common;
#[path = "../tests/netjobs/mod.rs"]
mod netjobs;

use std::time::{Duration, Instant};

use common::{backend_with, histogram, print_row, summary, Flags};
use kiln_protocol::Limits;
use kiln_sandbox::jail::JailBackend;
use kiln_sandbox::network::NetworkSettings;
use kiln_sandbox::{Backend as _, Sandbox as _, SandboxSpec};
use kiln_tests::netlab::{World, DNS, WEB_ALLOWED_BY_NETWORK};
use netjobs::{bulk, host_side, mbit};

/// Bytes per throughput run, each way.
const STREAM_BYTES: u64 = 256 << 20;

fn networked(world: &World, state: &str, rate_mbit: u32) -> JailBackend {
    let host_ns = world.host_ns();
    let state = state.to_owned();
    backend_with(move |cfg| {
        cfg.state_dir = format!("/run/kiln-bench-{state}").into();
        cfg.cgroup_parent = format!("kiln-bench-{state}");
        cfg.network = Some(NetworkSettings {
            enabled: true,
            pool: "10.213.0.0/20".into(),
            host_netns: Some(host_ns),
            upstream_dns: vec![format!("{DNS}:53")],
            rate_mbit,
            ..NetworkSettings::default()
        });
    })
}

fn leftovers(world: &World, backend: &JailBackend, state: &str) -> serde_json::Value {
    let jails = std::fs::read_dir(format!("/run/kiln-bench-{state}/jails"))
        .map(|d| d.count())
        .unwrap_or(0);
    serde_json::json!({
        "interfaces": world.host_links().len(),
        "chains": world.table().matches("chain s").count(),
        "slots": backend.network().unwrap().slots_taken(),
        "jail_records": jails,
    })
}

fn main() {
    let flags = Flags::parse(50);
    let rate = flags.rate_mbit;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let world = World::new("bench");
    let backend = networked(&world, "net", 0);
    let load_before = common::load_average();
    rt.block_on(async {
        // 1. Creation, air-gapped and networked alternately.
        let (mut gap_c, mut gap_d, mut net_c, mut net_d) =
            (histogram(), histogram(), histogram(), histogram());
        let mut spec = SandboxSpec::for_job(&Limits::default(), "python");
        for _ in 0..flags.runs {
            for internet in [false, true] {
                spec.allow_internet = internet;
                let t = Instant::now();
                let sb = backend.create(&spec).await.expect("create");
                let c = (t.elapsed().as_micros() as u64).max(1);
                tokio::time::sleep(Duration::from_millis(50)).await;
                let t = Instant::now();
                sb.destroy().await;
                let d = (t.elapsed().as_micros() as u64).max(1);
                let (hc, hd) = if internet {
                    (&mut net_c, &mut net_d)
                } else {
                    (&mut gap_c, &mut gap_d)
                };
                hc.saturating_record(c);
                hd.saturating_record(d);
            }
        }
        println!("jail creation, {} runs each", flags.runs);
        print_row("create, air-gapped", &gap_c);
        print_row("create, networked", &net_c);
        print_row("destroy, air-gapped", &gap_d);
        print_row("destroy, networked", &net_d);

        // 1b. Resets (a new room per lease): a networked jail has no
        // spare room, and its interface is made again for each.
        let (mut gap_r, mut net_r) = (histogram(), histogram());
        for internet in [false, true] {
            spec.allow_internet = internet;
            let sb = backend.create(&spec).await.expect("create");
            for _ in 0..flags.runs {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let t = Instant::now();
                sb.reset().await.expect("reset");
                let us = (t.elapsed().as_micros() as u64).max(1);
                if internet {
                    net_r.saturating_record(us);
                } else {
                    gap_r.saturating_record(us);
                }
            }
            sb.destroy().await;
        }
        print_row("reset, air-gapped", &gap_r);
        print_row("reset, networked", &net_r);

        // 2. 200 networked sandboxes, 20 at a time.
        spec.allow_internet = true;
        let t = Instant::now();
        let mut failed = 0;
        for _ in 0..10 {
            let mut alive = Vec::new();
            for _ in 0..20 {
                match backend.create(&spec).await {
                    Ok(sb) => alive.push(sb),
                    Err(e) => {
                        failed += 1;
                        eprintln!("create failed: {e}");
                    }
                }
            }
            for sb in alive {
                sb.destroy().await;
            }
        }
        let many_s = t.elapsed().as_secs_f64();
        let left = leftovers(&world, &backend, "net");
        println!("200 networked sandboxes (20 at a time): {many_s:.1} s, {failed} failed; left: {left}");

        // 3. Throughput, one stream each way.
        let sb = backend.create(&spec).await.expect("create");
        let n = STREAM_BYTES;
        let got = bulk(
            &sb,
            &[
                format!("down {WEB_ALLOWED_BY_NETWORK} {n}"),
                format!("up {WEB_ALLOWED_BY_NETWORK} {n}"),
            ],
        )
        .await;
        sb.destroy().await;
        let (nat_down, nat_up) = (mbit(got[0]), mbit(got[1]));
        let (veth_down, veth_up) = host_side(&world, STREAM_BYTES);
        println!(
            "one TCP stream, Mbit/s: sandbox through rules+NAT down {nat_down:.0} up {nat_up:.0}; host side over the plain veth down {veth_down:.0} up {veth_up:.0}"
        );
        drop(backend);

        // 4. A limited sandbox (its own host side: one Kiln per host side).
        let world2 = World::new("benchrate");
        let limited = networked(&world2, "rate", rate);
        let sb = limited.create(&spec).await.expect("create");
        let n = u64::from(rate) * 1_000_000 / 8 * 4;
        let got = bulk(
            &sb,
            &[
                format!("down {WEB_ALLOWED_BY_NETWORK} {n}"),
                format!("up {WEB_ALLOWED_BY_NETWORK} {n}"),
            ],
        )
        .await;
        sb.destroy().await;
        let (lim_down, lim_up) = (mbit(got[0]), mbit(got[1]));
        println!(
            "limited to {rate} Mbit/s: down {lim_down:.1} ({:+.1}%), up {lim_up:.1} ({:+.1}%)",
            (lim_down / f64::from(rate) - 1.0) * 100.0,
            (lim_up / f64::from(rate) - 1.0) * 100.0
        );
        let load_after = common::load_average();
        println!("load average: before {load_before}, after {load_after}");
        common::write_json(
            &flags,
            &serde_json::json!({
                "bench": "network",
                "create_air_gapped_ms": summary(&gap_c),
                "create_networked_ms": summary(&net_c),
                "destroy_air_gapped_ms": summary(&gap_d),
                "destroy_networked_ms": summary(&net_d),
                "reset_air_gapped_ms": summary(&gap_r),
                "reset_networked_ms": summary(&net_r),
                "many": {"sandboxes": 200, "seconds": many_s, "failed": failed, "left": left},
                "stream_mbit": {"nat_down": nat_down, "nat_up": nat_up, "veth_down": veth_down, "veth_up": veth_up},
                "limited": {"rate_mbit": rate, "down": lim_down, "up": lim_up},
                "load_before": load_before,
                "load_after": load_after,
            }),
        );
        drop(limited);
    });
}

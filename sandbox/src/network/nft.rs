//! The firewall as nftables scripts (fed to `nft -f -`, each applied
//! atomically). One table of Kiln's own (`inet <table>`) in the host-side
//! namespace holds everything: base chains that send each sandbox's
//! packets to a chain of its own through a verdict map keyed by its
//! interface, the DNS redirect to Kiln's resolver, and the masquerade.
//! Per sandbox: a chain (met in `prerouting`) and three sets (networks allowed, networks denied,
//! addresses the resolver handed out for allowed names, which expire).
//!
//! Connections *to* a sandbox: only those a member of its private network
//! opens (its `i<slot>` chain in `forward`) and those of the daemon's
//! port proxy, marked [`PROXY_MARK`] (every other new connection from the
//! host side to a sandbox is refused in `output`).
//!
//! Sandboxes speak IPv4 only: IPv6 from their interfaces is dropped
//! before anything else.
//!
//! What holds for every sandbox, whatever its rules: nothing reaches the
//! host itself but the resolver (the input hook rejects the rest: the
//! daemon's port, every host service, on any of the host's addresses);
//! loopback, link-local (cloud metadata), multicast, the reserved
//! networks and the pool (other sandboxes) are never forwarded to; no
//! connection is ever opened *to* a sandbox (only packets of connections
//! it opened come back); a packet whose source is not the sandbox's
//! address is dropped.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::pool::Slot;
use super::rules::{Cidr, EgressRules};

/// The networks no sandbox ever reaches, besides the pool itself.
pub const NEVER: [&str; 5] = [
    "0.0.0.0/8",
    "127.0.0.0/8",
    // Link-local, where cloud metadata services live (169.254.169.254).
    "169.254.0.0/16",
    // Multicast, and the reserved 240.0.0.0/4 with broadcast.
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// Addresses the resolver may hand one sandbox at a time (a set of that
/// size; past it an answer fails with `SERVFAIL` until entries expire), so
/// that a job resolving endless names under an allowed wildcard cannot
/// grow the host's tables without bound.
pub const RESOLVED_MAX: u32 = 4096;

/// The mark (`SO_MARK`) of the daemon's connections to exposed ports:
/// the one way into a sandbox that it did not open itself. Any other
/// process of the host side that tries is refused in `output`.
pub const PROXY_MARK: u32 = 0x6b69_6c6e;

/// The table's chain that refuses a packet so that the sender knows at
/// once: a TCP reset for TCP (a connect fails with `ECONNREFUSED`; resets
/// are not rate-limited the way ICMP errors are), an ICMP "administratively
/// prohibited" for the rest (`EHOSTUNREACH`).
const REFUSE: &str = "jump refuse";

/// The whole table, made anew (the `delete` before it is separate, since
/// deleting a missing table fails).
///
/// A sandbox's packets meet its chain in `prerouting`, before the routing
/// decision, so that an address the host side has no route to is refused
/// the same way as any other (and not answered by a rate-limited ICMP
/// "unreachable", or not at all). DNS to any address is let through there
/// for the redirect to Kiln's resolver right after; the `input` hook then
/// lets only that through to the host.
pub fn table(name: &str, pool: Cidr, resolver_port: u16) -> String {
    let never = NEVER.join(", ");
    format!(
        r#"table inet {name} {{
  set never {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {never}, {pool} }} }}
  map sandboxes {{ type ifname : verdict; }}
  chain refuse {{
    meta l4proto tcp reject with tcp reset
    reject with icmpx type admin-prohibited
  }}
  chain egress {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "kn*" meta nfproto ipv6 drop
    iifname "kn*" iifname vmap @sandboxes
    iifname "kn*" drop
  }}
  map ingress {{ type ifname : verdict; }}
  chain forward {{
    type filter hook forward priority filter - 1; policy accept;
    oifname "kn*" ct state established,related accept
    oifname "kn*" oifname vmap @ingress
    oifname "kn*" drop
  }}
  chain input {{
    type filter hook input priority filter - 1; policy accept;
    iifname "kn*" ct state established,related accept
    iifname "kn*" meta l4proto udp udp dport {resolver_port} ct status dnat accept
    iifname "kn*" {REFUSE}
  }}
  chain output {{
    type filter hook output priority filter - 1; policy accept;
    oifname "kn*" ct state new meta mark != {PROXY_MARK:#x} {REFUSE}
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat - 1; policy accept;
    iifname "kn*" meta l4proto udp udp dport 53 redirect to :{resolver_port}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {pool} oifname != "kn*" masquerade
  }}
}}
"#
    )
}

fn elements(cidrs: &[Cidr]) -> String {
    cidrs
        .iter()
        .map(Cidr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The sets' contents from `rules` (sets flushed first).
fn fill(out: &mut String, t: &str, n: u32, rules: &EgressRules) {
    for (set, cidrs) in [("a", &rules.allow_networks), ("x", &rules.deny_networks)] {
        let _ = writeln!(out, "flush set inet {t} {set}{n}");
        if !cidrs.is_empty() {
            let _ = writeln!(
                out,
                "add element inet {t} {set}{n} {{ {} }}",
                elements(cidrs)
            );
        }
    }
    let _ = writeln!(out, "flush set inet {t} d{n}");
}

/// A sandbox's chain and sets, and its entry in the map.
pub fn add_sandbox(t: &str, slot: &Slot, rules: &EgressRules) -> String {
    let n = slot.index;
    let link = slot.host_link();
    let mut s = String::new();
    let _ = writeln!(s, "add chain inet {t} i{n}");
    for set in ["a", "x"] {
        let _ = writeln!(
            s,
            "add set inet {t} {set}{n} {{ type ipv4_addr; flags interval; auto-merge; }}"
        );
    }
    let _ = writeln!(
        s,
        "add set inet {t} d{n} {{ type ipv4_addr; flags timeout; size {RESOLVED_MAX}; }}"
    );
    fill(&mut s, t, n, rules);
    let _ = writeln!(s, "add chain inet {t} s{n}");
    s.push_str(&chains(t, slot, None));
    let _ = writeln!(
        s,
        "add element inet {t} sandboxes {{ \"{link}\" : jump s{n} }}"
    );
    let _ = writeln!(
        s,
        "add element inet {t} ingress {{ \"{link}\" : jump i{n} }}"
    );
    s
}

/// The sandbox's egress chain (`s<slot>`) and ingress chain (`i<slot>`)
/// anew: with `network`, the members of that private network (set
/// `n<network>`) reach it and it reaches them.
pub fn chains(t: &str, slot: &Slot, network: Option<u32>) -> String {
    let n = slot.index;
    let mut s = String::new();
    let _ = writeln!(s, "flush chain inet {t} s{n}");
    let _ = writeln!(s, "flush chain inet {t} i{n}");
    // Answers on connections made *to* the sandbox (a peer's, the port
    // proxy's) are established; checked after the source, so that no
    // sandbox can pass for another's flows.
    let mut egress = vec![
        format!("ip saddr != {} drop", slot.address),
        "ct state established,related accept".to_owned(),
        "meta l4proto udp udp dport 53 accept".to_owned(),
    ];
    if let Some(id) = network {
        egress.push(format!("ip daddr @n{id} accept"));
        let _ = writeln!(s, "add rule inet {t} i{n} ip saddr @n{id} accept");
    }
    egress.extend([
        format!("ip daddr @never {REFUSE}"),
        format!("ip daddr @x{n} {REFUSE}"),
        format!("ip daddr @a{n} accept"),
        format!("ip daddr @d{n} accept"),
        REFUSE.to_owned(),
    ]);
    for rule in egress {
        let _ = writeln!(s, "add rule inet {t} s{n} {rule}");
    }
    s
}

/// A private network's member set, made if missing, with `address` in it.
pub fn join(t: &str, network: u32, address: Ipv4Addr) -> String {
    format!(
        "add set inet {t} n{network} {{ type ipv4_addr; }}\nadd element inet {t} n{network} {{ {address} }}\n"
    )
}

/// Takes `address` out of a private network's set.
pub fn leave(t: &str, network: u32, address: Ipv4Addr) -> String {
    format!("delete element inet {t} n{network} {{ {address} }}\n")
}

/// Removes a private network's set (once nobody refers to it).
pub fn drop_network(t: &str, network: u32) -> String {
    format!("delete set inet {t} n{network}\n")
}

/// New rules for a sandbox already set up (the resolver's addresses go:
/// names allowed before may not be now).
pub fn replace_rules(t: &str, slot: &Slot, rules: &EgressRules) -> String {
    let mut s = String::new();
    fill(&mut s, t, slot.index, rules);
    s
}

/// Forgets what the resolver handed out (a new lease resolves again).
pub fn forget_resolved(t: &str, slot: &Slot) -> String {
    format!("flush set inet {t} d{}\n", slot.index)
}

/// Addresses the resolver handed out for an allowed name, for `ttl_s`.
pub fn add_resolved(t: &str, slot: &Slot, addrs: &[Ipv4Addr], ttl_s: u32) -> String {
    let list = addrs
        .iter()
        .map(|a| format!("{a} timeout {ttl_s}s"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("add element inet {t} d{} {{ {list} }}\n", slot.index)
}

/// Removes a sandbox's entries, chains and sets: run together, or one
/// at a time when a part already missing makes the whole fail.
pub fn remove_sandbox(t: &str, slot: &Slot) -> Vec<String> {
    let n = slot.index;
    vec![
        format!(
            "delete element inet {t} sandboxes {{ \"{}\" }}",
            slot.host_link()
        ),
        format!(
            "delete element inet {t} ingress {{ \"{}\" }}",
            slot.host_link()
        ),
        format!("delete chain inet {t} s{n}"),
        format!("delete chain inet {t} i{n}"),
        format!("delete set inet {t} a{n}"),
        format!("delete set inet {t} x{n}"),
        format!("delete set inet {t} d{n}"),
    ]
}

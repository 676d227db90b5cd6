//! Kiln's resolver: the only DNS server a networked sandbox can reach.
//! Every UDP packet a sandbox sends to port 53, whatever its destination,
//! is redirected here by the firewall, and the sandbox is known by the
//! packet's source address (which the firewall keeps honest). A name its
//! rules allow is forwarded to the upstream server, and the IPv4 addresses
//! in the answer are added to the sandbox's set of reachable addresses
//! *before* the answer goes back, so that a connect right after the lookup
//! passes. Anything else is refused (`REFUSED`) without asking upstream.
//! Only `A` answers (with their `CNAME` chain) are passed on: a sandbox
//! has no IPv6, and other record types would give out nothing a connect
//! could use, so they are answered empty.
//!
//! One thread receives (in the host-side namespace, where its socket and
//! its upstream sockets live); each forwarded query gets a thread of its
//! own, at most [`MAX_IN_FLIGHT`] at a time (more are answered
//! `SERVFAIL`), so a slow upstream holds up no other sandbox.

use std::collections::HashMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

use super::rules::EgressRules;

/// Forwarded queries at once.
pub const MAX_IN_FLIGHT: usize = 64;

/// How long the upstream server may take to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a handed-out address stays reachable at least, whatever the
/// answer's TTL (a client may use an address past its TTL, and a TTL of
/// zero would make the address useless).
pub const MIN_HOLD_S: u32 = 300;
/// And at most.
pub const MAX_HOLD_S: u32 = 86_400;

/// Lets a sandbox's resolved addresses through its firewall for a number
/// of seconds; `false` when that failed (the answer is then withheld).
pub type Admit = Arc<dyn Fn(&[Ipv4Addr], u32) -> bool + Send + Sync>;

/// What the resolver knows of one sandbox.
#[derive(Clone)]
pub struct Client {
    pub rules: Arc<EgressRules>,
    /// Called with the addresses of an allowed answer and how long to hold
    /// them; the answer goes back only after it returns `true`.
    pub allow: Admit,
}

/// The sandboxes the resolver answers, by address.
pub type Clients = Arc<Mutex<HashMap<Ipv4Addr, Client>>>;

/// Which private network a sandbox is in, by its address.
pub type Peers = Arc<Mutex<HashMap<Ipv4Addr, u32>>>;
/// Members of private networks by network and sandbox id.
pub type Names = Arc<Mutex<HashMap<(u32, String), Ipv4Addr>>>;

/// A running resolver; stops when dropped.
pub struct Resolver {
    port: u16,
    stop: Arc<AtomicBool>,
    pub clients: Clients,
    pub peers: Peers,
    pub names: Names,
}

impl Resolver {
    /// Serves on `socket` from a thread of its own that first enters
    /// `host_ns` (where the upstream sockets must be made), forwarding to
    /// `upstream`.
    pub fn start(
        socket: UdpSocket,
        upstream: Vec<SocketAddr>,
        host_ns: Option<File>,
    ) -> std::io::Result<Self> {
        let port = socket.local_addr()?.port();
        socket.set_read_timeout(Some(Duration::from_millis(250)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Clients = Arc::default();
        let socket = Arc::new(socket);
        let peers: Peers = Arc::default();
        let names: Names = Arc::default();
        let (stop2, clients2) = (stop.clone(), clients.clone());
        let (peers2, names2) = (peers.clone(), names.clone());
        std::thread::Builder::new()
            .name("kiln-resolver".into())
            .spawn(move || {
                if let Some(ns) = &host_ns {
                    if let Err(e) = super::command::enter_netns(ns) {
                        tracing::error!("the resolver cannot enter the host side's namespace: {e}");
                        return;
                    }
                }
                serve(&socket, &upstream, &stop2, &clients2, &peers2, &names2)
            })?;
        Ok(Self {
            port,
            stop,
            clients,
            peers,
            names,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    socket: &Arc<UdpSocket>,
    upstream: &[SocketAddr],
    stop: &AtomicBool,
    clients: &Clients,
    peers: &Peers,
    names: &Names,
) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!("the resolver's socket: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let SocketAddr::V4(from) = from else { continue };
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if query.metadata.message_type != MessageType::Query {
            continue;
        }
        let client = clients
            .lock()
            .expect("the client table is never poisoned")
            .get(from.ip())
            .cloned();
        let reply = |m: &Message| {
            if let Ok(bytes) = m.to_vec() {
                let _ = socket.send_to(&bytes, from);
            }
        };
        let Some(client) = client else {
            reply(&refused(&query, ResponseCode::Refused));
            continue;
        };
        let Some(q) = query.queries.first() else {
            reply(&refused(&query, ResponseCode::FormErr));
            continue;
        };
        let name = q.name().to_ascii();
        // A member of the same private network, by its sandbox id.
        let network = peers
            .lock()
            .expect("never poisoned")
            .get(from.ip())
            .copied();
        let peer = network.and_then(|id| {
            let label = name.trim_end_matches('.').to_ascii_lowercase();
            names
                .lock()
                .expect("never poisoned")
                .get(&(id, label))
                .copied()
        });
        if let Some(addr) = peer {
            let mut m = refused(&query, ResponseCode::NoError);
            if q.query_type() == RecordType::A {
                m.add_answer(Record::from_rdata(q.name().clone(), 5, RData::A(A(addr))));
            }
            reply(&m);
            continue;
        }
        if query.queries.len() != 1 || !client.rules.name_allowed(&name) {
            tracing::debug!(client = %from, name, "resolver: name refused");
            reply(&refused(&query, ResponseCode::NXDomain));
            continue;
        }
        if q.query_type() != RecordType::A {
            // Allowed, but nothing of use to an IPv4-only sandbox.
            reply(&refused(&query, ResponseCode::NoError));
            continue;
        }
        if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            reply(&refused(&query, ResponseCode::ServFail));
            continue;
        }
        // Made here, in the host-side namespace this thread lives in.
        let up = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        let (socket, upstream, in_flight) = (socket.clone(), upstream.to_vec(), in_flight.clone());
        let packet = buf[..n].to_vec();
        let spawned = std::thread::Builder::new()
            .name("kiln-resolve".into())
            .spawn(move || {
                let answer = match up {
                    Ok(up) => forward(&up, &upstream, &packet, &query, &client),
                    Err(_) => refused(&query, ResponseCode::ServFail),
                };
                if let Ok(bytes) = answer.to_vec() {
                    let _ = socket.send_to(&bytes, from);
                }
                in_flight.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            tracing::warn!("the resolver could not start a thread");
        }
    }
}

/// An answer without records.
fn refused(query: &Message, code: ResponseCode) -> Message {
    let mut m = Message::response(query.metadata.id, query.metadata.op_code);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.response_code = code;
    m.add_queries(query.queries.iter().cloned());
    m
}

/// Asks upstream; keeps only `A` and `CNAME` answers whose addresses the
/// sandbox may reach, and lets those addresses through the firewall.
fn forward(
    up: &UdpSocket,
    upstream: &[SocketAddr],
    packet: &[u8],
    query: &Message,
    client: &Client,
) -> Message {
    let _ = up.set_read_timeout(Some(UPSTREAM_TIMEOUT));
    let mut buf = [0u8; 4096];
    for server in upstream {
        if up.send_to(packet, server).is_err() {
            continue;
        }
        let Ok((n, _)) = up.recv_from(&mut buf) else {
            continue;
        };
        let Ok(mut answer) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if answer.metadata.id != query.metadata.id {
            continue;
        }
        answer.answers.retain(|r| match &r.data {
            RData::A(a) => !client.rules.address_denied(a.0),
            RData::CNAME(_) => true,
            _ => false,
        });
        answer.authorities.clear();
        answer.additionals.clear();
        answer.edns = None;
        let addrs: Vec<Ipv4Addr> = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        let ttl = answer
            .answers
            .iter()
            .map(|r| r.ttl)
            .max()
            .unwrap_or(0)
            .clamp(MIN_HOLD_S, MAX_HOLD_S);
        if !addrs.is_empty() && !(client.allow)(&addrs, ttl) {
            return refused(query, ResponseCode::ServFail);
        }
        return answer;
    }
    refused(query, ResponseCode::ServFail)
}

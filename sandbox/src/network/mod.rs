//! Networks for sandboxes: air-gapped by default, internet on request
//! under egress rules.
//!
//! A sandbox without `allow_internet` has a network namespace with only
//! loopback: no route anywhere, so a connect fails at once
//! (`ENETUNREACH`) and so does a name lookup (the resolver's address is
//! unreachable too). A sandbox with it gets, in that same namespace of its
//! own (for a jail: the room of the current lease, see the agent's `room`
//! module), one end of a veth pair, `eth0`, with an address from the
//! configured pool and a default route; the other end, `kn<slot>`, lives
//! in the *host side* namespace (Kiln's own, or one configured), where an
//! nftables table of Kiln's (see `nft`) forwards its packets by its egress
//! rules and masquerades them, and where Kiln's resolver (see `resolver`)
//! answers its name lookups.
//!
//! Domain rules hold against a job that resolves names itself or connects
//! by address: the firewall lets through only networks the rules allow and
//! the addresses Kiln's resolver handed out to *this* sandbox for names
//! its rules allow, and every DNS packet a sandbox sends (to any address)
//! is redirected to that resolver. The trade-off, documented in
//! docs/security.md: an allowed name's address is reachable for whatever
//! else is served there (shared hosting, a CDN); the alternative, reading
//! the TLS SNI or the HTTP Host, is easy to lie to and blind to other
//! protocols.
//!
//! Every piece is named by the sandbox's slot (`pool`): the interface, the
//! chain and sets, the slot file. The slot file is written before anything
//! else and removed after everything else, so that a process that finds
//! it after a crash (the next [`Network::open`] on the same state
//! directory) removes all of it.
//!
//! A microVM (the qemu and firecracker backends) has no namespace of its
//! own to put a veth end in: its interface is a tap device, and the tap
//! *is* the host-side end, `kn<slot>`, with the gateway's address, in the
//! host side ([`NetLease::attach_tap`]); the VMM opens it by name and the
//! guest's agent gives its `eth0` the sandbox's address from the guest
//! setup. Everything keyed by the interface (the table's maps, the
//! resolver's client, the slot's clean-up and reaping) is the same as a
//! jail's. Its bandwidth: a token bucket on the tap's egress (towards the
//! guest), and one on an `ifb` device its ingress (from the guest, which
//! no queue on the host side holds) is redirected through; Firecracker's
//! own rate limiters do both instead when the VMM is Firecracker.
//! docs/security.md (Networks, microVMs) says why the tap sits in the host
//! side rather than in a namespace of its own.
//!
//! A namespace is never handed from one lease to another: a jail's reset
//! makes a new room, with a new namespace, and the sandbox's veth pair is
//! made again for it ([`NetLease::connect`]); the conntrack entries and the
//! resolver's addresses of the last lease are forgotten first.

pub(crate) mod command;
mod nft;
mod pool;
mod resolver;
mod rules;

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use command::CommandError;
pub use pool::Slot;
pub use rules::{Cidr, DomainRule, EgressRules, EgressSpec, Rule};

/// `[network]`: networking for sandboxes that ask for `allow_internet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSettings {
    /// Give sandboxes that ask for it a network; `false`: `allow_internet`
    /// is refused.
    pub enabled: bool,
    /// The IPv4 network sandbox addresses come from, a /30 each.
    pub pool: String,
    /// The network namespace of the host side (a file such as
    /// `/run/netns/NAME`); default: Kiln's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_netns: Option<PathBuf>,
    /// Where Kiln's resolver sends allowed questions (`a.b.c.d:port`);
    /// default: the name servers of the host's `/etc/resolv.conf`.
    pub upstream_dns: Vec<String>,
    /// The name of Kiln's nftables table (`inet`) in the host side.
    pub table: String,
    /// Default egress rules: networks and names (`example.com`,
    /// `*.example.com`, `*`) a sandbox may reach...
    pub allow: Vec<String>,
    /// ...and may not, whatever `allow` says.
    pub deny: Vec<String>,
    /// Bandwidth of each networked sandbox, in Mbit/s, each way (a token
    /// bucket on both ends of its veth pair); 0: unlimited.
    pub rate_mbit: u32,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            pool: "10.213.0.0/16".into(),
            host_netns: None,
            upstream_dns: Vec::new(),
            table: "kiln".into(),
            allow: vec!["*".into(), "0.0.0.0/0".into()],
            deny: Vec::new(),
            rate_mbit: 0,
        }
    }
}

impl NetworkSettings {
    /// The default egress rules, as rules.
    pub fn egress(&self) -> EgressSpec {
        EgressSpec {
            allow: self.allow.clone(),
            deny: self.deny.clone(),
        }
    }
}

/// What a networked sandbox shows of its network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkInfo {
    /// Its address (IPv4, from the pool).
    pub address: Ipv4Addr,
    /// The egress rules in force.
    pub egress: EgressSpec,
    /// The private network it joined.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Bandwidth each way, Mbit/s; 0: unlimited.
    pub rate_mbit: u32,
}

/// Why sandbox networking could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A setting has a value that cannot be used.
    #[error("network.{setting}: {reason}")]
    Setting {
        setting: &'static str,
        reason: String,
    },
    /// Another process manages the networks of this state directory.
    #[error("another Kiln holds {0} (one process manages the networks of a state directory)")]
    Locked(PathBuf),
    /// A file or namespace could not be used.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A data-plane command failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// Every address of the pool is in use.
    #[error("the address pool {0} is exhausted (network.pool)")]
    PoolExhausted(Cidr),
    /// The sandbox's network namespace could not be found.
    #[error("the sandbox's network namespace was not found: {0}")]
    NoNamespace(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Io { what, source }
}

/// Networking for one backend: the pool, the table, the resolver. Made
/// once ([`Network::open`]); each networked sandbox holds a [`NetLease`].
pub struct Network {
    /// `<state_dir>/net/host.json`, removed on a clean end.
    host_file: PathBuf,
    /// Private networks by name: their number (naming their set) and
    /// their members, by sandbox id.
    private: Mutex<PrivateNetworks>,
    table: String,
    rate_mbit: u32,
    pool: pool::Pool,
    host_ns: Option<File>,
    resolver: resolver::Resolver,
    defaults: EgressRules,
    _lock: File,
}

impl Network {
    /// Takes the state directory's network lock, removes what a crashed
    /// predecessor left (interfaces and slots; its table is replaced as a
    /// whole), starts the resolver and installs the table.
    pub fn open(settings: &NetworkSettings, state_dir: &Path) -> Result<Arc<Self>, NetworkError> {
        let setting = |setting, reason| NetworkError::Setting { setting, reason };
        let cidr: Cidr = settings.pool.parse().map_err(|r| setting("pool", r))?;
        let defaults = EgressRules::parse(&settings.egress())
            .map_err(|r| setting("allow / network.deny", r))?;
        if settings.table.is_empty()
            || !settings
                .table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(setting(
                "table",
                format!("{:?} is not an nftables table name", settings.table),
            ));
        }
        let upstream = if settings.upstream_dns.is_empty() {
            host_name_servers()
        } else {
            settings
                .upstream_dns
                .iter()
                .map(|s| {
                    s.parse::<SocketAddr>()
                        .or_else(|_| s.parse::<Ipv4Addr>().map(|a| SocketAddr::from((a, 53))))
                        .map_err(|_| {
                            setting(
                                "upstream_dns",
                                format!("{s:?} is not an address (a.b.c.d or a.b.c.d:port)"),
                            )
                        })
                })
                .collect::<Result<_, _>>()?
        };
        let Leftovers {
            lock,
            host_ns,
            pool,
            ..
        } = Leftovers::take_over(settings, cidr, state_dir)?;
        // Where this state directory's networks live, for `kiln reap`,
        // which has no configuration of its own.
        let host = HostSide {
            host_netns: settings.host_netns.clone(),
            netns_inode: netns_inode(host_ns.as_ref())
                .map_err(io_err("stat of the host side's namespace"))?,
            table: settings.table.clone(),
            pool: settings.pool.clone(),
        };
        let host_file = state_dir.join("net").join(HOST_FILE);
        fs::write(
            &host_file,
            serde_json::to_vec(&host).expect("plain data serializes"),
        )
        .map_err(io_err(format!("writing {}", host_file.display())))?;
        if host_name_servers().iter().all(|a| a.ip().is_loopback()) {
            tracing::warn!(
                "the host's /etc/resolv.conf names only loopback name servers; a jail sees that file, so its lookups go to its own loopback and fail (any non-loopback address works: Kiln redirects them to its resolver)"
            );
        }
        let socket = bind_in(host_ns.as_ref())?;
        let resolver = resolver::Resolver::start(
            socket,
            upstream,
            host_ns
                .as_ref()
                .map(|f| f.try_clone())
                .transpose()
                .map_err(io_err("duplicating the host namespace"))?,
        )
        .map_err(io_err("starting the resolver"))?;
        command::run(
            host_ns.as_ref(),
            "sh",
            &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
            None,
        )?;
        let t = &settings.table;
        let _ = command::run(
            host_ns.as_ref(),
            "nft",
            &["delete", "table", "inet", t],
            None,
        );
        command::run(
            host_ns.as_ref(),
            "nft",
            &["-f", "-"],
            Some(&nft::table(t, cidr, resolver.port())),
        )?;
        Ok(Arc::new(Self {
            host_file,
            private: Mutex::default(),
            table: t.clone(),
            rate_mbit: settings.rate_mbit,
            pool,
            host_ns,
            resolver,
            defaults,
            _lock: lock,
        }))
    }

    /// The default egress rules.
    pub fn default_rules(&self) -> &EgressRules {
        &self.defaults
    }

    /// The network namespace of the host side, when it is not this
    /// process's: where a VMM must run to open its tap by name.
    pub fn host_netns(&self) -> Option<&File> {
        self.host_ns.as_ref()
    }

    /// The pool sandboxes' addresses come from.
    pub fn pool(&self) -> Cidr {
        self.pool.cidr()
    }

    /// The name server networked sandboxes' `/etc/resolv.conf` names: the
    /// pool's first gateway. Any address that leaves a sandbox would do,
    /// since every DNS packet a sandbox sends is redirected to Kiln's
    /// resolver; one that is plainly Kiln's reads best in a sandbox.
    pub fn nameserver(&self) -> Ipv4Addr {
        self.pool().nth(1).expect("a pool holds at least one /30")
    }

    /// The port Kiln's resolver listens on in the host side (sandboxes
    /// reach it as port 53 of any address).
    pub fn resolver_port(&self) -> u16 {
        self.resolver.port()
    }

    /// Slots in use (for tests and reaping).
    pub fn slots_taken(&self) -> usize {
        self.pool.taken().len()
    }

    fn nft(&self, script: &str) -> Result<(), CommandError> {
        command::run(self.host_ns.as_ref(), "nft", &["-f", "-"], Some(script)).map(drop)
    }

    /// A slot and the firewall's chain for `sandbox`, with `rules` (or the
    /// defaults); its interface comes with [`NetLease::connect`].
    pub fn lease(
        self: &Arc<Self>,
        sandbox: &str,
        rules: Option<EgressRules>,
    ) -> Result<NetLease, NetworkError> {
        let slot = self
            .pool
            .take(sandbox)
            .map_err(io_err("taking an address slot"))?
            .ok_or(NetworkError::PoolExhausted(self.pool.cidr()))?;
        let rules = Arc::new(rules.unwrap_or_else(|| self.defaults.clone()));
        let lease = NetLease {
            inner: Arc::new(LeaseInner {
                net: self.clone(),
                slot,
                rules: Mutex::new(rules.clone()),
                room: Mutex::new(None),
                rate_mbit: Mutex::new(self.rate_mbit),
                sandbox: sandbox.to_owned(),
                private: Mutex::new(None),
            }),
        };
        self.nft(&nft::add_sandbox(&self.table, &slot, &rules))?;
        lease.inner.register(rules);
        Ok(lease)
    }
}

/// What a dead predecessor left of the networks of a state directory,
/// taken over with its lock.
struct Leftovers {
    lock: File,
    host_ns: Option<File>,
    pool: pool::Pool,
    /// The slots removed: their sandboxes.
    reaped: Vec<String>,
}

impl Leftovers {
    /// Takes the state directory's network lock (refused while another
    /// process holds it) and removes every slot's interface, conntrack
    /// entries and file.
    fn take_over(
        settings: &NetworkSettings,
        cidr: Cidr,
        state_dir: &Path,
    ) -> Result<Self, NetworkError> {
        let dir = state_dir.join("net");
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let lock_path = dir.join("lock");
        let lock =
            File::create(&lock_path).map_err(io_err(format!("opening {}", lock_path.display())))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(NetworkError::Locked(lock_path));
        }
        let host_ns = settings
            .host_netns
            .as_ref()
            .map(|p| {
                File::open(p).map_err(io_err(format!(
                    "opening network.host_netns {}",
                    p.display()
                )))
            })
            .transpose()?;
        let pool = pool::Pool::new(cidr, dir.join("slots")).map_err(|e| NetworkError::Setting {
            setting: "pool",
            reason: e.to_string(),
        })?;
        let mut reaped = Vec::new();
        for (slot, sandbox) in pool.taken() {
            tracing::info!(
                slot = slot.index,
                sandbox,
                "removing the network of a sandbox of a dead process"
            );
            remove_link(host_ns.as_ref(), &slot);
            forget_connections(host_ns.as_ref(), &slot);
            pool.put_back(&slot);
            reaped.push(sandbox);
        }
        Ok(Self {
            lock,
            host_ns,
            pool,
            reaped,
        })
    }
}

/// What `kiln reap` does for networks: when no process manages the
/// networks of `state_dir`, removes what a dead one left (its slots'
/// interfaces and conntrack entries, its table), in the host side and
/// table the dead one recorded there. Returns the sandboxes whose networks
/// went; nothing when the state directory never had networks.
pub fn reap(state_dir: &Path) -> Result<Vec<String>, NetworkError> {
    let host_file = state_dir.join("net").join(HOST_FILE);
    let Ok(bytes) = fs::read(&host_file) else {
        return Ok(Vec::new());
    };
    let host: HostSide = serde_json::from_slice(&bytes).map_err(|e| NetworkError::Io {
        what: format!("reading {}", host_file.display()),
        source: io::Error::other(e),
    })?;
    let settings = NetworkSettings {
        enabled: true,
        host_netns: host.host_netns,
        table: host.table,
        pool: host.pool,
        ..NetworkSettings::default()
    };
    let cidr: Cidr = settings
        .pool
        .parse()
        .map_err(|reason| NetworkError::Setting {
            setting: "pool",
            reason,
        })?;
    // Only in the very namespace it was: "Kiln's own" of a dead process
    // is whichever namespace that process was in, which need not be ours.
    let here = match &settings.host_netns {
        Some(p) => File::open(p).and_then(|f| netns_inode(Some(&f))),
        None => netns_inode(None),
    };
    if here.ok() != Some(host.netns_inode) {
        return Err(NetworkError::NoNamespace(format!(
            "the networks of {} live in another network namespace than this process's (run kiln reap there)",
            state_dir.display()
        )));
    }
    let left = Leftovers::take_over(&settings, cidr, state_dir)?;
    let _ = command::run(
        left.host_ns.as_ref(),
        "nft",
        &["delete", "table", "inet", &settings.table],
        None,
    );
    let _ = fs::remove_file(&host_file);
    Ok(left.reaped)
}

/// The inode of `ns` (a network namespace file), or of our own.
fn netns_inode(ns: Option<&File>) -> io::Result<u64> {
    match ns {
        Some(f) => f.metadata().map(|m| m.ino()),
        None => fs::metadata("/proc/self/ns/net").map(|m| m.ino()),
    }
}

/// `<state_dir>/net/host.json`: where a state directory's networks live.
const HOST_FILE: &str = "host.json";

/// What [`HOST_FILE`] holds.
#[derive(Serialize, Deserialize)]
struct HostSide {
    host_netns: Option<PathBuf>,
    /// Its inode when recorded (the namespace itself, not just its name).
    netns_inode: u64,
    table: String,
    pool: String,
}

impl Drop for Network {
    /// A clean end: the table goes, and with it the record of where it
    /// was (a later `kiln reap` must not delete a table another Kiln made
    /// since under the same name).
    fn drop(&mut self) {
        let _ = command::run(
            self.host_ns.as_ref(),
            "nft",
            &["delete", "table", "inet", &self.table],
            None,
        );
        let _ = fs::remove_file(&self.host_file);
    }
}

/// The private networks of one [`Network`].
#[derive(Default)]
struct PrivateNetworks {
    next: u32,
    by_name: std::collections::HashMap<String, PrivateNetwork>,
}

struct PrivateNetwork {
    id: u32,
    /// Sandbox id and address of each member.
    members: Vec<(String, Ipv4Addr)>,
}

/// What a private network's name may be: a DNS label.
fn network_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Where a lease's interface is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attached {
    /// A veth pair into the network namespace of this process (a jail's
    /// room).
    Room(i32),
    /// A tap device in the host side (a microVM's); `shaped`: Kiln's `tc`
    /// limits its bandwidth (else the VMM does).
    Tap { shaped: bool },
}

/// One sandbox's network: its slot, rules and current room. Cheap to
/// clone; everything goes when the last clone is dropped.
#[derive(Clone)]
pub struct NetLease {
    inner: Arc<LeaseInner>,
}

struct LeaseInner {
    net: Arc<Network>,
    slot: Slot,
    rules: Mutex<Arc<EgressRules>>,
    /// What the interface is connected to now.
    room: Mutex<Option<Attached>>,
    /// Bandwidth each way, Mbit/s; 0: unlimited.
    rate_mbit: Mutex<u32>,
    /// The sandbox's id, and the private network it joined.
    sandbox: String,
    private: Mutex<Option<String>>,
}

impl LeaseInner {
    /// Tells the resolver who this sandbox is.
    fn register(self: &Arc<Self>, rules: Arc<EgressRules>) {
        let weak = Arc::downgrade(self);
        let client = resolver::Client {
            rules,
            allow: Arc::new(move |addrs, ttl| {
                let Some(me) = weak.upgrade() else {
                    return false;
                };
                let script = nft::add_resolved(&me.net.table, &me.slot, addrs, ttl);
                match me.net.nft(&script) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(
                            slot = me.slot.index,
                            "letting resolved addresses through: {e}"
                        );
                        false
                    }
                }
            }),
        };
        self.net
            .resolver
            .clients
            .lock()
            .expect("never poisoned")
            .insert(self.slot.address, client);
    }
}

impl std::fmt::Debug for NetLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetLease")
            .field("sandbox", &self.inner.sandbox)
            .field("slot", &self.inner.slot.index)
            .finish_non_exhaustive()
    }
}

impl NetLease {
    /// The network namespace of the host side, when it is not this
    /// process's: where a VMM must run to open the lease's tap by name.
    pub fn host_netns(&self) -> Option<&File> {
        self.inner.net.host_ns.as_ref()
    }

    pub fn slot(&self) -> Slot {
        self.inner.slot
    }

    /// The sandbox's address.
    pub fn address(&self) -> Ipv4Addr {
        self.inner.slot.address
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<EgressRules> {
        self.inner.rules.lock().expect("never poisoned").clone()
    }

    /// The address and the rules, for showing.
    pub fn info(&self) -> NetworkInfo {
        NetworkInfo {
            address: self.address(),
            egress: self.rules().to_spec(),
            network: self.private_network(),
            rate_mbit: *self.inner.rate_mbit.lock().expect("never poisoned"),
        }
    }

    /// Gives the network namespace of `holder` (a process of the room) the
    /// sandbox's interface, address and route, taking it from the room
    /// connected before. The caller makes sure the namespace is a new
    /// room's (a jail has no spare room while networked, so its one room
    /// after a reset is the new one); it may not be the host side's.
    pub fn connect(&self, holder: i32) -> Result<(), NetworkError> {
        let i = &self.inner;
        let ns_path = format!("/proc/{holder}/ns/net");
        let ns = File::open(&ns_path).map_err(io_err(format!("opening {ns_path}")))?;
        let ino = ns
            .metadata()
            .map_err(io_err(format!("stat {ns_path}")))?
            .ino();
        let host_ino = match &i.net.host_ns {
            Some(f) => f.metadata().map(|m| m.ino()),
            None => fs::metadata("/proc/self/ns/net").map(|m| m.ino()),
        }
        .map_err(io_err("stat of the host side's namespace"))?;
        if ino == host_ino {
            return Err(NetworkError::NoNamespace(format!(
                "process {holder} is in the host side's namespace"
            )));
        }
        let mut room = i.room.lock().expect("never poisoned");
        self.disconnect_locked(&mut room);
        let s = &i.slot;
        let link = s.host_link();
        let host = format!(
            "link add {link} type veth peer name eth0 netns {holder}\n\
             addr add {}/30 dev {link}\n\
             link set {link} up\n",
            s.gateway
        );
        command::run(i.net.host_ns.as_ref(), "ip", &["-batch", "-"], Some(&host))?;
        let inside = format!(
            "addr add {}/30 dev eth0\n\
             link set eth0 up\n\
             route add default via {}\n",
            s.address, s.gateway
        );
        let rate = *i.rate_mbit.lock().expect("never poisoned");
        let inside = command::run(Some(&ns), "ip", &["-batch", "-"], Some(&inside))
            .map(drop)
            .and_then(|()| self.limit(&ns, rate, false));
        if let Err(e) = inside {
            remove_link(i.net.host_ns.as_ref(), s);
            return Err(e.into());
        }
        *room = Some(Attached::Room(holder));
        Ok(())
    }

    /// Makes the sandbox's interface a tap device for a microVM: `kn<slot>`
    /// in the host side, persistent (it outlives the VMM's descriptor
    /// until the lease removes it), owned by `owner` (uid, gid) so that an
    /// unprivileged VMM may attach to it, with the gateway's address.
    /// `shaped`: the lease's bandwidth is Kiln's to enforce with `tc` (a
    /// VMM with rate limiters of its own, Firecracker, does it instead).
    /// Returns the device's name. Once per lease: a VM is never handed on.
    pub fn attach_tap(
        &self,
        owner: Option<(u32, u32)>,
        shaped: bool,
    ) -> Result<String, NetworkError> {
        let i = &self.inner;
        let mut room = i.room.lock().expect("never poisoned");
        self.disconnect_locked(&mut room);
        let s = &i.slot;
        let link = s.host_link();
        let user = owner
            .map(|(u, g)| format!(" user {u} group {g}"))
            .unwrap_or_default();
        let host = format!(
            "tuntap add dev {link} mode tap{user}\n\
             addr add {}/30 dev {link}\n\
             link set {link} up\n",
            s.gateway
        );
        command::run(i.net.host_ns.as_ref(), "ip", &["-batch", "-"], Some(&host))?;
        let rate = *i.rate_mbit.lock().expect("never poisoned");
        if shaped {
            if let Err(e) = self.limit_tap(rate, false) {
                remove_link(i.net.host_ns.as_ref(), s);
                return Err(e.into());
            }
        }
        *room = Some(Attached::Tap { shaped });
        Ok(link)
    }

    /// What the guest of a tap's VM is told of its network (the guest
    /// setup's): its address, the gateway as route and name server.
    pub fn guest(&self) -> kiln_protocol::GuestNetwork {
        let s = &self.inner.slot;
        kiln_protocol::GuestNetwork {
            address: s.address,
            prefix_len: 30,
            gateway: s.gateway,
            dns: s.gateway,
        }
    }

    /// The bandwidth limit of a tap, `mbit` each way (0: none): a token
    /// bucket on its egress (towards the guest), and one on the egress of
    /// an `ifb` device, `kb<slot>`, that the tap's ingress (the guest's
    /// packets) is redirected through, since no queue of the host's holds
    /// packets arriving from a device (the guest's own queues are the
    /// guest's to change). The `ifb` hands them back to the tap's ingress,
    /// so the firewall sees them as the tap's.
    fn limit_tap(&self, mbit: u32, replace: bool) -> Result<(), CommandError> {
        let i = &self.inner;
        let host = i.net.host_ns.as_ref();
        let link = i.slot.host_link();
        let ifb = i.slot.shaper_link();
        if replace {
            let _ = command::run(host, "tc", &["qdisc", "del", "dev", &link, "ingress"], None);
            let _ = command::run(host, "ip", &["link", "del", &ifb], None);
        }
        if mbit == 0 {
            if replace {
                let _ = command::run(host, "tc", &["qdisc", "del", "dev", &link, "root"], None);
            }
            return Ok(());
        }
        command::run(
            host,
            "ip",
            &["-batch", "-"],
            Some(&format!("link add {ifb} type ifb\nlink set {ifb} up\n")),
        )?;
        let script = format!(
            "{}{}qdisc add dev {link} handle ffff: ingress\n\
             filter add dev {link} parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev {ifb}\n",
            token_bucket(&link, mbit, replace),
            token_bucket(&ifb, mbit, false),
        );
        command::run(host, "tc", &["-batch", "-"], Some(&script)).map(drop)
    }

    /// Applies a bandwidth limit of `mbit` (0: none) to both ends of the
    /// veth pair: towards the sandbox on the host end, from it on its own
    /// end (where a job, without CAP_NET_ADMIN, cannot change it).
    /// `replace`: a limit may be there already.
    fn limit(&self, room_ns: &File, mbit: u32, replace: bool) -> Result<(), CommandError> {
        let i = &self.inner;
        let link = i.slot.host_link();
        for (ns, dev) in [
            (i.net.host_ns.as_ref(), link.as_str()),
            (Some(room_ns), "eth0"),
        ] {
            if mbit == 0 {
                if replace {
                    let _ = command::run(ns, "tc", &["qdisc", "del", "dev", dev, "root"], None);
                }
                continue;
            }
            command::run(
                ns,
                "tc",
                &["-batch", "-"],
                Some(&token_bucket(dev, mbit, replace)),
            )?;
        }
        Ok(())
    }

    /// Sets the sandbox's bandwidth, each way, in Mbit/s (0: unlimited),
    /// at once and for every later room.
    pub fn set_rate(&self, mbit: u32) -> Result<(), NetworkError> {
        let i = &self.inner;
        let room = i.room.lock().expect("never poisoned");
        match *room {
            Some(Attached::Room(holder)) => {
                let ns_path = format!("/proc/{holder}/ns/net");
                let ns = File::open(&ns_path).map_err(io_err(format!("opening {ns_path}")))?;
                self.limit(&ns, mbit, true)?;
            }
            Some(Attached::Tap { shaped: true }) => self.limit_tap(mbit, true)?,
            Some(Attached::Tap { shaped: false }) | None => {}
        }
        *i.rate_mbit.lock().expect("never poisoned") = mbit;
        Ok(())
    }

    /// Takes the interface away from the current room and forgets its
    /// connections and resolved addresses.
    pub fn disconnect(&self) {
        let mut room = self.inner.room.lock().expect("never poisoned");
        self.disconnect_locked(&mut room);
    }

    fn disconnect_locked(&self, room: &mut Option<Attached>) {
        let i = &self.inner;
        let connected = room.take().is_some();
        // The link first (no packet makes new state after it), then the
        // state; each step's commands side by side.
        both(
            || {
                if connected {
                    remove_link(i.net.host_ns.as_ref(), &i.slot);
                }
            },
            || {
                let _ = i.net.nft(&nft::forget_resolved(&i.net.table, &i.slot));
            },
        );
        forget_connections(i.net.host_ns.as_ref(), &i.slot);
    }

    /// Joins the private network `name` (made when the first sandbox
    /// joins): its members reach this sandbox and it reaches them, by
    /// address or by sandbox id through Kiln's resolver. Once per sandbox.
    pub fn join(&self, name: &str) -> Result<(), NetworkError> {
        let i = &self.inner;
        if !network_name_ok(name) {
            return Err(NetworkError::Setting {
                setting: "(sandbox) network",
                reason: format!(
                    "{name:?} is not a network name (letters, digits, - and _, at most 63)"
                ),
            });
        }
        let mut mine = i.private.lock().expect("never poisoned");
        if mine.is_some() {
            return Err(NetworkError::Setting {
                setting: "(sandbox) network",
                reason: "the sandbox is in a private network already".into(),
            });
        }
        let mut nets = i.net.private.lock().expect("never poisoned");
        let next = nets.next;
        let net = nets
            .by_name
            .entry(name.to_owned())
            .or_insert(PrivateNetwork {
                id: next,
                members: Vec::new(),
            });
        let id = net.id;
        let script = nft::join(&i.net.table, id, i.slot.address)
            + &nft::chains(&i.net.table, &i.slot, Some(id));
        if let Err(e) = i.net.nft(&script) {
            if net.members.is_empty() {
                nets.by_name.remove(name);
            }
            return Err(e.into());
        }
        net.members.push((i.sandbox.clone(), i.slot.address));
        if id == next {
            nets.next += 1;
        }
        *mine = Some(name.to_owned());
        i.net
            .resolver
            .peers
            .lock()
            .expect("never poisoned")
            .insert(i.slot.address, id);
        i.net
            .resolver
            .names
            .lock()
            .expect("never poisoned")
            .insert((id, i.sandbox.clone()), i.slot.address);
        Ok(())
    }

    /// The private network joined, if any.
    pub fn private_network(&self) -> Option<String> {
        self.inner.private.lock().expect("never poisoned").clone()
    }

    /// Opens a TCP connection from the host side to `port` of the
    /// sandbox, marked as the daemon's port proxy (the firewall refuses
    /// every other connection into a sandbox). Blocking; made on a thread
    /// of its own when the host side is another namespace.
    pub fn open_port(&self, port: u16) -> Result<std::net::TcpStream, NetworkError> {
        let addr = SocketAddrV4::new(self.address(), port);
        let connect = move || -> io::Result<std::net::TcpStream> {
            // SAFETY: socket with constant arguments; the descriptor is
            // checked and owned at once.
            let fd =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd is a new socket nobody else owns.
            let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let mark = nft::PROXY_MARK;
            // SAFETY: setsockopt with a pointer to a u32 of the size passed.
            let r = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_MARK,
                    (&raw const mark).cast(),
                    size_of::<u32>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: addr.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*addr.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: connect with a sockaddr_in of the size passed.
            let r = unsafe {
                libc::connect(
                    sock.as_raw_fd(),
                    (&raw const sin).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(std::net::TcpStream::from(sock))
        };
        command::in_netns(self.inner.net.host_ns.as_ref(), connect)
            .map_err(io_err(format!("connecting to {addr}")))
    }

    /// New egress rules for a running sandbox: the sets are refilled, the
    /// resolver's addresses forgotten, open connections cut.
    pub fn set_rules(&self, rules: EgressRules) -> Result<(), NetworkError> {
        let i = &self.inner;
        let rules = Arc::new(rules);
        i.net
            .nft(&nft::replace_rules(&i.net.table, &i.slot, &rules))?;
        *i.rules.lock().expect("never poisoned") = rules.clone();
        i.register(rules);
        forget_connections(i.net.host_ns.as_ref(), &i.slot);
        Ok(())
    }
}

impl Drop for LeaseInner {
    fn drop(&mut self) {
        let host = self.net.host_ns.as_ref();
        self.net
            .resolver
            .clients
            .lock()
            .expect("never poisoned")
            .remove(&self.slot.address);
        let left = self.private.lock().expect("never poisoned").take();
        if let Some(name) = left {
            self.leave(&name);
        }
        both(
            || remove_link(host, &self.slot),
            || {
                // One transaction; when part is missing (a set-up that
                // failed half way) it fails whole, and then each piece is
                // removed on its own.
                let all = nft::remove_sandbox(&self.net.table, &self.slot);
                if self.net.nft(&(all.join("\n") + "\n")).is_err() {
                    for cmd in all {
                        if let Err(e) = self.net.nft(&cmd) {
                            tracing::debug!(
                                slot = self.slot.index,
                                "removing the sandbox's rules: {e}"
                            );
                        }
                    }
                }
            },
        );
        forget_connections(host, &self.slot);
        self.net.pool.put_back(&self.slot);
    }
}

/// A `tc` command: a token bucket of `mbit` Mbit/s as the root queue of
/// `dev`. The bucket holds 20 ms of traffic, and at least 64 KiB (a
/// segmentation-offloaded packet on a veth can be that large).
fn token_bucket(dev: &str, mbit: u32, replace: bool) -> String {
    let burst = token_burst(mbit);
    let verb = if replace { "replace" } else { "add" };
    format!("qdisc {verb} dev {dev} root tbf rate {mbit}mbit burst {burst} latency 50ms\n")
}

/// The bucket of a limit of `mbit` Mbit/s, in bytes: 20 ms of traffic,
/// and at least 64 KiB.
fn token_burst(mbit: u32) -> u64 {
    let bytes_per_s = u64::from(mbit) * 1_000_000 / 8;
    (bytes_per_s / 50).max(64 << 10)
}

impl LeaseInner {
    /// Leaves a private network (its set goes with its last member).
    fn leave(&self, name: &str) {
        let t = &self.net.table;
        self.net
            .resolver
            .peers
            .lock()
            .expect("never poisoned")
            .remove(&self.slot.address);
        let mut nets = self.net.private.lock().expect("never poisoned");
        let Some(net) = nets.by_name.get_mut(name) else {
            return;
        };
        let id = net.id;
        self.net
            .resolver
            .names
            .lock()
            .expect("never poisoned")
            .remove(&(id, self.sandbox.clone()));
        net.members.retain(|(s, _)| *s != self.sandbox);
        let _ = self.net.nft(&nft::chains(t, &self.slot, None));
        let _ = self.net.nft(&nft::leave(t, id, self.slot.address));
        if net.members.is_empty() {
            nets.by_name.remove(name);
            let _ = self.net.nft(&nft::drop_network(t, id));
        }
    }
}

/// Deletes the host end of a slot's veth pair (the other end goes with
/// it) or its tap, and a tap's shaper; nothing when they are gone. One
/// `ip` that goes on past the first failure (a jail has no shaper).
fn remove_link(host_ns: Option<&File>, slot: &Slot) {
    let script = format!(
        "link del {}\nlink del {}\n",
        slot.host_link(),
        slot.shaper_link()
    );
    let _ = command::run(host_ns, "ip", &["-force", "-batch", "-"], Some(&script));
}

/// Deletes the conntrack entries of a slot's address, so that nothing of
/// a lease's connections (NAT mappings, "established" state a peer could
/// keep sending into) outlives it.
fn forget_connections(host_ns: Option<&File>, slot: &Slot) {
    let a = slot.address.to_string();
    // Its own connections (their NAT mappings included), and those a
    // private network's peers opened to it.
    let delete = |dir: &str| {
        let _ = command::run(host_ns, "conntrack", &["-D", dir, &a], None);
    };
    both(|| delete("--orig-src"), || delete("--orig-dst"));
}

/// Runs `a` and `b` side by side (two data-plane commands: their forks
/// and execs are most of what they cost).
fn both(a: impl FnOnce() + Send, b: impl FnOnce() + Send) {
    std::thread::scope(|s| {
        s.spawn(a);
        b();
    });
}

/// A UDP socket on a free port of every address, made in `host_ns`.
fn bind_in(host_ns: Option<&File>) -> Result<UdpSocket, NetworkError> {
    let bind = || UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    command::in_netns(host_ns, bind).map_err(io_err(if host_ns.is_some() {
        "binding the resolver's socket in network.host_netns"
    } else {
        "binding the resolver's socket"
    }))
}

/// The IPv4 name servers of `/etc/resolv.conf`, at port 53.
fn host_name_servers() -> Vec<SocketAddr> {
    let text = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut seen = HashSet::new();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| seen.insert(*a))
        .map(|a| SocketAddr::from((a, 53)))
        .collect()
}

//! The address pool: a configured IPv4 network cut into /30 *slots*, one
//! per networked sandbox (its gateway on the host side is the slot's first
//! host address, the sandbox the second). A slot is taken by creating its
//! file under `<state_dir>/net/slots/` with `O_EXCL`, so two takers never
//! share one, and the file names the sandbox, so that whoever finds it
//! after a crash knows what to remove. The numbers name the host-side
//! interface (`kn<slot>`) and the firewall's chain and sets too.

use std::fs;
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::rules::Cidr;

/// Addresses per slot: network, gateway, sandbox, broadcast.
const SLOT_SIZE: u64 = 4;

/// One sandbox's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    pub gateway: Ipv4Addr,
    pub address: Ipv4Addr,
}

impl Slot {
    /// The host-side end of the sandbox's veth pair.
    pub fn host_link(&self) -> String {
        format!("kn{}", self.index)
    }

    /// The `ifb` device that shapes what a tap's guest sends
    /// (`NetLease::attach_tap`); not `kn*`, which the firewall keys on.
    pub fn shaper_link(&self) -> String {
        format!("kb{}", self.index)
    }
}

pub struct Pool {
    cidr: Cidr,
    dir: PathBuf,
    /// Where the next search starts: slots are handed out round the pool,
    /// so a released one rests before it is taken again.
    next: AtomicU32,
}

impl Pool {
    /// A pool over `cidr` recording its slots in `dir` (created).
    pub fn new(cidr: Cidr, dir: PathBuf) -> io::Result<Self> {
        if cidr.size() < SLOT_SIZE {
            return Err(io::Error::other(format!(
                "the pool {cidr} is smaller than one /30"
            )));
        }
        fs::create_dir_all(&dir)?;
        Ok(Self {
            cidr,
            dir,
            next: AtomicU32::new(0),
        })
    }

    pub fn cidr(&self) -> Cidr {
        self.cidr
    }

    /// How many sandboxes the pool holds (interface names stay below 15
    /// bytes: `kn` and at most 8 digits).
    pub fn capacity(&self) -> u32 {
        (self.cidr.size() / SLOT_SIZE).min(10_000_000) as u32
    }

    pub fn slot(&self, index: u32) -> Slot {
        let base = u64::from(index) * SLOT_SIZE;
        Slot {
            index,
            gateway: self.cidr.nth(base + 1).expect("index below capacity"),
            address: self.cidr.nth(base + 2).expect("index below capacity"),
        }
    }

    fn file(&self, index: u32) -> PathBuf {
        self.dir.join(index.to_string())
    }

    /// Takes a free slot for `sandbox`; `None` when every slot is taken.
    pub fn take(&self, sandbox: &str) -> io::Result<Option<Slot>> {
        let cap = self.capacity();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % cap;
        for i in 0..cap {
            let index = (start + i) % cap;
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(self.file(index))
            {
                Ok(mut f) => {
                    f.write_all(sandbox.as_bytes())?;
                    self.next
                        .store(index.wrapping_add(1) % cap, Ordering::Relaxed);
                    return Ok(Some(self.slot(index)));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Gives a slot back (its interface and rules must be gone first).
    pub fn put_back(&self, slot: &Slot) {
        let _ = fs::remove_file(self.file(slot.index));
    }

    /// The slots taken, with the sandbox each names.
    pub fn taken(&self) -> Vec<(Slot, String)> {
        taken_in(&self.dir)
            .into_iter()
            .filter(|(i, _)| *i < self.capacity())
            .map(|(i, s)| (self.slot(i), s))
            .collect()
    }
}

/// Slot files in `dir`: index and sandbox id.
pub fn taken_in(dir: &Path) -> Vec<(u32, String)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let index = e.file_name().to_str()?.parse().ok()?;
            let sandbox = fs::read_to_string(e.path()).unwrap_or_default();
            Some((index, sandbox))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_once_and_come_back() {
        let dir = std::env::temp_dir().join(format!("kiln-pool-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let pool = Pool::new("10.9.0.0/29".parse().unwrap(), dir.clone()).unwrap();
        assert_eq!(pool.capacity(), 2);
        let a = pool.take("a").unwrap().unwrap();
        let b = pool.take("b").unwrap().unwrap();
        assert_ne!(a.index, b.index);
        assert!(pool.take("c").unwrap().is_none(), "the pool is full");
        let (x, y) = if a.index == 0 { (a, b) } else { (b, a) };
        assert_eq!(x.gateway, Ipv4Addr::new(10, 9, 0, 1));
        assert_eq!(x.address, Ipv4Addr::new(10, 9, 0, 2));
        assert_eq!(y.address, Ipv4Addr::new(10, 9, 0, 6));
        assert_eq!(pool.taken().len(), 2);
        pool.put_back(&a);
        assert_eq!(pool.take("d").unwrap().unwrap().index, a.index);
        fs::remove_dir_all(&dir).unwrap();
    }
}

//! Egress rules: which addresses and which names a sandbox may reach.
//!
//! A rule is an IPv4 network (`10.0.0.0/8`, `192.0.2.7`), a domain name
//! (`example.com`, exactly that name), a wildcard (`*.example.com`, every
//! name below it but not the name itself) or `*` (every name). Deny rules
//! win over allow rules. An address is reachable when an allow network
//! holds it, or when Kiln's resolver handed it out for an allowed name;
//! a name is answered only when it is allowed and not denied. Parsed once
//! at the edge ([`EgressRules::parse`]); what is kept is typed.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network: an address and a prefix length, the host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Cidr {
    /// `addr/prefix`; host bits of `addr` are cleared.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32).then(|| Self {
            addr: Ipv4Addr::from(u32::from(addr) & Self::mask(prefix)),
            prefix,
        })
    }

    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// How many addresses it holds.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == u32::from(self.addr)
    }

    /// The `n`th address of the network (`None` past its end).
    pub fn nth(&self, n: u64) -> Option<Ipv4Addr> {
        (n < self.size()).then(|| Ipv4Addr::from(u32::from(self.addr) + n as u32))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address or network (a.b.c.d/n)"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to 32"))?;
        let c = Cidr::new(addr, prefix).expect("prefix checked");
        if c.addr != addr {
            return Err(format!("{s:?} has host bits set; did you mean {c}?"));
        }
        Ok(c)
    }
}

/// A domain rule, lower case, without the trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DomainRule {
    /// Exactly this name.
    Exact(String),
    /// Every name strictly below this one (`*.example.com`).
    Below(String),
    /// Every name (`*`).
    Any,
}

impl DomainRule {
    /// Whether `name` (any case, trailing dot or not) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match self {
            DomainRule::Any => true,
            DomainRule::Exact(d) => name == *d,
            DomainRule::Below(d) => name.len() > d.len() + 1 && name.ends_with(&format!(".{d}")),
        }
    }
}

/// One egress rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Rule {
    Network(Cidr),
    Domain(DomainRule),
}

impl FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(Rule::Domain(DomainRule::Any));
        }
        if s.starts_with(|c: char| c.is_ascii_digit())
            && !s.contains(|c: char| c.is_ascii_alphabetic())
        {
            return s.parse().map(Rule::Network);
        }
        let (below, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!(
                "{s:?} is neither an IPv4 network (a.b.c.d/n) nor a domain (example.com, *.example.com, *)"
            ));
        }
        Ok(Rule::Domain(if below {
            DomainRule::Below(name)
        } else {
            DomainRule::Exact(name)
        }))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Network(c) => c.fmt(f),
            Rule::Domain(DomainRule::Any) => f.write_str("*"),
            Rule::Domain(DomainRule::Exact(d)) => f.write_str(d),
            Rule::Domain(DomainRule::Below(d)) => write!(f, "*.{d}"),
        }
    }
}

/// Egress rules as they travel (configuration, API bodies, jobs): lists of
/// rule strings, defined with the job they travel in.
pub use kiln_protocol::EgressSpec;

/// Parsed egress rules of one sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressRules {
    pub allow_networks: Vec<Cidr>,
    pub deny_networks: Vec<Cidr>,
    pub allow_names: Vec<DomainRule>,
    pub deny_names: Vec<DomainRule>,
}

impl EgressRules {
    /// Parses every rule of `spec`; the error names the first bad one.
    pub fn parse(spec: &EgressSpec) -> Result<Self, String> {
        let mut r = Self::default();
        for (list, allow) in [(&spec.allow, true), (&spec.deny, false)] {
            for s in list {
                match s.parse::<Rule>()? {
                    Rule::Network(c) if allow => r.allow_networks.push(c),
                    Rule::Network(c) => r.deny_networks.push(c),
                    Rule::Domain(d) if allow => r.allow_names.push(d),
                    Rule::Domain(d) => r.deny_names.push(d),
                }
            }
        }
        Ok(r)
    }

    /// The rules as strings again (for showing them).
    pub fn to_spec(&self) -> EgressSpec {
        let show = |nets: &[Cidr], names: &[DomainRule]| {
            nets.iter()
                .map(|c| Rule::Network(*c).to_string())
                .chain(names.iter().map(|d| Rule::Domain(d.clone()).to_string()))
                .collect()
        };
        EgressSpec {
            allow: show(&self.allow_networks, &self.allow_names),
            deny: show(&self.deny_networks, &self.deny_names),
        }
    }

    /// Whether Kiln's resolver answers `name` for this sandbox.
    pub fn name_allowed(&self, name: &str) -> bool {
        self.allow_names.iter().any(|d| d.matches(name))
            && !self.deny_names.iter().any(|d| d.matches(name))
    }

    /// Whether an address is denied outright (before any allow).
    pub fn address_denied(&self, ip: Ipv4Addr) -> bool {
        self.deny_networks.iter().any(|c| c.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(allow: &[&str], deny: &[&str]) -> EgressSpec {
        EgressSpec {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn networks_parse_with_or_without_a_prefix_and_refuse_host_bits() {
        assert_eq!(
            "10.1.0.0/16".parse::<Cidr>().unwrap(),
            Cidr::new(Ipv4Addr::new(10, 1, 0, 0), 16).unwrap()
        );
        assert_eq!("192.0.2.7".parse::<Cidr>().unwrap().prefix(), 32);
        assert!("10.1.2.3/16"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("10.1.0.0/16"));
        assert!("10.1.0.0/33".parse::<Cidr>().is_err());
        let c: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(c.contains(Ipv4Addr::new(203, 0, 113, 9)));
        assert_eq!(c.size(), 1 << 32);
    }

    #[test]
    fn wildcards_match_names_below_and_not_the_name_itself() {
        let r = EgressRules::parse(&spec(&["*.example.com", "exact.org"], &[])).unwrap();
        assert!(r.name_allowed("www.example.com"));
        assert!(r.name_allowed("A.B.Example.COM."));
        assert!(!r.name_allowed("example.com"));
        assert!(!r.name_allowed("badexample.com"));
        assert!(r.name_allowed("exact.org."));
        assert!(!r.name_allowed("www.exact.org"));
    }

    #[test]
    fn deny_wins_over_allow() {
        let r = EgressRules::parse(&spec(
            &["*", "0.0.0.0/0"],
            &["*.blocked.test", "198.18.5.0/24"],
        ))
        .unwrap();
        assert!(r.name_allowed("ok.test"));
        assert!(!r.name_allowed("x.blocked.test"));
        assert!(r.address_denied(Ipv4Addr::new(198, 18, 5, 1)));
        assert_eq!(EgressRules::parse(&r.to_spec()).unwrap(), r);
        assert!(!r.address_denied(Ipv4Addr::new(198, 18, 6, 1)));
    }

    #[test]
    fn bad_rules_are_named_in_the_error() {
        let e = EgressRules::parse(&spec(&["exa mple.com"], &[])).unwrap_err();
        assert!(e.contains("exa mple.com"), "{e}");
        assert!(EgressRules::parse(&spec(&["*.*.com"], &[])).is_err());
        assert!(EgressRules::parse(&spec(&["300.1.1.1"], &[])).is_err());
    }
}

//! Destinations in `allow` and `deny` lists, and the address ranges that
//! stay closed unless a rule names them exactly.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// One entry of an `allow` or `deny` list.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Destination {
    /// A host name that matches itself only, such as `pypi.org`.
    Host(String),
    /// `*.example.com`: every name below `example.com`, at any depth, but
    /// not `example.com` itself.
    Subdomains(String),
    /// An IP address (a network of one address) or a CIDR range.
    Network(IpNetwork),
}

impl Destination {
    /// Whether the host name `name` (lower case, no trailing dot) matches.
    pub(crate) fn matches_name(&self, name: &str) -> bool {
        match self {
            Self::Host(host) => host == name,
            Self::Subdomains(parent) => name
                .strip_suffix(parent.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            Self::Network(_) => false,
        }
    }

    pub(crate) fn matches_addr(&self, addr: IpAddr) -> bool {
        match self {
            Self::Network(network) => network.contains(addr),
            _ => false,
        }
    }
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.contains('/') {
            return text.parse().map(Self::Network);
        }
        let bare = text
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .unwrap_or(text);
        if let Ok(addr) = bare.parse::<IpAddr>() {
            return Ok(Self::Network(IpNetwork::single(addr)));
        }
        let name = normalize_name(text);
        if let Some(parent) = name.strip_prefix("*.") {
            check_name(parent)?;
            return Ok(Self::Subdomains(parent.to_string()));
        }
        check_name(&name)?;
        Ok(Self::Host(name))
    }
}

impl TryFrom<String> for Destination {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<Destination> for String {
    fn from(destination: Destination) -> Self {
        destination.to_string()
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host(name) => f.write_str(name),
            Self::Subdomains(parent) => write!(f, "*.{parent}"),
            Self::Network(network) => network.fmt(f),
        }
    }
}

/// Lower-cases a host name and drops a trailing dot, the form every rule
/// and every name seen on the wire is compared in.
pub(crate) fn normalize_name(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

fn check_name(name: &str) -> Result<(), String> {
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(valid_label) {
        return Err(format!(
            "`{name}` is not a host name, IP address or CIDR range; write one such as \
             pypi.org, *.github.com, 192.0.2.7 or 198.51.100.0/24"
        ));
    }
    Ok(())
}

/// An IP network in CIDR form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNetwork {
    addr: IpAddr,
    prefix: u8,
}

impl IpNetwork {
    fn single(addr: IpAddr) -> Self {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix }
    }

    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Self {
        Self {
            addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            prefix,
        }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> Self {
        let [a, b, c, d, e, f, g, h] = segments;
        Self {
            addr: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            prefix,
        }
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, addr) {
            (IpAddr::V4(net), IpAddr::V4(addr)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(addr) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(addr)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(addr) & mask
            }
            _ => false,
        }
    }

    /// Whether every address of `other` lies in this network.
    fn covers(&self, other: &IpNetwork) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }
}

impl FromStr for IpNetwork {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || {
            format!(
                "`{text}` is not a CIDR range; write an address and a prefix length, \
                 such as 198.51.100.0/24 or 2001:db8::/32"
            )
        };
        let (addr, prefix) = text.split_once('/').ok_or_else(invalid)?;
        let addr: IpAddr = addr.parse().map_err(|_| invalid())?;
        let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(invalid());
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let single = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == single {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

/// Ranges that no policy opens by accident: loopback, private,
/// shared (carrier-grade NAT), link-local (which contains the cloud
/// metadata address 169.254.169.254), multicast and reserved addresses.
const INTERNAL_RANGES: [(IpNetwork, &str); 14] = [
    (IpNetwork::v4(0, 0, 0, 0, 8), "this-network"),
    (IpNetwork::v4(10, 0, 0, 0, 8), "private"),
    (IpNetwork::v4(100, 64, 0, 0, 10), "shared address space"),
    (IpNetwork::v4(127, 0, 0, 0, 8), "loopback"),
    (IpNetwork::v4(169, 254, 0, 0, 16), "link-local and metadata"),
    (IpNetwork::v4(172, 16, 0, 0, 12), "private"),
    (IpNetwork::v4(192, 168, 0, 0, 16), "private"),
    (IpNetwork::v4(224, 0, 0, 0, 4), "multicast"),
    (IpNetwork::v4(240, 0, 0, 0, 4), "reserved"),
    (IpNetwork::v6([0; 8], 128), "unspecified"),
    (IpNetwork::v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    (
        IpNetwork::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        "unique local",
    ),
    (
        IpNetwork::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
        "link-local",
    ),
    (IpNetwork::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
];

/// Host names of cloud metadata services, closed like their addresses.
const METADATA_NAMES: [&str; 3] = [
    "metadata.google.internal",
    "metadata.goog",
    "instance-data.ec2.internal",
];

pub(crate) fn is_metadata_name(name: &str) -> bool {
    METADATA_NAMES.contains(&name)
}

/// The internal range that contains `addr`, with its description, looking
/// through IPv4-mapped IPv6 addresses. `host_addrs` are the host's own
/// addresses, each closed as a range of one.
pub(crate) fn internal_range(
    addr: IpAddr,
    host_addrs: &[IpAddr],
) -> Option<(IpNetwork, &'static str)> {
    let addr = unmap(addr);
    let range = INTERNAL_RANGES
        .iter()
        .find(|(range, _)| range.contains(addr))
        .copied();
    if range.is_none() && host_addrs.iter().any(|own| unmap(*own) == addr) {
        return Some((IpNetwork::single(addr), "an address of the host"));
    }
    range
}

/// Whether an allow rule opens `addr` inside the internal `range`: the rule
/// must be an address or CIDR range that contains `addr` and lies wholly
/// inside `range`, so `0.0.0.0/0` opens nothing internal but `10.0.0.0/8`
/// or `169.254.169.254` open what they name.
pub(crate) fn opens_internal(rule: &Destination, addr: IpAddr, range: &IpNetwork) -> bool {
    match rule {
        Destination::Network(network) => network.contains(unmap(addr)) && range.covers(network),
        _ => false,
    }
}

pub(crate) fn unmap(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(text: &str) -> Destination {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn destinations_parse() {
        assert_eq!(dest("PyPI.org."), Destination::Host("pypi.org".into()));
        assert_eq!(
            dest("*.github.com"),
            Destination::Subdomains("github.com".into())
        );
        assert_eq!(dest("192.0.2.7").to_string(), "192.0.2.7");
        assert_eq!(dest("[2001:db8::1]").to_string(), "2001:db8::1");
        assert_eq!(dest("198.51.100.0/24").to_string(), "198.51.100.0/24");
    }

    #[test]
    fn invalid_destinations_are_rejected() {
        for text in [
            "",
            "a b",
            "10.0.0.0/33",
            "10.0.0.0/x",
            "*.",
            "https://x.org",
        ] {
            assert!(text.parse::<Destination>().is_err(), "{text}");
        }
    }

    #[test]
    fn subdomain_rule_skips_apex() {
        let rule = dest("*.example.com");
        assert!(rule.matches_name("a.example.com"));
        assert!(rule.matches_name("a.b.example.com"));
        assert!(!rule.matches_name("example.com"));
        assert!(!rule.matches_name("badexample.com"));
    }

    #[test]
    fn network_contains() {
        let net: IpNetwork = "198.51.100.0/24".parse().unwrap();
        assert!(net.contains(ip("198.51.100.9")));
        assert!(!net.contains(ip("198.51.101.9")));
        assert!(!net.contains(ip("2001:db8::1")));
        let all: IpNetwork = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.80")));
    }

    #[test]
    fn internal_ranges_cover_special_addresses() {
        for text in [
            "127.0.0.1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "::1",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(internal_range(ip(text), &[]).is_some(), "{text}");
        }
        assert!(internal_range(ip("203.0.113.80"), &[]).is_none());
        let own = ip("203.0.113.5");
        assert!(internal_range(own, &[own]).is_some());
    }

    #[test]
    fn only_narrow_rules_open_internal_addresses() {
        let metadata = ip("169.254.169.254");
        let (range, _) = internal_range(metadata, &[]).unwrap();
        assert!(opens_internal(&dest("169.254.169.254"), metadata, &range));
        assert!(!opens_internal(&dest("0.0.0.0/0"), metadata, &range));
        assert!(!opens_internal(
            &dest("metadata.google.internal"),
            metadata,
            &range
        ));
        let private = ip("10.9.8.7");
        let (range, _) = internal_range(private, &[]).unwrap();
        assert!(opens_internal(&dest("10.0.0.0/8"), private, &range));
        assert!(!opens_internal(&dest("10.0.0.0/7"), private, &range));
    }
}

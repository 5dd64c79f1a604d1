//! Network policy of a sandbox and the decision for one destination.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::rule::{self, Destination};

/// Outbound network access of a sandbox. The default is no network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkPolicy {
    /// Whether the sandbox may open outbound connections at all. When
    /// false, the guest has no network interface unless ports are published.
    pub egress: bool,
    /// Destinations the sandbox may reach. Empty means every destination
    /// that is not denied and not internal.
    pub allow: Vec<Destination>,
    /// Destinations the sandbox may not reach, even when allowed.
    pub deny: Vec<Destination>,
    pub limits: NetworkLimits,
}

impl NetworkPolicy {
    /// No network: the guest has no route anywhere.
    pub fn off() -> Self {
        Self::default()
    }

    /// Outbound internet access; internal addresses stay closed.
    pub fn internet() -> Self {
        Self {
            egress: true,
            ..Self::default()
        }
    }

    /// Outbound access limited by `allow` and `deny` lists written as host
    /// names (`pypi.org`, `*.github.com`), addresses or CIDR ranges.
    pub fn rules<S: AsRef<str>>(allow: &[S], deny: &[S]) -> Result<Self, PolicyError> {
        Ok(Self {
            egress: true,
            allow: parse_list(allow)?,
            deny: parse_list(deny)?,
            ..Self::default()
        })
    }
}

fn parse_list<S: AsRef<str>>(texts: &[S]) -> Result<Vec<Destination>, PolicyError> {
    texts
        .iter()
        .map(|text| {
            text.as_ref()
                .parse()
                .map_err(|reason| PolicyError::InvalidRule {
                    rule: text.as_ref().to_string(),
                    reason,
                })
        })
        .collect()
}

/// Limits on a sandbox's outbound traffic, enforced by the host proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkLimits {
    /// Open outbound connections at one time (DNS lookups count while they
    /// run). Further connections are reset at once.
    pub max_connections: u32,
    /// Bytes per second, both directions together, over all connections;
    /// `None` for no limit.
    pub bandwidth: Option<u64>,
}

impl Default for NetworkLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            bandwidth: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("Invalid network rule `{rule}`: {reason}")]
    InvalidRule { rule: String, reason: String },
}

/// Why a destination is blocked; the text goes into logs and into the
/// proxy's reply to the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// A `deny` rule matches the name or an address.
    DenyRule(String),
    /// An allow list is set and nothing in it matches.
    NotAllowed,
    /// Every address lies in an internal range that no rule names.
    Internal { addr: IpAddr, range: &'static str },
    /// The name has no address.
    Unresolved,
    /// Connections beyond [`NetworkLimits::max_connections`].
    ConnectionLimit,
    /// Neither a TLS server name nor an HTTP Host header came first on a
    /// connection whose destination is known only from them.
    NoHostName,
    /// A port the proxy does not carry, because only HTTP and TLS are
    /// routed by name.
    UnsupportedPort,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DenyRule(rule) => write!(f, "denied by rule `{rule}`"),
            Self::NotAllowed => f.write_str("not in the allow list"),
            Self::Internal { addr, range } => {
                write!(f, "{addr} is {range}; allow the exact address to reach it")
            }
            Self::Unresolved => f.write_str("the name does not resolve"),
            Self::ConnectionLimit => f.write_str("too many open connections"),
            Self::NoHostName => f.write_str("no TLS server name or HTTP Host header"),
            Self::UnsupportedPort => f.write_str(
                "only HTTP and TLS on ports 80, 443, 8080 and 8443, or the HTTP proxy, are carried",
            ),
        }
    }
}

/// A policy ready to judge destinations, with the host's own addresses.
#[derive(Clone, Debug)]
pub(crate) struct Judge {
    policy: NetworkPolicy,
    host_addrs: Vec<IpAddr>,
}

impl Judge {
    pub fn new(policy: NetworkPolicy, host_addrs: Vec<IpAddr>) -> Self {
        Self { policy, host_addrs }
    }

    /// Checks the rules that apply to a host name alone, before it is
    /// resolved: deny rules, metadata names and name-only allow lists.
    pub fn check_name(&self, name: &str) -> Result<(), Denial> {
        let name = rule::normalize_name(name);
        if let Some(rule) = self.policy.deny.iter().find(|r| r.matches_name(&name)) {
            return Err(Denial::DenyRule(rule.to_string()));
        }
        if rule::is_metadata_name(&name) && !self.names_exactly(&name) {
            return Err(Denial::DenyRule(format!("{name} (cloud metadata)")));
        }
        let allow = &self.policy.allow;
        let any_network_rule = allow.iter().any(|r| matches!(r, Destination::Network(_)));
        if !allow.is_empty() && !any_network_rule && !allow.iter().any(|r| r.matches_name(&name)) {
            return Err(Denial::NotAllowed);
        }
        Ok(())
    }

    fn names_exactly(&self, name: &str) -> bool {
        self.policy
            .allow
            .iter()
            .any(|r| *r == Destination::Host(name.to_string()))
    }

    /// Returns the addresses of `name` (if any) that may be connected to.
    /// `addrs` are what the host resolved, or the address the guest gave.
    pub fn filter_addrs(
        &self,
        name: Option<&str>,
        addrs: &[IpAddr],
    ) -> Result<Vec<IpAddr>, Denial> {
        let name = name.map(rule::normalize_name);
        if let Some(name) = &name {
            self.check_name(name)?;
        }
        let name_allowed = name
            .as_ref()
            .is_some_and(|name| self.policy.allow.iter().any(|r| r.matches_name(name)));

        let mut first_denial = None;
        let mut kept = Vec::new();
        for &addr in addrs {
            match self.check_addr(addr, name_allowed) {
                Ok(()) => kept.push(addr),
                Err(denial) => {
                    first_denial.get_or_insert(denial);
                }
            }
        }
        if kept.is_empty() {
            return Err(first_denial.unwrap_or(Denial::Unresolved));
        }
        Ok(kept)
    }

    fn check_addr(&self, addr: IpAddr, name_allowed: bool) -> Result<(), Denial> {
        let plain = rule::unmap(addr);
        if let Some(rule) = self.policy.deny.iter().find(|r| r.matches_addr(plain)) {
            return Err(Denial::DenyRule(rule.to_string()));
        }
        if let Some((range, description)) = rule::internal_range(plain, &self.host_addrs) {
            let opened = self
                .policy
                .allow
                .iter()
                .any(|r| rule::opens_internal(r, plain, &range));
            if !opened {
                return Err(Denial::Internal {
                    addr: plain,
                    range: description,
                });
            }
            return Ok(());
        }
        let allow = &self.policy.allow;
        if allow.is_empty() || name_allowed || allow.iter().any(|r| r.matches_addr(plain)) {
            Ok(())
        } else {
            Err(Denial::NotAllowed)
        }
    }
}

/// The host's own addresses, which a sandbox must not reach through the
/// proxy even when they are public.
pub(crate) fn host_addresses() -> Vec<IpAddr> {
    let mut found = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that stays valid
    // until freeifaddrs, and every sockaddr is read according to its family.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return found;
        }
        let mut entry = list;
        while !entry.is_null() {
            let addr = (*entry).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*(addr as *const libc::sockaddr_in);
                        let bytes = v4.sin_addr.s_addr.to_ne_bytes();
                        found.push(IpAddr::from(bytes));
                    }
                    libc::AF_INET6 => {
                        let v6 = &*(addr as *const libc::sockaddr_in6);
                        found.push(IpAddr::from(v6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn judge(allow: &[&str], deny: &[&str]) -> Judge {
        Judge::new(
            NetworkPolicy::rules(allow, deny).unwrap(),
            vec![ip("198.51.100.7")],
        )
    }

    #[test]
    fn internet_policy_allows_public_addresses() {
        let judge = judge(&[], &[]);
        assert_eq!(
            judge.filter_addrs(Some("pypi.org"), &[ip("203.0.113.80")]),
            Ok(vec![ip("203.0.113.80")])
        );
    }

    #[test]
    fn internal_addresses_are_denied_by_default() {
        let judge = judge(&[], &[]);
        for addr in [
            "127.0.0.1",
            "10.0.2.2",
            "192.168.0.1",
            "::1",
            "198.51.100.7",
        ] {
            let result = judge.filter_addrs(Some("internal.example"), &[ip(addr)]);
            assert!(matches!(result, Err(Denial::Internal { .. })), "{addr}");
        }
    }

    #[test]
    fn metadata_address_is_denied_even_with_allow_all_ranges() {
        let judge = judge(&["0.0.0.0/0", "*.internal"], &[]);
        let result = judge.filter_addrs(None, &[ip("169.254.169.254")]);
        assert!(matches!(result, Err(Denial::Internal { .. })), "{result:?}");
        let result = judge.check_name("metadata.google.internal");
        assert!(matches!(result, Err(Denial::DenyRule(_))), "{result:?}");
    }

    #[test]
    fn exact_address_opens_internal_destination() {
        let judge = judge(&["127.0.0.1"], &[]);
        assert_eq!(
            judge.filter_addrs(None, &[ip("127.0.0.1")]),
            Ok(vec![ip("127.0.0.1")])
        );
        assert!(judge.filter_addrs(None, &[ip("127.0.0.2")]).is_err());
    }

    #[test]
    fn rebinding_name_to_internal_address_is_denied() {
        let judge = judge(&["allowed.example"], &[]);
        let result = judge.filter_addrs(Some("allowed.example"), &[ip("10.1.1.1")]);
        assert!(matches!(result, Err(Denial::Internal { .. })), "{result:?}");
    }

    #[test]
    fn allow_list_limits_names() {
        let judge = judge(&["pypi.org", "*.pythonhosted.org"], &[]);
        let public = [ip("203.0.113.80")];
        assert!(judge.filter_addrs(Some("pypi.org"), &public).is_ok());
        assert!(judge
            .filter_addrs(Some("files.pythonhosted.org"), &public)
            .is_ok());
        assert_eq!(judge.check_name("example.com"), Err(Denial::NotAllowed));
        assert_eq!(judge.filter_addrs(None, &public), Err(Denial::NotAllowed));
    }

    #[test]
    fn allow_list_with_ranges_matches_addresses() {
        let judge = judge(&["203.0.113.0/24"], &[]);
        assert!(judge
            .filter_addrs(Some("any.example"), &[ip("203.0.113.9")])
            .is_ok());
        assert_eq!(
            judge.filter_addrs(Some("any.example"), &[ip("192.0.2.1")]),
            Err(Denial::NotAllowed)
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let judge = judge(&["*.example.com"], &["bad.example.com", "203.0.113.66"]);
        let public = [ip("203.0.113.9")];
        assert!(judge.filter_addrs(Some("ok.example.com"), &public).is_ok());
        assert_eq!(
            judge.check_name("BAD.example.com."),
            Err(Denial::DenyRule("bad.example.com".into()))
        );
        assert_eq!(
            judge.filter_addrs(Some("ok.example.com"), &[ip("203.0.113.66")]),
            Err(Denial::DenyRule("203.0.113.66".into()))
        );
    }

    #[test]
    fn denied_addresses_are_dropped_from_a_mixed_answer() {
        let judge = judge(&[], &[]);
        assert_eq!(
            judge.filter_addrs(Some("mixed.example"), &[ip("127.0.0.1"), ip("203.0.113.9")]),
            Ok(vec![ip("203.0.113.9")])
        );
    }

    #[test]
    fn invalid_rule_names_the_value() {
        let error = NetworkPolicy::rules(&["exa mple.com"], &[]).unwrap_err();
        assert!(error.to_string().contains("`exa mple.com`"), "{error}");
    }

    #[test]
    fn policy_round_trips_through_json() {
        let policy =
            NetworkPolicy::rules(&["*.github.com", "10.0.0.0/8"], &["evil.example"]).unwrap();
        let json = serde_json::to_string(&policy).unwrap();
        assert!(json.contains("\"*.github.com\""), "{json}");
        let back: NetworkPolicy = serde_json::from_str(&json).unwrap();
        assert_eq!(back, policy);
        let off: NetworkPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(off, NetworkPolicy::off());
    }

    #[test]
    fn host_addresses_include_loopback() {
        assert!(host_addresses().contains(&ip("127.0.0.1")));
    }
}

//! Network options of commands that start sandboxes.

use clap::{Args, ValueEnum};
use upstream_vmm::{NetworkLimits, NetworkPolicy, PortForward, Sandbox};

/// Outbound access and published ports of the sandbox.
#[derive(Args, Clone, Debug, Default)]
pub struct NetworkArgs {
    /// Outbound network access: off (no network device) or on (internet
    /// through upstream's proxy; the host and private ranges stay closed).
    #[arg(long, value_enum, value_name = "MODE")]
    network: Option<NetworkMode>,
    /// Allow only these destinations: a host name, *.domain, an IP address or
    /// a CIDR range; repeatable. Implies --network on.
    #[arg(long, value_name = "DEST")]
    allow: Vec<String>,
    /// Deny a destination, even when allowed; repeatable. Implies --network on.
    #[arg(long, value_name = "DEST")]
    deny: Vec<String>,
    /// Publish a guest port on 127.0.0.1 as GUEST_PORT or HOST_PORT:GUEST_PORT;
    /// repeatable.
    #[arg(long, value_name = "[HOST:]GUEST")]
    publish: Vec<PortForward>,
    /// Maximum number of open outbound connections.
    #[arg(long, value_name = "N", default_value_t = NetworkLimits::default().max_connections)]
    max_connections: u32,
    /// Limit outbound traffic in bytes per second, both directions together;
    /// suffixes k, m and g multiply by 1024 (default: no limit).
    #[arg(long, value_name = "BYTES", value_parser = parse_rate)]
    bandwidth: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum NetworkMode {
    Off,
    On,
}

impl NetworkArgs {
    /// The policy these options describe.
    pub fn policy(&self) -> anyhow::Result<NetworkPolicy> {
        let rules = !self.allow.is_empty() || !self.deny.is_empty();
        if rules && self.network == Some(NetworkMode::Off) {
            anyhow::bail!(
                "--allow and --deny need network access, but --network is off; \
                 remove --network off or the rules"
            );
        }
        let mut policy = match self.network {
            _ if rules => NetworkPolicy::rules(&self.allow, &self.deny)?,
            Some(NetworkMode::On) => NetworkPolicy::internet(),
            Some(NetworkMode::Off) | None => NetworkPolicy::off(),
        };
        if self.max_connections == 0 {
            anyhow::bail!("--max-connections 0 would block every connection; give 1 or more");
        }
        policy.limits = NetworkLimits {
            max_connections: self.max_connections,
            bandwidth: self.bandwidth,
        };
        Ok(policy)
    }

    pub fn publish(&self) -> Vec<PortForward> {
        self.publish.clone()
    }
}

fn parse_rate(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let (digits, factor) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        _ => (lower.as_str(), 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| format!("invalid rate '{text}'; give bytes per second, such as 500k or 10m"))
}

/// Prints where each published port can be reached, on stderr.
pub fn print_published(sandbox: &Sandbox) {
    for port in sandbox.published_ports() {
        note!(
            "upstream: guest port {} is published at http://{}",
            port.guest,
            port.host
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        network: NetworkArgs,
    }

    fn policy(args: &[&str]) -> anyhow::Result<NetworkPolicy> {
        let mut argv = vec!["test"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)?.network.policy()
    }

    #[test]
    fn network_is_off_by_default() {
        assert_eq!(policy(&[]).unwrap(), NetworkPolicy::off());
        assert!(policy(&["--network", "on"]).unwrap().egress);
    }

    #[test]
    fn rules_imply_network_on() {
        let policy = policy(&["--allow", "pypi.org", "--deny", "10.0.0.0/8"]).unwrap();
        assert!(policy.egress);
        assert_eq!(policy.allow.len(), 1);
        assert_eq!(policy.deny.len(), 1);
    }

    #[test]
    fn rules_with_network_off_are_rejected() {
        let error = policy(&["--network", "off", "--allow", "pypi.org"]).unwrap_err();
        assert!(error.to_string().contains("--network is off"), "{error}");
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(policy(&["--allow", "not a host"]).is_err());
        assert!(policy(&["--publish", "0"]).is_err());
        assert!(policy(&["--bandwidth", "fast"]).is_err());
        assert!(policy(&["--max-connections", "0", "--network", "on"]).is_err());
    }

    #[test]
    fn rate_suffixes_multiply() {
        assert_eq!(parse_rate("500k"), Ok(500 * 1024));
        assert_eq!(parse_rate("2M"), Ok(2 * 1024 * 1024));
        assert_eq!(parse_rate("1000"), Ok(1000));
    }
}

//! Sandbox networking: outbound access by policy through a host proxy, DNS
//! answered by that proxy, and guest ports published on the host.
//!
//! The guest never gets a path to the outside. Under QEMU its virtio-net
//! device is attached to slirp with `restrict=on`, which drops every packet
//! that does not belong to a forwarding rule. The rules (`guestfwd`) send
//! the guest's connections to [`SERVICE_ADDR`] on a few ports to the
//! sandbox's [`proxy`], which runs in the upstream process and applies the
//! [`NetworkPolicy`]. Published ports are slirp `hostfwd` rules bound to
//! 127.0.0.1. `docs/networking.md` describes the design and its limits.

mod accept;
mod chain;
mod dns;
mod limit;
mod policy;
mod proxy;
pub(crate) mod qemu;
mod rule;
mod sniff;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

pub use limit::NetworkStats;
pub use policy::{Denial, NetworkLimits, NetworkPolicy, PolicyError};
pub use rule::{Destination, IpNetwork};

use crate::{Error, Result};

/// The guest's address on its virtual network (slirp's default guest
/// address, 10.0.2.0/24).
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Prefix length of the guest's network.
pub const GUEST_PREFIX: u8 = 24;
/// The address where the guest finds the proxy, the DNS server and every
/// name it resolves. slirp forwards only its own address (10.0.2.2) and
/// DNS address (10.0.2.3) specially, so the service address is another.
pub const SERVICE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);
/// Port of the HTTP proxy that `HTTP_PROXY` and `HTTPS_PROXY` name.
pub const PROXY_PORT: u16 = 3128;
/// Port of the DNS server, over TCP only.
pub const DNS_PORT: u16 = 53;
/// Ports where a connection to a resolved name is routed by its TLS server
/// name or HTTP Host header.
pub const SNIFFED_PORTS: [u16; 4] = [80, 443, 8080, 8443];
/// A guest port to publish on the host's loopback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortForward {
    /// Port a server listens on inside the sandbox.
    pub guest: u16,
    /// Port on 127.0.0.1; a free one is chosen when `None`.
    #[serde(default)]
    pub host: Option<u16>,
}

impl std::str::FromStr for PortForward {
    type Err = String;

    /// Parses `GUEST` or `HOST:GUEST`, as `docker run -p` does.
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let port = |part: &str| {
            part.trim()
                .parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| {
                    format!(
                        "invalid port mapping `{text}`; write GUEST_PORT or HOST_PORT:GUEST_PORT \
                         with ports from 1 to 65535, such as 8000 or 9000:8000"
                    )
                })
        };
        match text.split_once(':') {
            Some((host, guest)) => Ok(Self {
                guest: port(guest)?,
                host: Some(port(host)?),
            }),
            None => Ok(Self {
                guest: port(text)?,
                host: None,
            }),
        }
    }
}

/// A guest port published on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublishedPort {
    pub guest: u16,
    /// Address on the host that clients connect to.
    pub host: SocketAddr,
}

/// Settings a backend needs to attach a network to a VM.
#[derive(Clone, Debug)]
pub struct VmNetwork {
    /// Whether the guest may reach the proxy. Without it, only published
    /// ports connect the guest to anything.
    pub egress: bool,
    /// Program that hands each guest connection to the proxy: the guest
    /// agent binary in its `net-relay` mode, run on the host.
    pub relay: PathBuf,
    /// The proxy's Unix socket.
    pub proxy_socket: PathBuf,
    pub published: Vec<PublishedPort>,
}

impl VmNetwork {
    /// Guest ports on [`SERVICE_ADDR`] that are forwarded to the proxy.
    pub fn forwarded_ports(&self) -> Vec<u16> {
        if !self.egress {
            return Vec::new();
        }
        let mut ports = vec![DNS_PORT, PROXY_PORT];
        ports.extend(SNIFFED_PORTS);
        ports
    }

    /// Command that relays one guest connection to `port`. libslirp 4.7
    /// splits it with shell quoting rules but runs no shell.
    pub fn relay_command(&self, port: u16) -> String {
        format!(
            "{} net-relay {} {port}",
            shell_quote(&self.relay),
            shell_quote(&self.proxy_socket)
        )
    }
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// The host side of one sandbox's network, alive as long as the sandbox.
pub(crate) struct SandboxNetwork {
    proxy: Option<proxy::Proxy>,
    published: Vec<PublishedPort>,
}

impl SandboxNetwork {
    pub fn published(&self) -> &[PublishedPort] {
        &self.published
    }

    pub fn stats(&self) -> NetworkStats {
        self.proxy
            .as_ref()
            .map(proxy::Proxy::stats)
            .unwrap_or_default()
    }
}

/// Everything [`prepare`] sets up for one sandbox; empty when the sandbox
/// gets no network interface at all.
#[derive(Default)]
pub(crate) struct Prepared {
    pub network: Option<SandboxNetwork>,
    pub vm: Option<VmNetwork>,
    pub kernel_args: Vec<String>,
    /// Proxy variables for the sandbox's environment.
    pub env: Vec<(String, String)>,
}

impl Prepared {
    /// Adds the proxy variables to `image_env`, replacing any the image
    /// sets: no other proxy is reachable from the sandbox.
    pub fn merge_env(&self, mut image_env: Vec<(String, String)>) -> Vec<(String, String)> {
        image_env.retain(|(key, _)| !self.env.iter().any(|(own, _)| own == key));
        image_env.extend(self.env.iter().cloned());
        image_env
    }
}

/// Starts the proxy for sandbox `id` and chooses host ports. A sandbox with
/// no egress and nothing published gets nothing.
pub(crate) fn prepare(
    id: &str,
    run_dir: &Path,
    policy: &NetworkPolicy,
    publish: &[PortForward],
    relay: &Path,
) -> Result<Prepared> {
    if !policy.egress && publish.is_empty() {
        return Ok(Prepared::default());
    }
    let published = publish
        .iter()
        .map(|forward| publish_port(*forward))
        .collect::<Result<Vec<_>>>()?;
    let proxy_socket = run_dir.join("net.sock");
    if proxy_socket.as_os_str().len() > 107 {
        return Err(Error::SocketPathTooLong(proxy_socket));
    }
    let proxy = if policy.egress {
        let proxy = proxy::Proxy::start(id, &proxy_socket, policy).map_err(Error::io(format!(
            "starting the network proxy on {}",
            proxy_socket.display()
        )))?;
        Some(proxy)
    } else {
        None
    };

    let mut kernel_args = vec![format!("upstream.net={GUEST_ADDR}/{GUEST_PREFIX}")];
    let mut env = Vec::new();
    if policy.egress {
        kernel_args.push(format!("upstream.dns={SERVICE_ADDR}"));
        let url = format!("http://{SERVICE_ADDR}:{PROXY_PORT}");
        for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            env.push((name.to_string(), url.clone()));
        }
        for name in ["NO_PROXY", "no_proxy"] {
            env.push((name.to_string(), "localhost,127.0.0.1,::1".to_string()));
        }
    }
    Ok(Prepared {
        network: Some(SandboxNetwork {
            proxy,
            published: published.clone(),
        }),
        vm: Some(VmNetwork {
            egress: policy.egress,
            relay: relay.to_path_buf(),
            proxy_socket,
            published,
        }),
        kernel_args,
        env,
    })
}

/// Picks the host port of a published port: the requested one if it is
/// free, else one the kernel assigns. The port is released again before
/// QEMU binds it, so another process could take it in between.
fn publish_port(forward: PortForward) -> Result<PublishedPort> {
    let requested = forward.host.unwrap_or(0);
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, requested)).map_err(|source| Error::Io {
            context: format!(
                "Host port {requested} for guest port {} is not free; publish it on another \
                 port or leave the host port out",
                forward.guest
            ),
            source,
        })?;
    let host = listener
        .local_addr()
        .map_err(Error::io("reading a free host port"))?;
    Ok(PublishedPort {
        guest: forward.guest,
        host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_forward_parses() {
        let forward: PortForward = "8000".parse().unwrap();
        assert_eq!(
            forward,
            PortForward {
                guest: 8000,
                host: None
            }
        );
        let forward: PortForward = "9000:8000".parse().unwrap();
        assert_eq!(
            forward,
            PortForward {
                guest: 8000,
                host: Some(9000)
            }
        );
        for text in ["0", "x", "70000", "1:2:3", ":80"] {
            assert!(text.parse::<PortForward>().is_err(), "{text}");
        }
    }

    #[test]
    fn network_off_attaches_nothing() {
        let dir = std::env::temp_dir();
        let prepared = prepare(
            "sb-x",
            &dir,
            &NetworkPolicy::off(),
            &[],
            Path::new("/relay"),
        )
        .unwrap();
        assert!(prepared.vm.is_none());
        assert!(prepared.kernel_args.is_empty());
    }

    #[tokio::test]
    async fn internet_policy_sets_proxy_environment() {
        let dir = tempfile::tempdir().unwrap();
        let prepared = prepare(
            "sb-x",
            dir.path(),
            &NetworkPolicy::internet(),
            &[],
            Path::new("/relay"),
        )
        .unwrap();
        assert!(prepared
            .env
            .contains(&("https_proxy".into(), "http://10.0.2.100:3128".into())));
        assert!(prepared
            .kernel_args
            .contains(&"upstream.dns=10.0.2.100".to_string()));
        let vm = prepared.vm.as_ref().unwrap();
        assert!(vm.forwarded_ports().contains(&443));
        assert!(dir.path().join("net.sock").exists());
        let env = prepared.merge_env(vec![("HTTP_PROXY".into(), "http://elsewhere".into())]);
        let proxies: Vec<_> = env.iter().filter(|(key, _)| key == "HTTP_PROXY").collect();
        assert_eq!(proxies.len(), 1);
        assert_eq!(proxies[0].1, "http://10.0.2.100:3128");
    }

    #[test]
    fn publish_only_has_no_egress() {
        let dir = tempfile::tempdir().unwrap();
        let forward = PortForward {
            guest: 8000,
            host: None,
        };
        let prepared = prepare(
            "sb-x",
            dir.path(),
            &NetworkPolicy::off(),
            &[forward],
            Path::new("/relay"),
        )
        .unwrap();
        assert!(prepared.env.is_empty());
        assert!(prepared.vm.unwrap().forwarded_ports().is_empty());
        let published = prepared.network.unwrap().published()[0];
        assert_eq!(published.guest, 8000);
        assert!(published.host.ip().is_loopback());
        assert_ne!(published.host.port(), 0);
    }

    #[test]
    fn relay_command_quotes_paths() {
        let vm = VmNetwork {
            egress: true,
            relay: PathBuf::from("/opt/it's/upstream-agent"),
            proxy_socket: PathBuf::from("/run/sb/net.sock"),
            published: Vec::new(),
        };
        assert_eq!(
            vm.relay_command(443),
            r"'/opt/it'\''s/upstream-agent' net-relay '/run/sb/net.sock' 443"
        );
    }
}

//! Sandbox networking: outbound access by policy through a host proxy, DNS
//! answered by that proxy, and guest ports published on the host.
//!
//! The guest never gets a path to the outside. Its connections to
//! [`SERVICE_ADDR`] on a few ports reach the sandbox's [`proxy`], which
//! runs in the upstream process and applies the [`NetworkPolicy`]; nothing
//! else it sends goes anywhere. Under QEMU the virtio-net device is
//! attached to slirp with `restrict=on`, which drops every packet that does
//! not belong to a forwarding rule: `guestfwd` rules for the proxy ports
//! and `hostfwd` rules on 127.0.0.1 for published ports. Under Firecracker
//! the device is a tap in a network namespace of the sandbox's own
//! ([`tap`]), where the proxy listens on the tap's address and published
//! ports are relayed from host listeners ([`forward`]).
//! `docs/networking.md` describes the design and its limits.

mod accept;
mod chain;
mod dns;
mod forward;
mod limit;
pub mod netns;
mod policy;
mod proxy;
pub(crate) mod qemu;
mod rule;
mod sniff;
pub mod tap;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

pub use limit::NetworkStats;
pub use netns::NetworkNamespace;
pub use policy::{Denial, NetworkLimits, NetworkPolicy, PolicyError};
pub use rule::{Destination, IpNetwork};
pub use tap::{TapDevice, TapNetwork};

use crate::backend::Backend;
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

/// The kind of connection between the guest's network device and the
/// host, chosen by the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// QEMU's user-mode network (slirp), which runs a relay per forwarded
    /// connection.
    Slirp,
    /// A tap device in a network namespace of the sandbox's own. `owner` is
    /// the user and group id that may open the tap besides root.
    Tap { owner: Option<(u32, u32)> },
}

/// Settings a backend needs to attach a network to a VM.
#[derive(Clone, Debug)]
pub struct VmNetwork {
    /// Whether the guest may reach the proxy. Without it, only published
    /// ports connect the guest to anything.
    pub egress: bool,
    pub published: Vec<PublishedPort>,
    /// The policy's limit in bytes per second, both directions together,
    /// for a VMM that can also limit the device.
    pub bandwidth: Option<u64>,
    pub link: GuestLink,
}

/// The host end of the guest's network device, by [`Attachment`].
#[derive(Clone, Debug)]
pub enum GuestLink {
    Slirp(SlirpRelay),
    Tap(TapDevice),
}

/// The relay that slirp runs to hand a guest connection to the proxy.
#[derive(Clone, Debug)]
pub struct SlirpRelay {
    /// Program that hands each guest connection to the proxy: the guest
    /// agent binary in its `net-relay` mode, run on the host.
    pub relay: PathBuf,
    /// The proxy's Unix socket.
    pub proxy_socket: PathBuf,
}

impl SlirpRelay {
    /// Command that relays one guest connection to `port`. libslirp 4.7
    /// splits it with shell quoting rules but runs no shell.
    pub fn command(&self, port: u16) -> String {
        format!(
            "{} net-relay {} {port}",
            shell_quote(&self.relay),
            shell_quote(&self.proxy_socket)
        )
    }
}

impl VmNetwork {
    /// Guest ports on [`SERVICE_ADDR`] that are forwarded to the proxy.
    pub fn forwarded_ports(&self) -> Vec<u16> {
        service_ports(self.egress)
    }
}

/// Ports on [`SERVICE_ADDR`] that reach the proxy: none without egress.
fn service_ports(egress: bool) -> Vec<u16> {
    if !egress {
        return Vec::new();
    }
    let mut ports = vec![DNS_PORT, PROXY_PORT];
    ports.extend(SNIFFED_PORTS);
    ports
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// The host side of one sandbox's network, alive as long as the sandbox.
/// Fields drop in declaration order, so the proxy and the published ports
/// close their sockets before the namespace is removed.
pub struct SandboxNetwork {
    proxy: Option<proxy::Proxy>,
    published: Vec<PublishedPort>,
    /// Held for their `Drop`, which closes the published ports.
    _forwarders: Vec<forward::Forwarder>,
    tap: Option<TapNetwork>,
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

    /// Returns the sandbox's namespace and tap under [`Attachment::Tap`].
    pub fn tap(&self) -> Option<&TapNetwork> {
        self.tap.as_ref()
    }
}

/// Everything [`prepare`] sets up for one sandbox; empty when the sandbox
/// gets no network interface at all.
#[derive(Default)]
pub struct Prepared {
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

/// Sets up the host side of sandbox `id`'s network the way `backend`
/// attaches it: starts the proxy and publishes ports. A sandbox with no
/// egress and nothing published gets nothing. `relay` is the guest agent
/// binary that slirp runs per connection.
pub fn prepare(
    id: &str,
    run_dir: &Path,
    policy: &NetworkPolicy,
    publish: &[PortForward],
    backend: &dyn Backend,
    relay: &Path,
) -> Result<Prepared> {
    if !policy.egress && publish.is_empty() {
        return Ok(Prepared::default());
    }
    let (network, link) = match backend.network_attachment()? {
        Attachment::Slirp => prepare_slirp(id, run_dir, policy, publish, relay)?,
        Attachment::Tap { owner } => prepare_tap(id, policy, publish, owner)?,
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
    let vm = VmNetwork {
        egress: policy.egress,
        published: network.published.clone(),
        bandwidth: policy.limits.bandwidth.filter(|_| policy.egress),
        link,
    };
    Ok(Prepared {
        network: Some(network),
        vm: Some(vm),
        kernel_args,
        env,
    })
}

/// Starts the proxy on a Unix socket for relays and picks host ports for
/// slirp's `hostfwd` rules.
fn prepare_slirp(
    id: &str,
    run_dir: &Path,
    policy: &NetworkPolicy,
    publish: &[PortForward],
    relay: &Path,
) -> Result<(SandboxNetwork, GuestLink)> {
    // QEMU binds the published ports itself.
    let published = publish
        .iter()
        .map(|forward| bind_published(*forward).map(|(_, published)| published))
        .collect::<Result<Vec<_>>>()?;
    let proxy_socket = run_dir.join("net.sock");
    if proxy_socket.as_os_str().len() > 107 {
        return Err(Error::SocketPathTooLong(proxy_socket));
    }
    let proxy = if policy.egress {
        let intake = proxy::Intake::Relay(proxy_socket.clone());
        let proxy = proxy::Proxy::start(id, intake, policy).map_err(Error::io(format!(
            "starting the network proxy on {}",
            proxy_socket.display()
        )))?;
        Some(proxy)
    } else {
        None
    };
    let network = SandboxNetwork {
        proxy,
        published,
        _forwarders: Vec::new(),
        tap: None,
    };
    let link = GuestLink::Slirp(SlirpRelay {
        relay: relay.to_path_buf(),
        proxy_socket,
    });
    Ok((network, link))
}

/// Creates the sandbox's namespace and tap, starts the proxy on listeners
/// inside it and serves the published ports from host listeners.
fn prepare_tap(
    id: &str,
    policy: &NetworkPolicy,
    publish: &[PortForward],
    owner: Option<(u32, u32)>,
) -> Result<(SandboxNetwork, GuestLink)> {
    let tap = TapNetwork::create(id, owner).map_err(Error::io(format!(
        "creating the network namespace {} with a tap device",
        netns::path_of(id).display()
    )))?;
    let proxy = if policy.egress {
        let ports = service_ports(true);
        let listeners = tap.listen(&ports).map_err(Error::io(format!(
            "opening the network proxy's listeners on {SERVICE_ADDR} in {}",
            tap.namespace().path().display()
        )))?;
        let intake = proxy::Intake::Listeners(listeners);
        let proxy = proxy::Proxy::start(id, intake, policy)
            .map_err(Error::io("starting the network proxy"))?;
        Some(proxy)
    } else {
        None
    };
    let mut published = Vec::new();
    let mut forwarders = Vec::new();
    for forward in publish {
        let (listener, port) = bind_published(*forward)?;
        let forwarder = forward::Forwarder::start(listener, tap.namespace().clone(), port.guest)
            .map_err(Error::io(format!("publishing guest port {}", port.guest)))?;
        published.push(port);
        forwarders.push(forwarder);
    }
    let link = GuestLink::Tap(tap.device());
    let network = SandboxNetwork {
        proxy,
        published,
        _forwarders: forwarders,
        tap: Some(tap),
    };
    Ok((network, link))
}

/// Binds the host port of a published port on 127.0.0.1: the requested one
/// if it is free, else one the kernel assigns. QEMU binds the port itself,
/// so under slirp the listener is closed again, and another process could
/// take the port in between.
fn bind_published(forward: PortForward) -> Result<(TcpListener, PublishedPort)> {
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
    let published = PublishedPort {
        guest: forward.guest,
        host,
    };
    Ok((listener, published))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostInfo;
    use crate::qemu::QemuBackend;

    /// Returns a backend that attaches networks through slirp. It is never
    /// started.
    fn slirp_backend() -> QemuBackend {
        QemuBackend::new(PathBuf::from("/nonexistent/qemu"), HostInfo::detect())
    }

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
            &slirp_backend(),
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
            &slirp_backend(),
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
            &slirp_backend(),
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
        let relay = SlirpRelay {
            relay: PathBuf::from("/opt/it's/upstream-agent"),
            proxy_socket: PathBuf::from("/run/sb/net.sock"),
        };
        assert_eq!(
            relay.command(443),
            r"'/opt/it'\''s/upstream-agent' net-relay '/run/sb/net.sock' 443"
        );
    }
}

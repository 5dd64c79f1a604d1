//! QEMU's side of a sandbox network: a virtio-net device on slirp with
//! `restrict=on`, so the guest reaches only the forwarding rules below.

use super::{GuestLink, VmNetwork, GUEST_ADDR, GUEST_PREFIX, SERVICE_ADDR};

/// The `-netdev` and `-device` arguments for `network`.
///
/// `restrict=on` makes slirp drop every guest packet that matches no
/// `guestfwd` rule, including those to the host's loopback through the
/// gateway address 10.0.2.2 and its UDP DNS forwarder. Each `guestfwd`
/// runs the relay per connection (the `cmd:` form), because QEMU 7.2's
/// chardev form carries one connection at a time. `hostfwd` rules bind the
/// published ports to 127.0.0.1 only.
pub(crate) fn netdev_args(network: &VmNetwork) -> Vec<String> {
    let mut netdev = format!(
        "user,id=net0,restrict=on,ipv6=off,net=10.0.2.0/{GUEST_PREFIX},host=10.0.2.2,dns=10.0.2.3"
    );
    // `prepare` builds a slirp link for QEMU, because its backend requests one.
    // Without it no guest connection is forwarded out.
    if let GuestLink::Slirp(relay) = &network.link {
        for port in network.forwarded_ports() {
            let command = escape_commas(&relay.command(port));
            netdev.push_str(&format!(
                ",guestfwd=tcp:{SERVICE_ADDR}:{port}-cmd:{command}"
            ));
        }
    }
    for published in &network.published {
        netdev.push_str(&format!(
            ",hostfwd=tcp:{}:{}-{GUEST_ADDR}:{}",
            published.host.ip(),
            published.host.port(),
            published.guest
        ));
    }
    vec![
        "-netdev".into(),
        netdev,
        "-device".into(),
        "virtio-net-device,netdev=net0".into(),
    ]
}

/// QEMU option values write a comma as two.
fn escape_commas(text: &str) -> String {
    text.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::net::{PublishedPort, SlirpRelay};

    fn slirp(relay: &str, proxy_socket: &str) -> GuestLink {
        GuestLink::Slirp(SlirpRelay {
            relay: PathBuf::from(relay),
            proxy_socket: PathBuf::from(proxy_socket),
        })
    }

    #[test]
    fn netdev_restricts_and_forwards() {
        let network = VmNetwork {
            egress: true,
            published: vec![PublishedPort {
                guest: 8000,
                host: "127.0.0.1:40000".parse().unwrap(),
            }],
            bandwidth: None,
            link: slirp("/a,b/upstream-agent", "/run/sb/net.sock"),
        };
        let args = netdev_args(&network);
        let netdev = &args[1];
        assert!(netdev.starts_with("user,id=net0,restrict=on,"), "{netdev}");
        assert!(netdev.contains(
            ",guestfwd=tcp:10.0.2.100:443-cmd:'/a,,b/upstream-agent' net-relay '/run/sb/net.sock' 443"
        ), "{netdev}");
        assert!(
            netdev.ends_with(",hostfwd=tcp:127.0.0.1:40000-10.0.2.15:8000"),
            "{netdev}"
        );
        assert_eq!(args[3], "virtio-net-device,netdev=net0");
    }

    #[test]
    fn publish_only_forwards_nothing_out() {
        let network = VmNetwork {
            egress: false,
            published: Vec::new(),
            bandwidth: None,
            link: slirp("/relay", "/net.sock"),
        };
        assert!(!netdev_args(&network)[1].contains("guestfwd"));
    }
}

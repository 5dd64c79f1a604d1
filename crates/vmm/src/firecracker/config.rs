//! The API requests that configure, start, pause and snapshot a microVM.
//!
//! Bodies follow the schema of Firecracker's `firecracker.yaml` (v1.16.1,
//! kept in `tests/data/`), whose unit tests here check every body. Paths in
//! bodies are relative to the VMM's working directory (see
//! [`super::layout`]), so a snapshot taken in one sandbox's folder loads in
//! another's.

use serde::Serialize;

use super::api::ApiRequest;

/// The guest's vsock context id. CIDs 0 to 2 are reserved (2 is the host),
/// so 3 is the first a guest can have. Every VM has its own vsock device,
/// so all guests can use the same CID.
pub const GUEST_CID: u32 = 3;

/// Names of the files in the VMM's working directory.
pub mod names {
    pub const API_SOCKET: &str = "fc.sock";
    /// Firecracker listens here for host-initiated vsock connections.
    pub const VSOCK: &str = "v.sock";
    pub const KERNEL: &str = "kernel";
    pub const INITRD: &str = "initrd";
    pub const ROOT_DISK: &str = "root-disk";
    pub const SCRATCH_DISK: &str = "scratch-disk";
    pub const SNAPSHOT_STATE: &str = "snapshot-vmstate";
    pub const SNAPSHOT_MEMORY: &str = "snapshot-memory";
}

/// Returns the name of the Unix socket on which the host accepts the
/// guest's connections to vsock `port`. Firecracker forwards them to
/// `<uds_path>_<port>`.
pub fn vsock_listener_name(port: u32) -> String {
    format!("{}_{port}", names::VSOCK)
}

/// I/O limits that Firecracker enforces per device with token buckets.
/// `None` leaves that dimension unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// Disk throughput of each drive, in bytes per second.
    pub disk_bytes_per_sec: Option<u64>,
    /// Disk requests of each drive per second.
    pub disk_ops_per_sec: Option<u64>,
    /// Random bytes per second that the guest can draw from the entropy
    /// device.
    pub entropy_bytes_per_sec: Option<u64>,
}

impl RateLimits {
    fn disk(&self) -> Option<RateLimiter> {
        RateLimiter::new(self.disk_bytes_per_sec, self.disk_ops_per_sec)
    }

    fn entropy(&self) -> Option<RateLimiter> {
        RateLimiter::new(self.entropy_bytes_per_sec, None)
    }
}

/// The settings the boot requests are built from.
#[derive(Clone, Debug)]
pub struct BootConfig {
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Kernel parameters beyond the backend's own.
    pub kernel_args: Vec<String>,
    pub limits: RateLimits,
    /// The guest's network interface; `None` attaches none.
    pub network: Option<NetworkConfig>,
}

/// The guest's network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The tap device, by its name in the VMM's network namespace.
    pub tap_name: String,
    pub guest_mac: String,
    /// The sandbox's bandwidth limit in bytes per second, both directions
    /// together, or `None` for no limit.
    pub bandwidth: Option<u64>,
}

impl NetworkConfig {
    /// Returns the token bucket for each direction of the tap.
    ///
    /// The proxy enforces the sandbox's limit on payload bytes. This one
    /// bounds whole frames, so the guest cannot flood the host's network
    /// stack with packets that never reach the proxy. A full-size TCP
    /// frame carries 66 bytes of Ethernet, IP and TCP headers per 1448
    /// bytes of payload (4.6%). The bucket is 1/16 (6.25%) larger, so the
    /// proxy, not the tap, slows down a bulk transfer. Small packets carry
    /// more header per byte and reach this limit sooner.
    fn rate_limiter(&self) -> Option<RateLimiter> {
        let frames_per_sec = self.bandwidth.map(|rate| rate.saturating_add(rate / 16));
        RateLimiter::new(frames_per_sec, None)
    }
}

#[derive(Serialize)]
pub struct Logger {
    pub level: &'static str,
    pub show_level: bool,
}

#[derive(Serialize)]
pub struct MachineConfig {
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
}

#[derive(Serialize)]
pub struct BootSource {
    pub kernel_image_path: String,
    pub initrd_path: String,
    pub boot_args: String,
}

#[derive(Serialize)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

#[derive(Serialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    pub guest_mac: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

#[derive(Serialize)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: String,
}

#[derive(Serialize)]
pub struct EntropyDevice {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

#[derive(Clone, Copy, Serialize)]
pub struct RateLimiter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

impl RateLimiter {
    fn new(bytes_per_sec: Option<u64>, ops_per_sec: Option<u64>) -> Option<Self> {
        if bytes_per_sec.is_none() && ops_per_sec.is_none() {
            return None;
        }
        Some(Self {
            bandwidth: bytes_per_sec.map(TokenBucket::per_second),
            ops: ops_per_sec.map(TokenBucket::per_second),
        })
    }
}

/// A bucket of `size` tokens refilled every `refill_time` milliseconds.
#[derive(Clone, Copy, Serialize)]
pub struct TokenBucket {
    pub size: u64,
    pub refill_time: u64,
}

impl TokenBucket {
    fn per_second(rate: u64) -> Self {
        Self {
            size: rate,
            refill_time: 1000,
        }
    }
}

#[derive(Serialize)]
pub struct InstanceAction {
    pub action_type: &'static str,
}

#[derive(Serialize)]
pub struct VmState {
    pub state: &'static str,
}

#[derive(Serialize)]
pub struct SnapshotCreate {
    pub snapshot_path: String,
    pub mem_file_path: String,
    pub snapshot_type: &'static str,
}

#[derive(Serialize)]
pub struct SnapshotLoad {
    pub snapshot_path: String,
    pub mem_backend: MemoryBackend,
    pub resume_vm: bool,
}

#[derive(Serialize)]
pub struct MemoryBackend {
    pub backend_type: &'static str,
    pub backend_path: String,
}

/// Firecracker's log goes to its standard output, mixed into the console
/// buffer, so only warnings and errors are kept.
pub fn logger() -> ApiRequest {
    ApiRequest::put(
        "/logger",
        &Logger {
            level: "Warning",
            show_level: true,
        },
    )
}

/// The guest kernel's command line.
///
/// `reboot=k` makes a guest reboot go through the i8042 keyboard
/// controller, whose reset line ends the Firecracker process (v1.16.1,
/// `devices/legacy/i8042.rs`). `panic=1` turns a panic into such a reboot
/// after a second. Firecracker has no PCI bus, so `pci=off` skips probing
/// it. The disks are named by device path because Firecracker's virtio-blk
/// reports no serial numbers; the drives are attached, and so named by the
/// guest, in the order they are configured.
pub fn kernel_cmdline(config: &BootConfig) -> String {
    let mut args: Vec<String> = [
        "console=ttyS0",
        "reboot=k",
        "panic=1",
        "pci=off",
        "quiet",
        "loglevel=1",
        "no_timer_check",
        "random.trust_cpu=on",
        "rdinit=/upstream-agent",
        "upstream.channel=vsock",
        "upstream.root=/dev/vda",
        "upstream.scratch=/dev/vdb",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    args.push(format!("upstream.hostname={}", config.id));
    args.extend(config.kernel_args.iter().cloned());
    args.join(" ")
}

/// Builds the requests that configure a fresh VMM, in order, ending with
/// `InstanceStart`.
///
/// Both disks are attached with `is_root_device: false`: the kernel runs
/// the agent from the initramfs, and the agent mounts the image root and
/// the scratch disk itself, so Firecracker must not add a `root=` argument
/// for the kernel to act on.
pub fn boot_requests(config: &BootConfig) -> Vec<ApiRequest> {
    let disk_limits = config.limits.disk();
    let drive = |id: &str, path: &str, read_only: bool| {
        ApiRequest::put(
            format!("/drives/{id}"),
            &Drive {
                drive_id: id.to_string(),
                path_on_host: path.to_string(),
                is_root_device: false,
                is_read_only: read_only,
                rate_limiter: disk_limits,
            },
        )
    };
    let mut requests = vec![
        logger(),
        ApiRequest::put(
            "/machine-config",
            &MachineConfig {
                vcpu_count: config.vcpus,
                mem_size_mib: config.memory_mib,
            },
        ),
        ApiRequest::put(
            "/boot-source",
            &BootSource {
                kernel_image_path: names::KERNEL.into(),
                initrd_path: names::INITRD.into(),
                boot_args: kernel_cmdline(config),
            },
        ),
        // The order fixes the guest's names: rootfs is /dev/vda, scratch
        // is /dev/vdb.
        drive("rootfs", names::ROOT_DISK, true),
        drive("scratch", names::SCRATCH_DISK, false),
    ];
    if let Some(network) = &config.network {
        requests.push(network_interface(network));
    }
    requests.extend([
        ApiRequest::put(
            "/vsock",
            &Vsock {
                guest_cid: GUEST_CID,
                uds_path: names::VSOCK.into(),
            },
        ),
        ApiRequest::put(
            "/entropy",
            &EntropyDevice {
                rate_limiter: config.limits.entropy(),
            },
        ),
        start(),
    ]);
    requests
}

/// Attaches the guest's `eth0` to the tap device. Firecracker opens the
/// tap by name in its own network namespace.
pub fn network_interface(network: &NetworkConfig) -> ApiRequest {
    let id = "eth0";
    let limiter = network.rate_limiter();
    ApiRequest::put(
        format!("/network-interfaces/{id}"),
        &NetworkInterface {
            iface_id: id.to_string(),
            host_dev_name: network.tap_name.clone(),
            guest_mac: network.guest_mac.clone(),
            rx_rate_limiter: limiter,
            tx_rate_limiter: limiter,
        },
    )
}

pub fn start() -> ApiRequest {
    ApiRequest::put(
        "/actions",
        &InstanceAction {
            action_type: "InstanceStart",
        },
    )
}

pub fn pause() -> ApiRequest {
    ApiRequest::patch("/vm", &VmState { state: "Paused" })
}

/// Requests a full snapshot: the device state and a copy of all guest
/// memory.
pub fn snapshot_create() -> ApiRequest {
    ApiRequest::put(
        "/snapshot/create",
        &SnapshotCreate {
            snapshot_path: names::SNAPSHOT_STATE.into(),
            mem_file_path: names::SNAPSHOT_MEMORY.into(),
            snapshot_type: "Full",
        },
    )
}

/// Loads a snapshot and resumes the guest. With the `File` backend
/// Firecracker maps the memory file privately, so pages are read on first
/// touch and copied only when the guest writes them, and the file itself
/// never changes.
pub fn snapshot_load() -> ApiRequest {
    ApiRequest::put(
        "/snapshot/load",
        &SnapshotLoad {
            snapshot_path: names::SNAPSHOT_STATE.into(),
            mem_backend: MemoryBackend {
                backend_type: "File",
                backend_path: names::SNAPSHOT_MEMORY.into(),
            },
            resume_vm: true,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BootConfig {
        BootConfig {
            id: "sb-0123456789ab".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel_args: vec!["extra=1".into()],
            limits: RateLimits::default(),
            network: None,
        }
    }

    fn network(bandwidth: Option<u64>) -> NetworkConfig {
        NetworkConfig {
            tap_name: "tap0".into(),
            guest_mac: "06:00:0a:00:02:0f".into(),
            bandwidth,
        }
    }

    #[test]
    fn cmdline_names_channel_and_disks() {
        let cmdline = kernel_cmdline(&config());
        let words: Vec<&str> = cmdline.split(' ').collect();

        for expected in [
            "console=ttyS0",
            "reboot=k",
            "panic=1",
            "pci=off",
            "rdinit=/upstream-agent",
            "upstream.channel=vsock",
            "upstream.root=/dev/vda",
            "upstream.scratch=/dev/vdb",
            "upstream.hostname=sb-0123456789ab",
        ] {
            assert!(
                words.contains(&expected),
                "{expected} missing from {cmdline}"
            );
        }
        assert_eq!(words.last(), Some(&"extra=1"));
    }

    #[test]
    fn boot_requests_end_with_start() {
        let requests = boot_requests(&config());
        let paths: Vec<String> = requests.iter().map(ApiRequest::describe).collect();

        assert_eq!(
            paths,
            [
                "PUT /logger",
                "PUT /machine-config",
                "PUT /boot-source",
                "PUT /drives/rootfs",
                "PUT /drives/scratch",
                "PUT /vsock",
                "PUT /entropy",
                "PUT /actions",
            ]
        );
    }

    #[test]
    fn root_drive_is_read_only() {
        let requests = boot_requests(&config());
        let root = requests[3].body.as_ref().unwrap();
        let scratch = requests[4].body.as_ref().unwrap();

        assert_eq!(root["is_read_only"], true);
        assert_eq!(root["is_root_device"], false);
        assert_eq!(scratch["is_read_only"], false);
        assert_eq!(scratch["is_root_device"], false);
        assert!(root.get("rate_limiter").is_none());
    }

    #[test]
    fn rate_limits_reach_drives_and_entropy() {
        let mut config = config();
        config.limits = RateLimits {
            disk_bytes_per_sec: Some(50 << 20),
            disk_ops_per_sec: Some(1000),
            entropy_bytes_per_sec: Some(4096),
        };
        let requests = boot_requests(&config);
        let scratch = requests[4].body.as_ref().unwrap();
        let entropy = requests[6].body.as_ref().unwrap();

        assert_eq!(scratch["rate_limiter"]["bandwidth"]["size"], 50 << 20);
        assert_eq!(scratch["rate_limiter"]["bandwidth"]["refill_time"], 1000);
        assert_eq!(scratch["rate_limiter"]["ops"]["size"], 1000);
        assert_eq!(entropy["rate_limiter"]["bandwidth"]["size"], 4096);
        assert!(entropy["rate_limiter"].get("ops").is_none());
    }

    #[test]
    fn network_interface_follows_drives() {
        let mut config = config();
        config.network = Some(network(None));
        let requests = boot_requests(&config);
        let paths: Vec<String> = requests.iter().map(ApiRequest::describe).collect();
        let body = requests[5].body.as_ref().unwrap();

        assert_eq!(paths[5], "PUT /network-interfaces/eth0");
        assert_eq!(paths.last().unwrap(), "PUT /actions");
        assert_eq!(body["iface_id"], "eth0");
        assert_eq!(body["host_dev_name"], "tap0");
        assert_eq!(body["guest_mac"], "06:00:0a:00:02:0f");
        assert!(body.get("rx_rate_limiter").is_none());
        assert!(body.get("tx_rate_limiter").is_none());
    }

    #[test]
    fn bandwidth_limits_both_tap_directions() {
        let request = network_interface(&network(Some(1_600_000)));
        let body = request.body.as_ref().unwrap();

        for direction in ["rx_rate_limiter", "tx_rate_limiter"] {
            assert_eq!(
                body[direction]["bandwidth"]["size"], 1_700_000,
                "{direction}"
            );
            assert_eq!(
                body[direction]["bandwidth"]["refill_time"], 1000,
                "{direction}"
            );
            assert!(body[direction].get("ops").is_none(), "{direction}");
        }
    }
}

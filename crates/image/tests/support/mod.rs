//! Test support: a real `docker-registry` on loopback, layer and image builders, and
//! readers for the ext4 images the store produces.

#![allow(dead_code)]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::OciImageManifest;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use upstream_image::PullProgress;

pub const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";

/// A `docker-registry` process on 127.0.0.1, killed by PID on drop.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub auth: RegistryAuth,
}

/// Returns `None`, after printing why, when the registry binary is missing.
pub fn start_registry() -> Option<Registry> {
    start_registry_with_user(None)
}

/// Starts a registry; with `user` it requires HTTP basic auth with that user and password.
pub fn start_registry_with_user(user: Option<(&str, &str)>) -> Option<Registry> {
    if !Path::new(REGISTRY_BINARY).exists() {
        eprintln!("skipped: {REGISTRY_BINARY} is not installed (apt-get install docker-registry)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut config = format!(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
         http:\n  addr: 127.0.0.1:{port}\n",
        dir.path().join("data").display()
    );
    let mut auth = RegistryAuth::Anonymous;
    if let Some((name, password)) = user {
        let hash = bcrypt::hash(password, 4).unwrap();
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, format!("{name}:{hash}\n")).unwrap();
        config.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
            htpasswd.display()
        ));
        auth = RegistryAuth::Basic(name.to_string(), password.to_string());
    }
    let config_path = dir.path().join("config.yml");
    std::fs::write(&config_path, config).unwrap();
    let child = Command::new(REGISTRY_BINARY)
        .arg("serve")
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry starts");
    let registry = Registry {
        child,
        port,
        dir,
        auth,
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "docker-registry did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(registry)
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn reference(&self, name: &str) -> String {
        format!("{}/{name}", self.host())
    }

    /// Path of a blob's data in the registry's filesystem storage.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn client(&self) -> Client {
        Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..ClientConfig::default()
        })
    }

    /// Pushes an image and returns its manifest digest.
    pub async fn push(&self, name: &str, image: &TestImage) -> String {
        let reference: Reference = self.reference(name).parse().unwrap();
        let client = self.client();
        let layers: Vec<ImageLayer> = image
            .layers
            .iter()
            .map(|layer| ImageLayer::new(layer.blob.clone(), layer.media_type.clone(), None))
            .collect();
        let config = Config::oci_v1(image.config_json(), None);
        let manifest = OciImageManifest::build(&layers, &config, None);
        client
            .push(&reference, &layers, config, &self.auth, Some(manifest))
            .await
            .expect("push test image");
        client
            .fetch_manifest_digest(&reference, &self.auth)
            .await
            .expect("manifest digest")
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// How a test layer is stored in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub struct TestLayer {
    pub blob: Vec<u8>,
    pub media_type: String,
    pub diff_id: String,
}

impl TestLayer {
    pub fn new(tar: Vec<u8>, compression: Compression) -> Self {
        let diff_id = sha256(&tar);
        let (blob, media_type) = match compression {
            Compression::None => (tar, "application/vnd.oci.image.layer.v1.tar"),
            Compression::Gzip => {
                let mut encoder =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                encoder.write_all(&tar).unwrap();
                (
                    encoder.finish().unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            }
            Compression::Zstd => (
                zstd::encode_all(&tar[..], 3).unwrap(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        TestLayer {
            blob,
            media_type: media_type.to_string(),
            diff_id,
        }
    }
}

pub struct TestImage {
    pub layers: Vec<TestLayer>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub architecture: String,
}

impl TestImage {
    pub fn new(layers: Vec<TestLayer>) -> Self {
        TestImage {
            layers,
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".to_string()],
            working_dir: None,
            user: None,
            architecture: "amd64".to_string(),
        }
    }

    pub fn config_json(&self) -> Vec<u8> {
        let diff_ids: Vec<&str> = self.layers.iter().map(|l| l.diff_id.as_str()).collect();
        serde_json::to_vec(&serde_json::json!({
            "architecture": self.architecture,
            "os": "linux",
            "config": {
                "Env": self.env,
                "WorkingDir": self.working_dir.clone().unwrap_or_default(),
                "User": self.user.clone().unwrap_or_default(),
                "Cmd": ["/bin/sh"],
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap()
    }
}

/// Builds a layer tar with raw headers, so tests can write names and link targets that
/// `tar::Builder` would refuse (`..`, absolute paths).
pub struct LayerTar {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for LayerTar {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerTar {
    pub fn new() -> Self {
        LayerTar {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        let name = &mut header.as_old_mut().name;
        assert!(path.len() < name.len(), "test paths fit the old header");
        name[..path.len()].copy_from_slice(path.as_bytes());
        header
    }

    fn append(&mut self, mut header: tar::Header, data: &[u8]) -> &mut Self {
        header.set_cksum();
        self.builder.append(&header, data).unwrap();
        self
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let header = Self::header(path, tar::EntryType::Directory, mode, 0);
        self.append(header, &[])
    }

    pub fn file(&mut self, path: &str, content: &[u8], mode: u32) -> &mut Self {
        self.owned_file(path, content, mode, 0, 0)
    }

    pub fn owned_file(
        &mut self,
        path: &str,
        content: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> &mut Self {
        let mut header = Self::header(path, tar::EntryType::Regular, mode, content.len() as u64);
        header.set_uid(uid);
        header.set_gid(gid);
        self.append(header, content)
    }

    fn link(&mut self, path: &str, target: &str, kind: tar::EntryType) -> &mut Self {
        let mut header = Self::header(path, kind, 0o777, 0);
        let link = &mut header.as_old_mut().linkname;
        link[..target.len()].copy_from_slice(target.as_bytes());
        self.append(header, &[])
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(path, target, tar::EntryType::Symlink)
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(path, target, tar::EntryType::Link)
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut header = Self::header(path, tar::EntryType::Char, 0o666, 0);
        header.set_device_major(major).unwrap();
        header.set_device_minor(minor).unwrap();
        self.append(header, &[])
    }

    /// Adds a regular file with the xattr `name` set through a PAX header.
    pub fn file_with_xattr(
        &mut self,
        path: &str,
        content: &[u8],
        name: &str,
        value: &[u8],
    ) -> &mut Self {
        let record_body = format!("SCHILY.xattr.{name}=");
        let mut body = record_body.into_bytes();
        body.extend_from_slice(value);
        body.push(b'\n');
        // A PAX record is "<length> <key>=<value>\n" where length counts itself.
        let mut length = body.len() + 2;
        while format!("{length} ").len() + body.len() != length {
            length = format!("{length} ").len() + body.len();
        }
        let mut record = format!("{length} ").into_bytes();
        record.extend_from_slice(&body);
        let header = Self::header(
            "PaxHeader",
            tar::EntryType::XHeader,
            0o644,
            record.len() as u64,
        );
        self.append(header, &record);
        self.file(path, content, 0o644)
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        builder.into_inner().unwrap()
    }
}

/// Records pull progress events.
#[derive(Default)]
pub struct RecordingProgress {
    pub downloaded: Mutex<Vec<(String, u64)>>,
    pub done: Mutex<Vec<(String, bool)>>,
}

impl PullProgress for RecordingProgress {
    fn layer_progress(&self, layer: &str, downloaded: u64, _total: u64) {
        self.downloaded
            .lock()
            .unwrap()
            .push((layer.to_string(), downloaded));
    }

    fn layer_done(&self, layer: &str, cached: bool) {
        self.done.lock().unwrap().push((layer.to_string(), cached));
    }
}

impl RecordingProgress {
    pub fn bytes_downloaded(&self) -> u64 {
        let events = self.downloaded.lock().unwrap();
        let mut latest = std::collections::HashMap::new();
        for (layer, bytes) in events.iter() {
            latest.insert(layer.clone(), *bytes);
        }
        latest.values().sum()
    }
}

/// One line of `debugfs ls -p`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Entry {
    pub inode: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub name: String,
}

/// Reads an ext4 image with `debugfs`, without mounting it.
pub struct Ext4 {
    pub path: PathBuf,
}

impl Ext4 {
    pub fn new(path: &Path) -> Self {
        Ext4 {
            path: path.to_path_buf(),
        }
    }

    fn debugfs(&self, request: &str) -> String {
        let output = Command::new("debugfs")
            .arg("-R")
            .arg(request)
            .arg(&self.path)
            .output()
            .expect("debugfs runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Lists a directory, without `.` and `..`, sorted by name.
    pub fn ls(&self, dir: &str) -> Vec<Ext4Entry> {
        let mut entries: Vec<Ext4Entry> = self
            .debugfs(&format!("ls -p {dir}"))
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.trim().trim_matches('/').split('/').collect();
                if fields.len() < 5 {
                    return None;
                }
                Some(Ext4Entry {
                    inode: fields[0].parse().ok()?,
                    mode: u32::from_str_radix(fields[1], 8).ok()?,
                    uid: fields[2].parse().ok()?,
                    gid: fields[3].parse().ok()?,
                    name: fields[4].to_string(),
                })
            })
            .filter(|entry| entry.name != "." && entry.name != "..")
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries
    }

    pub fn names(&self, dir: &str) -> Vec<String> {
        self.ls(dir).into_iter().map(|entry| entry.name).collect()
    }

    /// Returns the entry at `path`, or `None` when absent.
    pub fn entry(&self, path: &str) -> Option<Ext4Entry> {
        let (dir, name) = path.rsplit_once('/').unwrap();
        let dir = if dir.is_empty() { "/" } else { dir };
        self.ls(dir).into_iter().find(|entry| entry.name == name)
    }

    pub fn cat(&self, path: &str) -> Vec<u8> {
        let output = Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat {path}"))
            .arg(&self.path)
            .output()
            .expect("debugfs runs");
        output.stdout
    }

    pub fn symlink_target(&self, path: &str) -> Option<String> {
        let stat = self.debugfs(&format!("stat {path}"));
        let line = stat.lines().find(|line| line.contains("link dest:"))?;
        let start = line.find('"')? + 1;
        let end = line.rfind('"')?;
        Some(line[start..end].to_string())
    }

    pub fn xattr(&self, path: &str, name: &str) -> Option<String> {
        let text = self.debugfs(&format!("ea_get {path} {name}"));
        let value = text.trim();
        (!value.is_empty()).then(|| value.to_string())
    }
}

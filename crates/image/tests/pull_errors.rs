//! Pull failures against a real registry: each gives a clear error and leaves the store
//! consistent.

mod support;

use std::path::Path;
use std::process::Command;

use base64::Engine;
use support::{
    start_registry, start_registry_with_user, Compression, LayerTar, RecordingProgress, TestImage,
    TestLayer,
};
use upstream_image::{ImageError, ImageStore, NoProgress, StoreOptions};

fn small_image(text: &[u8]) -> TestImage {
    TestImage::new(vec![TestLayer::new(
        LayerTar::new().file("file", text, 0o644).finish(),
        Compression::Gzip,
    )])
}

/// Bytes that gzip cannot shrink, from a fixed xorshift sequence.
fn incompressible(length: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Asserts that no image is indexed and no build is left in `tmp/`.
fn assert_store_clean(store: &ImageStore, reference: &str) {
    assert!(store.get(reference).unwrap().is_none());
    assert!(store.list().unwrap().is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(store.root().join("tmp"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("unpack-") || name.starts_with("build-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(std::fs::read_dir(store.root().join("rootfs"))
        .unwrap()
        .next()
        .is_none());
}

#[tokio::test]
async fn pull_unknown_image_is_not_found() {
    let Some(registry) = start_registry() else {
        return;
    };
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let reference = registry.reference("nothing:1");
    let error = store.pull(&reference, &NoProgress).await.unwrap_err();
    assert!(matches!(error, ImageError::NotFound { .. }), "{error:?}");
    assert!(error.to_string().contains(&reference), "{error}");
    assert_store_clean(&store, &reference);
}

#[tokio::test]
async fn pull_wrong_tag_is_not_found() {
    let Some(registry) = start_registry() else {
        return;
    };
    registry.push("exists:1", &small_image(b"one")).await;
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let reference = registry.reference("exists:2");
    let error = store.pull(&reference, &NoProgress).await.unwrap_err();
    assert!(matches!(error, ImageError::NotFound { .. }), "{error:?}");
    assert_store_clean(&store, &reference);
}

#[tokio::test]
async fn pull_registry_down_names_registry() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let reference = format!("127.0.0.1:{port}/image:1");
    let error = store.pull(&reference, &NoProgress).await.unwrap_err();
    assert!(matches!(error, ImageError::Registry { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(&reference), "{message}");
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert_store_clean(&store, &reference);
}

fn docker_config(dir: &Path, registry: &str, user: &str, password: &str) -> std::path::PathBuf {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let path = dir.join("config.json");
    let text = format!(r#"{{"auths": {{"{registry}": {{"auth": "{auth}"}}}}}}"#);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn pull_auth_from_docker_config() {
    let Some(registry) = start_registry_with_user(Some(("alice", "right"))) else {
        return;
    };
    registry.push("private:1", &small_image(b"secret")).await;
    let reference = registry.reference("private:1");
    let config_dir = tempfile::tempdir().unwrap();

    let anonymous_dir = tempfile::tempdir().unwrap();
    let anonymous = ImageStore::open_with(
        anonymous_dir.path(),
        StoreOptions {
            docker_config: Some(config_dir.path().join("absent.json")),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let error = anonymous.pull(&reference, &NoProgress).await.unwrap_err();
    assert!(matches!(error, ImageError::AuthRefused { .. }), "{error:?}");
    assert!(error.to_string().contains("docker login"), "{error}");

    let wrong_dir = tempfile::tempdir().unwrap();
    let wrong = ImageStore::open_with(
        wrong_dir.path(),
        StoreOptions {
            docker_config: Some(docker_config(
                config_dir.path(),
                &registry.host(),
                "alice",
                "bad",
            )),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let error = wrong.pull(&reference, &NoProgress).await.unwrap_err();
    assert!(matches!(error, ImageError::AuthRefused { .. }), "{error:?}");
    assert_store_clean(&wrong, &reference);

    let right_dir = tempfile::tempdir().unwrap();
    let right = ImageStore::open_with(
        right_dir.path(),
        StoreOptions {
            docker_config: Some(docker_config(
                config_dir.path(),
                &registry.host(),
                "alice",
                "right",
            )),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let pulled = right.pull(&reference, &NoProgress).await.unwrap();
    assert!(pulled.rootfs.is_file());
}

#[tokio::test]
async fn pull_digest_mismatch_keeps_cache_clean() {
    let Some(registry) = start_registry() else {
        return;
    };
    let image = small_image(b"original content");
    let layer_digest = support::sha256(&image.layers[0].blob);
    registry.push("corrupt:1", &image).await;

    // The filesystem storage serves blob data as stored, so flipping a byte on disk makes the
    // registry send content that does not match its digest.
    let data_path = registry.blob_data_path(&layer_digest);
    let original = std::fs::read(&data_path).unwrap();
    let mut corrupt = original.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    std::fs::write(&data_path, &corrupt).unwrap();

    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let reference = registry.reference("corrupt:1");
    let error = store.pull(&reference, &NoProgress).await.unwrap_err();
    assert!(
        matches!(error, ImageError::DigestMismatch { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains(&layer_digest), "{error}");
    assert_store_clean(&store, &reference);
    let hex = layer_digest.strip_prefix("sha256:").unwrap();
    assert!(!store.root().join("blobs/sha256").join(hex).exists());
    assert!(!store
        .root()
        .join("tmp")
        .join(format!("{hex}.partial"))
        .exists());

    std::fs::write(&data_path, &original).unwrap();
    let pulled = store.pull(&reference, &NoProgress).await.unwrap();
    assert!(pulled.rootfs.is_file());
}

#[tokio::test]
async fn pull_resumes_partial_download() {
    let Some(registry) = start_registry() else {
        return;
    };
    let payload = incompressible(2 << 20);
    let image = TestImage::new(vec![TestLayer::new(
        LayerTar::new().file("big", &payload, 0o644).finish(),
        Compression::Gzip,
    )]);
    let blob = image.layers[0].blob.clone();
    let layer_digest = support::sha256(&blob);
    registry.push("resume:1", &image).await;

    // What an interrupted earlier pull leaves behind: the first half of the layer.
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let hex = layer_digest.strip_prefix("sha256:").unwrap();
    let partial = store.root().join("tmp").join(format!("{hex}.partial"));
    let half = blob.len() / 2;
    std::fs::write(&partial, &blob[..half]).unwrap();

    let progress = RecordingProgress::default();
    let pulled = store
        .pull(&registry.reference("resume:1"), &progress)
        .await
        .unwrap();
    let events = progress.downloaded.lock().unwrap();
    let first = events
        .iter()
        .find(|(layer, _)| *layer == layer_digest)
        .unwrap();
    assert_eq!(
        first.1, half as u64,
        "the download resumed at the partial's length"
    );
    assert!(!partial.exists());
    assert_eq!(support::Ext4::new(&pulled.rootfs).cat("/big"), payload);
}

#[tokio::test]
async fn pull_corrupt_partial_restarts() {
    let Some(registry) = start_registry() else {
        return;
    };
    let image = small_image(b"restart me");
    let layer_digest = support::sha256(&image.layers[0].blob);
    registry.push("restart:1", &image).await;
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let hex = layer_digest.strip_prefix("sha256:").unwrap();
    let partial = store.root().join("tmp").join(format!("{hex}.partial"));
    std::fs::write(&partial, b"garbage").unwrap();
    let reference = registry.reference("restart:1");

    let error = store.pull(&reference, &NoProgress).await.unwrap_err();
    assert!(
        matches!(error, ImageError::DigestMismatch { .. }),
        "{error:?}"
    );
    assert!(!partial.exists(), "a corrupt partial is dropped");
    let pulled = store.pull(&reference, &NoProgress).await.unwrap();
    assert!(pulled.rootfs.is_file());
}

/// A tmpfs mounted for one test and unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(dir.path())
            .status();
        match status {
            Ok(status) if status.success() => Some(SmallDisk { dir }),
            _ => {
                eprintln!("skipped: mounting a tmpfs needs root or CAP_SYS_ADMIN");
                None
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test]
async fn pull_disk_full_is_reported() {
    let Some(registry) = start_registry() else {
        return;
    };
    let Some(disk) = SmallDisk::mount(3 << 20) else {
        return;
    };
    let image = TestImage::new(vec![TestLayer::new(
        LayerTar::new()
            .file("big", &incompressible(4 << 20), 0o644)
            .finish(),
        Compression::Gzip,
    )]);
    registry.push("huge:1", &image).await;
    let root = disk.dir.path().join("images");
    let store = ImageStore::open(&root).unwrap();
    let reference = registry.reference("huge:1");

    let error = store.pull(&reference, &NoProgress).await.unwrap_err();
    assert!(matches!(error, ImageError::DiskFull { .. }), "{error:?}");
    assert!(error.to_string().contains(&reference), "{error}");
    assert_store_clean(&store, &reference);
    let report = store.prune().unwrap();
    assert!(report.temp_removed > 0, "the partial download is pruned");
}

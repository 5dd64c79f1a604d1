//! Offline imports: OCI layouts (written here, and by skopeo) and `docker save` archives.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{sha256, start_registry, Compression, Ext4, LayerTar, TestImage, TestLayer};
use upstream_image::{ImageError, ImageStore};

fn two_layer_image() -> TestImage {
    let mut first = LayerTar::new();
    first
        .dir("etc", 0o755)
        .file("etc/os-release", b"ID=test\n", 0o644)
        .file("etc/removed", b"x", 0o644);
    let mut second = LayerTar::new();
    second
        .file("etc/.wh.removed", b"", 0o644)
        .file("etc/added", b"y", 0o600);
    let mut image = TestImage::new(vec![
        TestLayer::new(first.finish(), Compression::Gzip),
        TestLayer::new(second.finish(), Compression::None),
    ]);
    image.env = vec!["FROM=import".into()];
    image
}

fn write_blob(layout: &Path, bytes: &[u8]) -> String {
    let digest = sha256(bytes);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(digest.strip_prefix("sha256:").unwrap()), bytes).unwrap();
    digest
}

/// Writes an OCI image layout and returns the manifest digest.
fn write_oci_layout(layout: &Path, image: &TestImage, annotations: serde_json::Value) -> String {
    std::fs::create_dir_all(layout).unwrap();
    let config = image.config_json();
    let config_digest = write_blob(layout, &config);
    let layers: Vec<serde_json::Value> = image
        .layers
        .iter()
        .map(|layer| {
            serde_json::json!({
                "mediaType": layer.media_type,
                "digest": write_blob(layout, &layer.blob),
                "size": layer.blob.len(),
            })
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layers,
    }))
    .unwrap();
    let manifest_digest = write_blob(layout, &manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": annotations,
        }],
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion": "1.0.0"}"#,
    )
    .unwrap();
    manifest_digest
}

fn tar_directory(dir: &Path, output: &Path) {
    let status = Command::new("tar")
        .arg("-cf")
        .arg(output)
        .arg("-C")
        .arg(dir)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
}

fn assert_two_layer_tree(rootfs: &Path) {
    let ext4 = Ext4::new(rootfs);
    assert_eq!(ext4.names("/etc"), ["added", "os-release"]);
    assert_eq!(ext4.cat("/etc/os-release"), b"ID=test\n");
    assert_eq!(ext4.entry("/etc/added").unwrap().mode, 0o100600);
}

#[test]
fn import_oci_layout_directory() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("myimage");
    let image = two_layer_image();
    let digest = write_oci_layout(
        &layout,
        &image,
        serde_json::json!({"org.opencontainers.image.ref.name": "1.0"}),
    );
    let store = ImageStore::open(&work.path().join("store")).unwrap();

    let imported = store.import(&layout).unwrap();
    assert_eq!(imported.len(), 1);
    let image_one = &imported[0];
    assert_eq!(image_one.reference, "docker.io/library/myimage:1.0");
    assert_eq!(image_one.digest, digest);
    assert_eq!(image_one.config.env, ["FROM=import"]);
    assert_two_layer_tree(&image_one.rootfs);
    assert_eq!(store.get("myimage:1.0").unwrap().as_ref(), Some(image_one));
}

#[test]
fn import_oci_layout_tar_with_full_name() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let digest = write_oci_layout(
        &layout,
        &two_layer_image(),
        serde_json::json!({
            "io.containerd.image.name": "ghcr.io/org/tool:2",
            "org.opencontainers.image.ref.name": "2",
        }),
    );
    let archive = work.path().join("tool.tar");
    tar_directory(&layout, &archive);
    let store = ImageStore::open(&work.path().join("store")).unwrap();

    let imported = store.import(&archive).unwrap();
    assert_eq!(imported.len(), 1);
    assert_eq!(imported[0].reference, "ghcr.io/org/tool:2");
    assert_eq!(imported[0].digest, digest);
    assert_two_layer_tree(&imported[0].rootfs);
}

/// Writes a `docker save` archive: `manifest.json`, the config as `<hex>.json` and each
/// layer uncompressed as `<n>/layer.tar`. Returns the config digest (the image ID).
fn write_docker_save(dir: &Path, image: &TestImage, tags: &[&str]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let config = image.config_json();
    let config_digest = sha256(&config);
    let config_name = format!("{}.json", config_digest.strip_prefix("sha256:").unwrap());
    std::fs::write(dir.join(&config_name), &config).unwrap();
    let mut layers = Vec::new();
    for (index, layer) in image.layers.iter().enumerate() {
        let mut decoder = flate2::read::MultiGzDecoder::new(&layer.blob[..]);
        let mut tar = Vec::new();
        if std::io::Read::read_to_end(&mut decoder, &mut tar).is_err() {
            tar = layer.blob.clone();
        }
        let name = format!("layer{index}/layer.tar");
        std::fs::create_dir_all(dir.join(format!("layer{index}"))).unwrap();
        std::fs::write(dir.join(&name), tar).unwrap();
        layers.push(name);
    }
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": tags,
        "Layers": layers,
    }]);
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    config_digest
}

#[test]
fn import_docker_save_tarball() {
    let work = tempfile::tempdir().unwrap();
    let saved = work.path().join("saved");
    let id = write_docker_save(&saved, &two_layer_image(), &["saved:1", "saved:latest"]);
    let archive = work.path().join("saved.tar");
    tar_directory(&saved, &archive);
    let store = ImageStore::open(&work.path().join("store")).unwrap();

    let imported = store.import(&archive).unwrap();
    let references: Vec<&str> = imported
        .iter()
        .map(|image| image.reference.as_str())
        .collect();
    assert_eq!(
        references,
        [
            "docker.io/library/saved:1",
            "docker.io/library/saved:latest"
        ]
    );
    assert!(imported
        .iter()
        .all(|image| image.digest == id && image.id == id));
    assert_eq!(imported[0].rootfs, imported[1].rootfs);
    assert_two_layer_tree(&imported[0].rootfs);
    assert_eq!(store.list().unwrap().len(), 2);
    assert!(store.get(&id).unwrap().is_some(), "found by image ID");
}

#[test]
fn import_untagged_docker_save_uses_id() {
    let work = tempfile::tempdir().unwrap();
    let saved = work.path().join("saved");
    let id = write_docker_save(&saved, &two_layer_image(), &[]);
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let imported = store.import(&saved).unwrap();
    assert_eq!(imported[0].reference, id);
    assert!(
        store.get(&id[..19]).unwrap().is_some(),
        "found by a 12-digit prefix"
    );
}

#[test]
fn import_rejects_path_outside_archive() {
    let work = tempfile::tempdir().unwrap();
    let saved = work.path().join("saved");
    std::fs::create_dir_all(&saved).unwrap();
    let manifest = serde_json::json!([{
        "Config": "../../../../etc/passwd",
        "RepoTags": ["evil:1"],
        "Layers": [],
    }]);
    std::fs::write(saved.join("manifest.json"), manifest.to_string()).unwrap();
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let error = store.import(&saved).unwrap_err();
    assert!(
        matches!(error, ImageError::InvalidImage { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("leaves the archive"), "{error}");
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn import_rejects_corrupt_layout_blob() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("broken");
    let image = two_layer_image();
    write_oci_layout(&layout, &image, serde_json::json!({}));
    let layer_digest = sha256(&image.layers[0].blob);
    let blob = layout
        .join("blobs/sha256")
        .join(layer_digest.strip_prefix("sha256:").unwrap());
    std::fs::write(&blob, b"tampered").unwrap();
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let error = store.import(&layout).unwrap_err();
    assert!(
        matches!(error, ImageError::DigestMismatch { .. }),
        "{error:?}"
    );
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn import_rejects_unknown_format() {
    let work = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let empty: PathBuf = work.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let error = store.import(&empty).unwrap_err();
    assert!(
        error.to_string().contains("neither an OCI layout"),
        "{error}"
    );
}

#[tokio::test]
async fn import_skopeo_layout_matches_pull() {
    if !Path::new("/usr/bin/skopeo").exists() {
        eprintln!("skipped: skopeo is not installed");
        return;
    }
    let Some(registry) = start_registry() else {
        return;
    };
    let digest = registry.push("copied:3", &two_layer_image()).await;
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("copied");
    let status = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
        ])
        .arg(format!("docker://{}", registry.reference("copied:3")))
        .arg(format!("oci:{}:3", layout.display()))
        .status()
        .unwrap();
    assert!(status.success(), "skopeo copy failed");

    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let imported = store.import(&layout).unwrap();
    assert_eq!(imported[0].reference, "docker.io/library/copied:3");
    assert_eq!(imported[0].digest, digest);

    // The pull finds the rootfs the import built and downloads no layer.
    let progress = support::RecordingProgress::default();
    let pulled = store
        .pull(&registry.reference("copied:3"), &progress)
        .await
        .unwrap();
    assert_eq!(pulled.rootfs, imported[0].rootfs);
    assert_eq!(progress.bytes_downloaded(), 0);
}

#[test]
fn prune_removes_blobs_of_removed_image() {
    let work = tempfile::tempdir().unwrap();
    let saved = work.path().join("saved");
    write_docker_save(&saved, &two_layer_image(), &["pruned:1"]);
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let image = store.import(&saved).unwrap().remove(0);

    let report = store.prune().unwrap();
    assert_eq!(report.blobs_removed, 0, "blobs of a local image stay");
    store.remove("pruned:1").unwrap();
    assert!(!image.rootfs.exists());
    let report = store.prune().unwrap();
    assert_eq!(report.blobs_removed, 3, "config and two layers");
    assert!(report.bytes_freed > 0);
    let blobs = std::fs::read_dir(store.root().join("blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 0);
}

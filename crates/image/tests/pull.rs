//! Pulls from a real `docker-registry` on loopback.

mod support;

use std::path::Path;

use support::{
    start_registry, Compression, Ext4, LayerTar, RecordingProgress, TestImage, TestLayer,
};
use upstream_image::{ImageError, ImageStore, NoProgress};

/// Builds a glibc layer from host files: `/bin/sh` (dash) with the loader and libc it needs.
fn glibc_layer() -> Vec<u8> {
    let mut tar = LayerTar::new();
    tar.dir("bin", 0o755)
        .dir("lib64", 0o755)
        .dir("lib", 0o755)
        .dir("lib/x86_64-linux-gnu", 0o755)
        .dir("etc", 0o755);
    let sh = std::fs::read("/bin/dash")
        .or_else(|_| std::fs::read("/bin/sh"))
        .unwrap();
    tar.file("bin/sh", &sh, 0o755);
    for (path, host) in [
        ("lib64/ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2"),
        (
            "lib/x86_64-linux-gnu/libc.so.6",
            "/lib/x86_64-linux-gnu/libc.so.6",
        ),
    ] {
        let content = std::fs::read(host).unwrap();
        tar.file(path, &content, 0o755);
    }
    tar.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644);
    tar.finish()
}

#[tokio::test]
async fn pull_glibc_image() {
    let Some(registry) = start_registry() else {
        return;
    };
    let mut image = TestImage::new(vec![TestLayer::new(glibc_layer(), Compression::Gzip)]);
    image.env = vec!["PATH=/bin".into(), "LANG=C.UTF-8".into()];
    image.working_dir = Some("/work".into());
    image.user = Some("1000:1000".into());
    let digest = registry.push("glibc:1", &image).await;

    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let reference = registry.reference("glibc:1");
    assert!(store.get(&reference).unwrap().is_none());
    let pulled = store.pull(&reference, &NoProgress).await.unwrap();

    assert_eq!(pulled.reference, reference);
    assert_eq!(pulled.digest, digest);
    assert_eq!(pulled.config.env, ["PATH=/bin", "LANG=C.UTF-8"]);
    assert_eq!(pulled.config.working_dir.as_deref(), Some("/work"));
    assert_eq!(pulled.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(pulled.config.cmd, ["/bin/sh"]);

    let ext4 = Ext4::new(&pulled.rootfs);
    let host_sh = std::fs::read("/bin/dash")
        .or_else(|_| std::fs::read("/bin/sh"))
        .unwrap();
    assert_eq!(ext4.cat("/bin/sh"), host_sh);
    assert_eq!(ext4.entry("/bin/sh").unwrap().mode, 0o100755);
    for dir in ["proc", "sys", "dev", "tmp", "run"] {
        assert!(
            ext4.entry(&format!("/{dir}")).is_some(),
            "/{dir} is missing"
        );
    }
    assert_eq!(ext4.entry("/tmp").unwrap().mode, 0o41777);

    let found = store.get(&reference).unwrap().unwrap();
    assert_eq!(found, pulled);
    let by_digest = store.get(&digest).unwrap().unwrap();
    assert_eq!(by_digest.rootfs, pulled.rootfs);
    let metadata = std::fs::metadata(&pulled.rootfs).unwrap();
    assert!(metadata.permissions().readonly());
}

#[tokio::test]
async fn pull_busybox_image_zstd() {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        eprintln!("skipped: /bin/busybox is missing (apt-get install busybox-static)");
        return;
    }
    let Some(registry) = start_registry() else {
        return;
    };
    let content = std::fs::read(busybox).unwrap();
    let mut tar = LayerTar::new();
    tar.dir("bin", 0o755)
        .file("bin/busybox", &content, 0o755)
        .symlink("bin/sh", "busybox")
        .symlink("bin/ls", "/bin/busybox")
        .dir("home", 0o755)
        .dir("home/user", 0o700)
        .owned_file(
            "home/user/.profile",
            b"export PS1='$ '\n",
            0o600,
            1000,
            1000,
        )
        .file("bin/ping", b"not really ping", 0o4755);
    let image = TestImage::new(vec![TestLayer::new(tar.finish(), Compression::Zstd)]);
    registry.push("busybox:musl", &image).await;

    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let pulled = store
        .pull(
            &format!("localhost:{}/busybox:musl", registry.port),
            &NoProgress,
        )
        .await
        .unwrap();

    let ext4 = Ext4::new(&pulled.rootfs);
    assert_eq!(ext4.cat("/bin/busybox"), content);
    assert_eq!(ext4.symlink_target("/bin/sh").as_deref(), Some("busybox"));
    assert_eq!(
        ext4.symlink_target("/bin/ls").as_deref(),
        Some("/bin/busybox")
    );
    let profile = ext4.entry("/home/user/.profile").unwrap();
    assert_eq!((profile.uid, profile.gid), (1000, 1000));
    assert_eq!(profile.mode, 0o100600);
    assert_eq!(ext4.entry("/home/user").unwrap().mode, 0o40700);
    assert_eq!(ext4.entry("/bin/ping").unwrap().mode, 0o104755);
}

/// Three layers exercising whiteouts, opaque directories, hard links within and across
/// layers, symlinked parents and type changes, checked against what `docker run` shows.
#[tokio::test]
async fn pull_applies_whiteouts_and_links() {
    let Some(registry) = start_registry() else {
        return;
    };
    let mut first = LayerTar::new();
    first
        .dir("usr", 0o755)
        .dir("usr/lib", 0o755)
        .symlink("lib", "usr/lib")
        .dir("a", 0o755)
        .file("a/old1", b"1", 0o644)
        .dir("a/sub", 0o755)
        .file("a/sub/old2", b"2", 0o644)
        .dir("b", 0o755)
        .file("b/keep", b"keep", 0o644)
        .file("b/gone", b"gone", 0o644)
        .dir("b/gonedir", 0o755)
        .file("b/gonedir/inner", b"inner", 0o644)
        .dir("data", 0o755)
        .file("data/orig", b"shared content", 0o640)
        .hardlink("data/same-layer", "data/orig")
        .dir("replace", 0o755)
        .file("replace/child", b"c", 0o644);
    let mut second = LayerTar::new();
    second
        .file("b/.wh.gone", b"", 0o644)
        .file("b/.wh.gonedir", b"", 0o644)
        .dir("a", 0o755)
        .file("a/.wh..wh..opq", b"", 0o644)
        .file("a/new", b"new", 0o644)
        .hardlink("data/cross-layer", "data/orig")
        .file("lib/libfoo.so", b"foo", 0o755)
        .file("replace", b"now a file", 0o644);
    let mut third = LayerTar::new();
    third
        .file("a/sub2", b"third", 0o644)
        .file("data/.wh.orig", b"", 0o644)
        .hardlink("data/third-link", "data/cross-layer");
    let image = TestImage::new(vec![
        TestLayer::new(first.finish(), Compression::Gzip),
        TestLayer::new(second.finish(), Compression::None),
        TestLayer::new(third.finish(), Compression::Zstd),
    ]);
    registry.push("layers:1", &image).await;

    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let pulled = store
        .pull(&registry.reference("layers:1"), &NoProgress)
        .await
        .unwrap();
    let ext4 = Ext4::new(&pulled.rootfs);

    assert_eq!(ext4.names("/a"), ["new", "sub2"]);
    assert_eq!(ext4.names("/b"), ["keep"]);
    assert_eq!(
        ext4.names("/data"),
        ["cross-layer", "same-layer", "third-link"]
    );
    let cross = ext4.entry("/data/cross-layer").unwrap();
    let same = ext4.entry("/data/same-layer").unwrap();
    let third_link = ext4.entry("/data/third-link").unwrap();
    assert_eq!(
        cross.inode, same.inode,
        "hard links within and across layers share an inode"
    );
    assert_eq!(cross.inode, third_link.inode);
    assert_eq!(cross.mode, 0o100640);
    assert_eq!(ext4.cat("/data/third-link"), b"shared content");
    assert_eq!(ext4.symlink_target("/lib").as_deref(), Some("usr/lib"));
    assert_eq!(ext4.names("/usr/lib"), ["libfoo.so"]);
    assert_eq!(ext4.entry("/replace").unwrap().mode, 0o100644);
    assert_eq!(ext4.cat("/replace"), b"now a file");
}

#[tokio::test]
async fn pull_twice_downloads_nothing() {
    let Some(registry) = start_registry() else {
        return;
    };
    let image = TestImage::new(vec![
        TestLayer::new(glibc_layer(), Compression::Gzip),
        TestLayer::new(
            LayerTar::new().file("hello", b"hi", 0o644).finish(),
            Compression::Gzip,
        ),
    ]);
    registry.push("cached:1", &image).await;
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let reference = registry.reference("cached:1");

    let first = RecordingProgress::default();
    let pulled = store.pull(&reference, &first).await.unwrap();
    assert!(first.bytes_downloaded() > 0);
    assert!(first.done.lock().unwrap().iter().any(|(_, cached)| !cached));

    let second = RecordingProgress::default();
    let again = store.pull(&reference, &second).await.unwrap();
    assert_eq!(again, pulled);
    assert_eq!(second.bytes_downloaded(), 0);
    let done = second.done.lock().unwrap();
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|(_, cached)| *cached), "{done:?}");
}

#[tokio::test]
async fn pull_shares_layers_between_images() {
    let Some(registry) = start_registry() else {
        return;
    };
    let base = glibc_layer();
    let one = TestImage::new(vec![
        TestLayer::new(base.clone(), Compression::Gzip),
        TestLayer::new(
            LayerTar::new().file("one", b"1", 0o644).finish(),
            Compression::Gzip,
        ),
    ]);
    let two = TestImage::new(vec![
        TestLayer::new(base, Compression::Gzip),
        TestLayer::new(
            LayerTar::new().file("two", b"2", 0o644).finish(),
            Compression::Gzip,
        ),
    ]);
    registry.push("one:1", &one).await;
    registry.push("two:1", &two).await;
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    store
        .pull(&registry.reference("one:1"), &NoProgress)
        .await
        .unwrap();

    let progress = RecordingProgress::default();
    let pulled = store
        .pull(&registry.reference("two:1"), &progress)
        .await
        .unwrap();
    let done = progress.done.lock().unwrap();
    let cached: Vec<bool> = done.iter().map(|(_, cached)| *cached).collect();
    assert_eq!(
        cached.iter().filter(|cached| **cached).count(),
        1,
        "{done:?}"
    );
    assert_eq!(Ext4::new(&pulled.rootfs).cat("/two"), b"2");
}

#[tokio::test]
async fn pull_by_digest_reference() {
    let Some(registry) = start_registry() else {
        return;
    };
    let image = TestImage::new(vec![TestLayer::new(
        LayerTar::new().file("marker", b"digest", 0o644).finish(),
        Compression::Gzip,
    )]);
    let digest = registry.push("bydigest:1", &image).await;
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let reference = format!("localhost:{}/bydigest@{digest}", registry.port);
    let pulled = store.pull(&reference, &NoProgress).await.unwrap();
    assert_eq!(pulled.digest, digest);
    assert_eq!(pulled.reference, reference);
    assert!(store.get(&reference).unwrap().is_some());
}

#[tokio::test]
async fn pull_resolves_index_to_amd64() {
    use oci_client::manifest::{ImageIndexEntry, OciImageIndex, Platform};
    use oci_client::Reference;

    let Some(registry) = start_registry() else {
        return;
    };
    let layer = |text: &[u8]| {
        TestLayer::new(
            LayerTar::new().file("arch", text, 0o644).finish(),
            Compression::Gzip,
        )
    };
    let amd64 = TestImage::new(vec![layer(b"amd64")]);
    let mut arm64 = TestImage::new(vec![layer(b"arm64")]);
    arm64.architecture = "arm64".into();
    let arm_digest = registry.push("multi:arm64", &arm64).await;
    let amd_digest = registry.push("multi:amd64", &amd64).await;

    let client = registry.client();
    let mut manifests = Vec::new();
    for (tag, digest, arch) in [
        ("arm64", &arm_digest, "arm64"),
        ("amd64", &amd_digest, "amd64"),
    ] {
        let reference: Reference = registry.reference(&format!("multi:{tag}")).parse().unwrap();
        let (raw, _) = client
            .pull_manifest_raw(
                &reference,
                &registry.auth,
                &["application/vnd.oci.image.manifest.v1+json"],
            )
            .await
            .unwrap();
        let platform: Platform =
            serde_json::from_value(serde_json::json!({"architecture": arch, "os": "linux"}))
                .unwrap();
        manifests.push(ImageIndexEntry {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: digest.clone(),
            size: raw.len() as i64,
            platform: Some(platform),
            annotations: None,
            artifact_type: None,
        });
    }
    let index = OciImageIndex {
        schema_version: 2,
        media_type: Some("application/vnd.oci.image.index.v1+json".into()),
        manifests,
        artifact_type: None,
        annotations: None,
    };
    let multi: Reference = registry.reference("multi:latest").parse().unwrap();
    client
        .push_manifest_list(&multi, &registry.auth, index)
        .await
        .unwrap();

    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let pulled = store
        .pull(&registry.reference("multi"), &NoProgress)
        .await
        .unwrap();
    assert_eq!(pulled.digest, amd_digest);
    assert_eq!(Ext4::new(&pulled.rootfs).cat("/arch"), b"amd64");

    let error = store
        .pull(&registry.reference("multi:arm64"), &NoProgress)
        .await
        .unwrap_err();
    assert!(
        matches!(error, ImageError::NoMatchingPlatform { .. }),
        "{error}"
    );
}

#[tokio::test]
async fn pull_keeps_xattrs() {
    let Some(registry) = start_registry() else {
        return;
    };
    let mut tar = LayerTar::new();
    tar.file_with_xattr("tagged", b"content", "user.upstream", b"kept");
    let image = TestImage::new(vec![TestLayer::new(tar.finish(), Compression::Gzip)]);
    registry.push("xattr:1", &image).await;
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let pulled = store
        .pull(&registry.reference("xattr:1"), &NoProgress)
        .await
        .unwrap();
    let ext4 = Ext4::new(&pulled.rootfs);
    assert_eq!(ext4.cat("/tagged"), b"content");
    let value = ext4.xattr("/tagged", "user.upstream").unwrap_or_default();
    assert!(value.contains("kept"), "xattr value: {value:?}");
}

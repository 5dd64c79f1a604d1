//! Hostile layers pulled from a real registry: each attack is rejected or neutralised and
//! nothing outside the unpack directory changes.

mod support;

use std::path::Path;

use support::{start_registry, Compression, Ext4, LayerTar, Registry, TestImage, TestLayer};
use upstream_image::{ImageError, ImageStore, LocalImage, NoProgress, StoreOptions, UnpackLimits};

/// A host directory the attacks aim at, outside the store.
struct Victim {
    dir: tempfile::TempDir,
}

impl Victim {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("precious"), b"untouched").unwrap();
        Victim { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Asserts the directory holds only the file it started with, unchanged.
    fn assert_untouched(&self) {
        let names: Vec<String> = std::fs::read_dir(self.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["precious"]);
        assert_eq!(
            std::fs::read(self.path().join("precious")).unwrap(),
            b"untouched"
        );
    }
}

async fn pull_layers(
    registry: &Registry,
    name: &str,
    layers: Vec<Vec<u8>>,
    limits: UnpackLimits,
) -> (
    tempfile::TempDir,
    ImageStore,
    Result<LocalImage, ImageError>,
) {
    let layers = layers
        .into_iter()
        .map(|tar| TestLayer::new(tar, Compression::Gzip))
        .collect();
    registry.push(name, &TestImage::new(layers)).await;
    let store_dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        limits,
        ..StoreOptions::default()
    };
    let store = ImageStore::open_with(store_dir.path(), options).unwrap();
    let result = store.pull(&registry.reference(name), &NoProgress).await;
    (store_dir, store, result)
}

fn assert_hostile(result: &Result<LocalImage, ImageError>, reason: &str) {
    match result {
        Err(error @ ImageError::HostileLayer { .. }) => {
            assert!(error.to_string().contains(reason), "{error}");
        }
        other => panic!("expected a rejected layer, got {other:?}"),
    }
}

/// `path` relative to `/`, for embedding a host path in a tar name.
fn relative(path: &Path) -> String {
    path.strip_prefix("/").unwrap().display().to_string()
}

#[tokio::test]
async fn hostile_dotdot_entry_rejected() {
    let Some(registry) = start_registry() else {
        return;
    };
    let victim = Victim::new();
    let depth = "../".repeat(20);
    let name = format!("{depth}{}/escaped", relative(victim.path()));
    let layer = LayerTar::new().file(&name, b"pwned", 0o644).finish();
    let (_dir, store, result) =
        pull_layers(&registry, "dotdot:1", vec![layer], UnpackLimits::default()).await;
    assert_hostile(&result, "'..'");
    victim.assert_untouched();
    assert!(store.list().unwrap().is_empty());
}

#[tokio::test]
async fn hostile_absolute_path_stays_inside() {
    let Some(registry) = start_registry() else {
        return;
    };
    let victim = Victim::new();
    let name = format!("{}/absolute", victim.path().display());
    let mut tar = LayerTar::new();
    tar.file(&name, b"inside", 0o644);
    let (_dir, _store, result) = pull_layers(
        &registry,
        "absolute:1",
        vec![tar.finish()],
        UnpackLimits::default(),
    )
    .await;
    let image = result.unwrap();
    victim.assert_untouched();
    let inside = format!("{}/absolute", victim.path().display());
    assert_eq!(Ext4::new(&image.rootfs).cat(&inside), b"inside");
}

#[tokio::test]
async fn hostile_absolute_symlink_parent_stays_inside() {
    let Some(registry) = start_registry() else {
        return;
    };
    let victim = Victim::new();
    let mut first = LayerTar::new();
    first.symlink("evil", &victim.path().display().to_string());
    let mut second = LayerTar::new();
    second.file("evil/pwned", b"pwned", 0o644);
    let (_dir, _store, result) = pull_layers(
        &registry,
        "abslink:1",
        vec![first.finish(), second.finish()],
        UnpackLimits::default(),
    )
    .await;
    let image = result.unwrap();
    victim.assert_untouched();
    // The link resolved as if the tree were `/`, so the file landed in the image.
    let inside = format!("{}/pwned", victim.path().display());
    assert_eq!(Ext4::new(&image.rootfs).cat(&inside), b"pwned");
}

#[tokio::test]
async fn hostile_relative_symlink_parent_stays_inside() {
    let Some(registry) = start_registry() else {
        return;
    };
    let victim = Victim::new();
    let mut tar = LayerTar::new();
    tar.dir("deep", 0o755)
        .symlink("deep/up", &"../".repeat(30))
        .file(
            &format!("deep/up/{}/pwned", relative(victim.path())),
            b"pwned",
            0o644,
        );
    let (_dir, _store, result) = pull_layers(
        &registry,
        "rellink:1",
        vec![tar.finish()],
        UnpackLimits::default(),
    )
    .await;
    let image = result.unwrap();
    victim.assert_untouched();
    let inside = format!("{}/pwned", victim.path().display());
    assert_eq!(Ext4::new(&image.rootfs).cat(&inside), b"pwned");
}

#[tokio::test]
async fn hostile_symlink_overwrite_replaces_link() {
    let Some(registry) = start_registry() else {
        return;
    };
    let victim = Victim::new();
    let target = victim.path().join("precious");
    let mut first = LayerTar::new();
    first.symlink("file", &target.display().to_string());
    let mut second = LayerTar::new();
    second.file("file", b"overwritten", 0o644);
    let (_dir, _store, result) = pull_layers(
        &registry,
        "overwrite:1",
        vec![first.finish(), second.finish()],
        UnpackLimits::default(),
    )
    .await;
    let image = result.unwrap();
    victim.assert_untouched();
    let ext4 = Ext4::new(&image.rootfs);
    assert_eq!(ext4.cat("/file"), b"overwritten");
    assert_eq!(ext4.entry("/file").unwrap().mode, 0o100644);
}

#[tokio::test]
async fn hostile_hardlink_dotdot_rejected() {
    let Some(registry) = start_registry() else {
        return;
    };
    let victim = Victim::new();
    let target = format!("{}{}/precious", "../".repeat(20), relative(victim.path()));
    let layer = LayerTar::new().hardlink("stolen", &target).finish();
    let (_dir, _store, result) = pull_layers(
        &registry,
        "hardlink-dotdot:1",
        vec![layer],
        UnpackLimits::default(),
    )
    .await;
    assert_hostile(&result, "'..'");
    victim.assert_untouched();
}

#[tokio::test]
async fn hostile_hardlink_through_symlink_rejected() {
    let Some(registry) = start_registry() else {
        return;
    };
    let victim = Victim::new();
    let mut tar = LayerTar::new();
    tar.symlink("hostdir", &victim.path().display().to_string())
        .hardlink("stolen", "hostdir/precious");
    let (_dir, _store, result) = pull_layers(
        &registry,
        "hardlink-link:1",
        vec![tar.finish()],
        UnpackLimits::default(),
    )
    .await;
    // Resolved inside the tree, the link target does not exist.
    assert_hostile(&result, "missing entry");
    victim.assert_untouched();
    let host_links = std::fs::metadata(victim.path().join("precious")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&host_links), 1);
}

#[tokio::test]
async fn hostile_device_nodes_skipped() {
    let Some(registry) = start_registry() else {
        return;
    };
    let mut tar = LayerTar::new();
    tar.dir("dev", 0o755)
        .char_device("dev/mem", 1, 1)
        .char_device("dev/sda-alias", 8, 0)
        .file("ok", b"ok", 0o644);
    let (_dir, _store, result) = pull_layers(
        &registry,
        "devices:1",
        vec![tar.finish()],
        UnpackLimits::default(),
    )
    .await;
    let image = result.unwrap();
    let ext4 = Ext4::new(&image.rootfs);
    assert!(ext4.names("/dev").is_empty(), "{:?}", ext4.names("/dev"));
    assert_eq!(ext4.cat("/ok"), b"ok");
}

#[tokio::test]
async fn hostile_symlink_loop_rejected() {
    let Some(registry) = start_registry() else {
        return;
    };
    let mut tar = LayerTar::new();
    tar.symlink("a", "b")
        .symlink("b", "a")
        .file("a/x", b"x", 0o644);
    let (_dir, _store, result) = pull_layers(
        &registry,
        "loop:1",
        vec![tar.finish()],
        UnpackLimits::default(),
    )
    .await;
    assert_hostile(&result, "symlink loop");
}

#[tokio::test]
async fn hostile_byte_bomb_stopped() {
    let Some(registry) = start_registry() else {
        return;
    };
    // 64 MiB of zeros gzip to about 64 KiB.
    let zeros = vec![0u8; 64 << 20];
    let layer = LayerTar::new().file("bomb", &zeros, 0o644).finish();
    let limits = UnpackLimits {
        max_bytes: 16 << 20,
        ..UnpackLimits::default()
    };
    let (_dir, store, result) = pull_layers(&registry, "bomb:1", vec![layer], limits).await;
    let error = result.unwrap_err();
    assert!(matches!(error, ImageError::UnpackLimit { .. }), "{error:?}");
    assert!(error.to_string().contains("16777216 bytes"), "{error}");
    assert!(store.list().unwrap().is_empty());
    let unpack_dirs = std::fs::read_dir(store.root().join("tmp"))
        .unwrap()
        .filter(|entry| {
            let name = entry.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("unpack-")
        })
        .count();
    assert_eq!(unpack_dirs, 0, "the partial tree is deleted");
}

#[tokio::test]
async fn hostile_entry_bomb_stopped() {
    let Some(registry) = start_registry() else {
        return;
    };
    let mut tar = LayerTar::new();
    for index in 0..600 {
        tar.file(&format!("f{index}"), b"", 0o644);
    }
    let limits = UnpackLimits {
        max_entries: 500,
        ..UnpackLimits::default()
    };
    let (_dir, _store, result) =
        pull_layers(&registry, "entries:1", vec![tar.finish()], limits).await;
    let error = result.unwrap_err();
    assert!(matches!(error, ImageError::UnpackLimit { .. }), "{error:?}");
    assert!(error.to_string().contains("500 entries"), "{error}");
}

#[tokio::test]
async fn hostile_whiteout_through_symlink_stays_inside() {
    let Some(registry) = start_registry() else {
        return;
    };
    let victim = Victim::new();
    let mut first = LayerTar::new();
    first.symlink("host", &victim.path().display().to_string());
    let mut second = LayerTar::new();
    second.file("host/.wh.precious", b"", 0o644);
    let (_dir, _store, result) = pull_layers(
        &registry,
        "whiteout-escape:1",
        vec![first.finish(), second.finish()],
        UnpackLimits::default(),
    )
    .await;
    // The whiteout resolves inside the tree, where there is nothing to delete.
    result.unwrap();
    victim.assert_untouched();
}

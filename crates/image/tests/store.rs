//! Local store operations: building from a directory, listing, removal and pruning.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use support::Ext4;
use upstream_image::{ImageConfig, ImageError, ImageStore};

fn write_tree(root: &Path) {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        root.join("bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("tool", root.join("bin/sh")).unwrap();
    std::fs::write(root.join("etc/hostname"), b"sandbox\n").unwrap();
    std::os::unix::fs::chown(root.join("etc/hostname"), Some(1234), Some(5678)).unwrap();
    std::fs::create_dir(root.join("run")).unwrap();
}

fn config() -> ImageConfig {
    ImageConfig {
        env: vec!["PATH=/bin".into()],
        working_dir: Some("/".into()),
        ..ImageConfig::default()
    }
}

#[test]
fn import_rootfs_dir_builds_ext4() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    write_tree(&tree);
    let store = ImageStore::open(&work.path().join("store")).unwrap();

    let image = store.import_rootfs_dir("base", &tree, config()).unwrap();
    assert_eq!(image.reference, "docker.io/library/base:latest");
    assert!(image.digest.starts_with("sha256:"));
    assert_eq!(image.id, image.digest);
    assert_eq!(image.config, config());

    let ext4 = Ext4::new(&image.rootfs);
    assert_eq!(ext4.cat("/bin/tool"), b"#!/bin/sh\necho hi\n");
    assert_eq!(ext4.entry("/bin/tool").unwrap().mode, 0o100755);
    assert_eq!(ext4.symlink_target("/bin/sh").as_deref(), Some("tool"));
    let hostname = ext4.entry("/etc/hostname").unwrap();
    assert_eq!((hostname.uid, hostname.gid), (1234, 5678));
    // Added inside the image because the tree lacks them; `run` existed already.
    assert_eq!(ext4.entry("/proc").unwrap().mode, 0o40555);
    assert_eq!(ext4.entry("/tmp").unwrap().mode, 0o41777);
    assert_eq!(ext4.entry("/dev").unwrap().mode, 0o40755);
    assert!(
        !tree.join("proc").exists(),
        "the source tree is not modified"
    );

    assert_eq!(store.get("base").unwrap(), Some(image.clone()));
    assert_eq!(store.get("base:latest").unwrap(), Some(image.clone()));
}

#[test]
fn import_rootfs_dir_reuses_unchanged_tree() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    write_tree(&tree);
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let first = store.import_rootfs_dir("base", &tree, config()).unwrap();
    let modified = std::fs::metadata(&first.rootfs)
        .unwrap()
        .modified()
        .unwrap();

    let second = store
        .import_rootfs_dir("base:copy", &tree, config())
        .unwrap();
    assert_eq!(second.digest, first.digest);
    assert_eq!(second.rootfs, first.rootfs);
    assert_eq!(
        std::fs::metadata(&second.rootfs)
            .unwrap()
            .modified()
            .unwrap(),
        modified
    );

    std::fs::write(tree.join("etc/hostname"), b"changed\n").unwrap();
    let third = store.import_rootfs_dir("base", &tree, config()).unwrap();
    assert_ne!(third.digest, first.digest);
    assert_eq!(Ext4::new(&third.rootfs).cat("/etc/hostname"), b"changed\n");
}

#[test]
fn import_rootfs_dir_rejects_file() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let error = store
        .import_rootfs_dir("base", &file, config())
        .unwrap_err();
    assert!(
        matches!(error, ImageError::InvalidImage { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("not a directory"), "{error}");
}

#[test]
fn get_rejects_invalid_reference() {
    let work = tempfile::tempdir().unwrap();
    let store = ImageStore::open(work.path()).unwrap();
    let error = store.get("Not A Reference").unwrap_err();
    assert!(
        matches!(error, ImageError::InvalidReference { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("'Not A Reference'"), "{error}");
}

#[test]
fn list_touch_remove_prune() {
    let work = tempfile::tempdir().unwrap();
    let tree_a = work.path().join("a");
    let tree_b = work.path().join("b");
    write_tree(&tree_a);
    write_tree(&tree_b);
    std::fs::write(tree_b.join("extra"), b"b").unwrap();
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let a = store.import_rootfs_dir("a", &tree_a, config()).unwrap();
    let a_alias = store
        .import_rootfs_dir("a:alias", &tree_a, config())
        .unwrap();
    let b = store.import_rootfs_dir("b", &tree_b, config()).unwrap();

    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|summary| summary.size > 0));

    store.touch(&b);
    assert_eq!(store.list().unwrap()[0].reference, b.reference);

    // The rootfs stays while another reference uses it.
    store.remove("a").unwrap();
    assert!(store.get("a").unwrap().is_none());
    assert!(a.rootfs.is_file());
    store.remove("a:alias").unwrap();
    assert!(!a_alias.rootfs.exists());

    let error = store.remove("a").unwrap_err();
    assert!(matches!(error, ImageError::NotLocal { .. }), "{error:?}");

    std::fs::write(store.root().join("tmp/leftover.partial"), b"x").unwrap();
    let report = store.prune().unwrap();
    assert_eq!(report.temp_removed, 1);
    assert_eq!(report.rootfs_removed, 0);
    assert!(b.rootfs.is_file());

    store.remove(&b.digest).unwrap();
    assert!(store.list().unwrap().is_empty());
}

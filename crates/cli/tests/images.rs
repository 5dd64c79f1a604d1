//! `upstream exec --image` with images pulled from a real registry on
//! loopback: a Debian (glibc) image and a static busybox image, with their
//! Env, WorkingDir and User honoured.

mod support;

use std::path::Path;
use std::process::{Child, Command};

use support::{text, Home};

/// A `docker-registry` process on a free loopback port, stopped on drop.
struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Option<Registry> {
        if Command::new("docker-registry")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipped: docker-registry is not installed");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let registry = Registry {
            child,
            port,
            _dir: dir,
        };
        let up = support::eventually(std::time::Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "the registry did not start");
        Some(registry)
    }

    /// Pushes an image built from `root` and returns its reference.
    fn push(&self, root: &Path, name: &str, workdir: &str, user: Option<&str>) -> String {
        let layout = root.parent().unwrap().join(format!("{name}-layout"));
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/oci-layout-from-dir.py"
        );
        let mut build = Command::new("python3");
        build.arg(script).arg(root).arg(&layout).arg(workdir);
        if let Some(user) = user {
            build.arg(user);
        }
        assert!(build.status().unwrap().success());
        let status = Command::new("skopeo")
            .args(["copy", "-q", "--dest-tls-verify=false"])
            .arg(format!("oci:{}", layout.display()))
            .arg(format!("docker://127.0.0.1:{}/{name}:1", self.port))
            .status()
            .expect("running skopeo");
        assert!(status.success());
        format!("localhost:{}/{name}:1", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds a root tree with busybox (statically linked, no C library files) and an
/// unprivileged user.
fn busybox_tree(dir: &Path) -> Option<std::path::PathBuf> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        eprintln!("skipped: /bin/busybox is missing; install busybox-static");
        return None;
    }
    let root = dir.join("busybox-root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "id", "pwd", "ls"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        root.join("etc/os-release"),
        "NAME=\"busybox test\"\nID=busybox\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    Some(root)
}

#[test]
fn pulled_images_run_with_their_config() {
    let Some(home) = Home::new() else { return };
    let Some(registry) = Registry::start() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let Some(busybox_root) = busybox_tree(work.path()) else {
        return;
    };

    let busybox = registry.push(&busybox_root, "busybox-test", "/tmp", Some("nobody"));
    let script =
        "cat /etc/os-release; id -u; pwd; echo $GREETING; test -e /lib/libc.so.6 || echo no-glibc";
    let output = home.run(&["exec", "--image", &busybox, "--", "sh", "-c", script]);
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout} {}",
        text(&output.stderr)
    );
    assert!(stdout.contains("ID=busybox"), "{stdout}");
    assert!(
        stdout.contains("\n65534\n/tmp\nfrom-image-config\nno-glibc\n"),
        "{stdout}"
    );
    assert!(text(&output.stderr).contains(&format!("Pulling {busybox} ... done")));

    // The second start uses the cache: no pull line.
    let output = home.run(&["exec", "--image", &busybox, "--", "sh", "-c", "exit 0"]);
    assert_eq!(output.status.code(), Some(0));
    assert!(!text(&output.stderr).contains("Pulling"));

    let listed = text(&home.run(&["image", "ls"]).stdout);
    assert!(listed.contains(&busybox), "{listed}");

    // The image cache is shared with other tests: leave it as it was.
    let output = home.run(&["image", "rm", &busybox]);
    assert_eq!(output.status.code(), Some(0));
    assert!(!text(&home.run(&["image", "ls"]).stdout).contains(&busybox));
}

#[test]
fn unknown_image_names_the_reference() {
    let Some(home) = Home::new() else { return };
    let Some(registry) = Registry::start() else {
        return;
    };
    let reference = format!("localhost:{}/missing:1", registry.port);
    let output = home.run(&["exec", "--image", &reference, "--", "true"]);
    assert_ne!(output.status.code(), Some(0));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("missing"), "{stderr}");
    assert!(home.run_folders().is_empty());
}

//! The store is root's: whatever the umask of the command that made it, other local users can
//! neither read what it holds (span caches hold every byte of the layers, indexes list every
//! file) nor talk to the daemon.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use lazylayer_testkit::require_root;

use crate::common::{EXE, Lazy, indexed_registry, sh};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Runs `sh -c script` as the user nobody.
fn as_nobody(script: &str) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap()
}

#[test]
fn the_store_and_its_socket_are_private_to_root_whatever_the_umask() {
    if !require_root("the_store_and_its_socket_are_private_to_root_whatever_the_umask") {
        return;
    }
    let image = format!("{}/test/debian:bookworm", indexed_registry());
    let lazy = Lazy::new("ext4");
    let root = lazy.root();
    sh(&format!(
        "umask 000; {EXE} --root {} pull {image} >/dev/null 2>&1",
        root.display()
    ));
    assert_eq!(mode(&root), 0o711);
    for dir in ["layers", "spans", "indexes", "images", "run"] {
        assert_eq!(mode(&root.join(dir)), 0o700, "{dir}");
    }
    assert_eq!(mode(&root.join("lazylayer.sock")), 0o600);
    assert_eq!(mode(&root.join("serve.log")), 0o600);
    for record in std::fs::read_dir(root.join("images")).unwrap() {
        assert_eq!(mode(&record.unwrap().path()), 0o600);
    }
    let r = root.display();
    for (what, script) in [
        ("the span caches", format!("cat {r}/spans/*.spans")),
        ("the image records", format!("ls {r}/images")),
        ("the indexes", format!("ls {r}/indexes/sha256")),
        ("the layer trees", format!("ls {r}/layers/sha256")),
        ("the daemon", format!("{EXE} --root {r} status --json")),
    ] {
        let output = as_nobody(&script);
        assert!(
            !output.status.success(),
            "another user reached {what}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    // Root still does.
    assert!(lazy.status()["daemon_running"] == true);
}

#[test]
fn the_daemon_answers_root_only_even_on_a_socket_left_open() {
    if !require_root("the_daemon_answers_root_only_even_on_a_socket_left_open") {
        return;
    }
    let image = format!("{}/test/debian:bookworm", indexed_registry());
    let mut lazy = Lazy::new("ext4");
    let root = lazy.root();
    // A daemon that stays (one started by `pull` leaves once the layer detaches).
    lazy.serve(&[]);
    lazy.ll(&["pull", &image]);
    // Someone loosens the socket's mode: the kernel's word on the peer still turns others away.
    let socket = root.join("lazylayer.sock");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let output = as_nobody(&format!("{EXE} --root {} status --json", root.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(stderr.contains("answers root only"), "{stderr}");
    assert!(lazy.status()["daemon_running"] == true);
}

//! Registry hosts from containerd's hosts.toml: an image named after a registry that cannot be
//! reached is pulled, run and filled lazily through the mirror its hosts.toml names, and the
//! same directory without that file fails as the registry's name says it must.

use crate::common::*;

/// A hosts directory whose `unreachable.invalid/hosts.toml` sends reads to `mirror`.
fn hosts_dir(mirror: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("unreachable.invalid");
    std::fs::create_dir_all(&registry).unwrap();
    std::fs::write(
        registry.join("hosts.toml"),
        format!(
            "server = \"https://unreachable.invalid\"\n\n\
             [host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
    dir
}

#[test]
fn a_mirror_from_hosts_toml_serves_pull_and_lazy_reads() {
    if !lazylayer_testkit::require_root(
        "mirrors::a_mirror_from_hosts_toml_serves_pull_and_lazy_reads",
    ) {
        return;
    }
    let mirror = indexed_registry();
    let hosts = hosts_dir(&mirror);
    let hosts_arg = hosts.path().to_str().unwrap();
    let image = "unreachable.invalid/test/debian:bookworm";
    let mut lazy = Lazy::new("ext4");
    lazy.serve(&["--background-rate", "1", "--hosts-dir", hosts_arg]);
    let root = lazy.root_arg();
    let pulled = run(&["--root", &root, "--hosts-dir", hosts_arg, "pull", image]);
    let said = String::from_utf8_lossy(&pulled.stderr);
    assert!(pulled.status.success(), "{said}");
    assert!(
        said.contains("bound index") && !said.contains("fetching"),
        "the bound index should come through the mirror: {said}"
    );
    let target = lazy.fs.path().join("mnt-mirror");
    std::fs::create_dir_all(&target).unwrap();
    lazy.ll(&[
        "--hosts-dir",
        hosts_arg,
        "mount",
        image,
        target.to_str().unwrap(),
    ]);
    lazy.mounts.push(target.clone());
    // A file read through the overlay is fetched by the daemon from the mirror.
    let reference = Reference::new("bookworm");
    for file in ["usr/bin/perl", "etc/debian_version"] {
        assert_eq!(
            std::fs::read(target.join(file)).unwrap(),
            std::fs::read(reference.path().join(file)).unwrap(),
            "{file}"
        );
    }
    // Without the hosts file, the name is all there is.
    let none = tempfile::tempdir().unwrap();
    let other_root = tempfile::tempdir().unwrap();
    let output = run(&[
        "--root",
        other_root.path().to_str().unwrap(),
        "--hosts-dir",
        none.path().to_str().unwrap(),
        "inspect",
        image,
    ]);
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("unreachable.invalid"), "{error}");
}

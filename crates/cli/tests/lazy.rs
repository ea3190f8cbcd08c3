//! Lazy layers end to end, as root, on ext4 and XFS loop images, served with fanotify and (the
//! `fuse_` tests, the same checks) with FUSE: pull from a real registry,
//! mount with overlayfs, read through the mount while layers are still lazy, every access path,
//! concurrency, a registry that goes away, and detach.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Lazy, Reference, indexed_registry, ok, own_registry, run, sh, walk};
use lazylayer_testkit::fixtures::layout_dir;
use lazylayer_testkit::require_root;
use lazylayer_testkit::tree_diff::diff_trees;

fn lazy_reads_equal_the_extraction(kind: &str, mode: &'static str) {
    let registry = indexed_registry();
    let mut lazy = Lazy::with_mode(kind, mode);
    // Background population held back, so reads find the layers lazy.
    lazy.serve(&["--background-rate", "1"]);
    for (tag, image) in [
        ("layers", "test/layers:latest"),
        ("bookworm", "test/debian:bookworm"),
    ] {
        let reference = Reference::new(tag);
        let mnt = lazy.pull_and_mount(&format!("{registry}/{image}"), tag);
        let before = lazy.status();
        let lazy_layers = before["layers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["phase"] == "lazy")
            .count();
        assert!(lazy_layers > 0, "{before}");
        let differences = diff_trees(&reference.path(), &mnt, true);
        assert!(
            differences.is_empty(),
            "{kind} {tag}: {:#?}",
            &differences[..differences.len().min(20)]
        );
    }
    let status = lazy.status();
    let fetched: u64 = status["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["bytes_fetched"].as_u64().unwrap())
        .sum();
    assert!(fetched > 0, "{status}");
}

#[test]
fn ext4_lazy_reads_equal_the_extraction() {
    if require_root("ext4_lazy_reads_equal_the_extraction") {
        lazy_reads_equal_the_extraction("ext4", "fanotify");
    }
}

#[test]
fn xfs_lazy_reads_equal_the_extraction() {
    if require_root("xfs_lazy_reads_equal_the_extraction") {
        lazy_reads_equal_the_extraction("xfs", "fanotify");
    }
}

#[test]
fn fuse_lazy_reads_equal_the_extraction() {
    if require_root("fuse_lazy_reads_equal_the_extraction") {
        lazy_reads_equal_the_extraction("ext4", "fuse");
    }
}

fn python(script: &str, args: &[&Path]) -> Vec<u8> {
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

fn access_paths(kind: &str, mode: &'static str) {
    use std::os::unix::fs::FileExt;
    let registry = indexed_registry();
    let mut lazy = Lazy::with_mode(kind, mode);
    lazy.serve(&["--background-rate", "1"]);
    let reference = Reference::new("bookworm");
    let mnt = lazy.pull_and_mount(&format!("{registry}/test/debian:bookworm"), "debian");
    let (r, m) = (|p: &str| reference.path().join(p), |p: &str| mnt.join(p));

    // pread in the middle of a large file.
    let libc_so = "usr/lib/x86_64-linux-gnu/libc.so.6";
    let mut got = vec![0u8; 8192];
    std::fs::File::open(m(libc_so))
        .unwrap()
        .read_exact_at(&mut got, 1_000_003)
        .unwrap();
    let mut want = vec![0u8; 8192];
    std::fs::File::open(r(libc_so))
        .unwrap()
        .read_exact_at(&mut want, 1_000_003)
        .unwrap();
    assert!(got == want, "pread");

    // mmap without a prior read (ld.so does this with ld.so.cache).
    let mapped = python(
        "import mmap,sys\nf=open(sys.argv[1],'rb')\nm=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\nsys.stdout.buffer.write(m[:])",
        &[&m("etc/ld.so.cache")],
    );
    assert!(
        mapped == std::fs::read(r("etc/ld.so.cache")).unwrap(),
        "mmap"
    );

    // exec of Debian binaries before any background population.
    let output = Command::new("chroot")
        .arg(&mnt)
        .args([
            "/bin/sh",
            "-c",
            "echo $((6*7)); perl -e 'print 2+3, qq(\\n)'; id -u",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "42\n5\n0\n");

    // copy_file_range (cp) and sendfile.
    let out = tempfile::tempdir().unwrap();
    sh(&format!(
        "cp {} {}",
        m("usr/bin/bash").display(),
        out.path().join("bash").display()
    ));
    assert!(
        std::fs::read(out.path().join("bash")).unwrap()
            == std::fs::read(r("usr/bin/bash")).unwrap(),
        "cp"
    );
    python(
        "import os,sys\ni=os.open(sys.argv[1],os.O_RDONLY)\no=os.open(sys.argv[2],os.O_WRONLY|os.O_CREAT)\nn=os.fstat(i).st_size\nwhile n>0:\n n-=os.sendfile(o,i,None,n)",
        &[&m("usr/bin/dpkg"), &out.path().join("dpkg")],
    );
    assert!(
        std::fs::read(out.path().join("dpkg")).unwrap()
            == std::fs::read(r("usr/bin/dpkg")).unwrap(),
        "sendfile"
    );

    // Copy-up by write, truncate: the mount changes, the layer does not.
    let layer_fs = |p: &str| {
        let layers = lazy.root().join("layers/sha256");
        let hex = std::fs::read_dir(&layers)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        hex.join("fs").join(p)
    };
    let version = std::fs::read(r("etc/debian_version")).unwrap();
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(m("etc/debian_version"))
            .unwrap();
        file.write_all(b"appended\n").unwrap();
    }
    assert_eq!(
        std::fs::read(m("etc/debian_version")).unwrap(),
        [version.clone(), b"appended\n".to_vec()].concat()
    );
    assert_eq!(
        std::fs::read(layer_fs("etc/debian_version")).unwrap(),
        version,
        "the lower is untouched"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(m("etc/adduser.conf"))
        .unwrap()
        .set_len(10)
        .unwrap();
    assert_eq!(
        std::fs::read(m("etc/adduser.conf")).unwrap(),
        std::fs::read(r("etc/adduser.conf")).unwrap()[..10].to_vec()
    );

    // chown copies only metadata up (metacopy); data still comes from the lazy lower.
    let target = "usr/bin/perl5.36.0";
    sh(&format!("chown 1234:4321 {}", m(target).display()));
    let upper = std::fs::read_dir(lazy.root().join("mounts"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("upper");
    let copied = upper.join(target);
    let meta = std::fs::symlink_metadata(&copied).unwrap();
    // No data was copied up (ext4 may spend one block on the xattrs).
    assert!(
        meta.blocks() * 512 <= 4096 && meta.len() > 1 << 20,
        "blocks {} for {} bytes",
        meta.blocks(),
        meta.len()
    );
    let mut value = [0u8; 64];
    assert!(
        rustix::fs::lgetxattr(&copied, "trusted.overlay.metacopy", &mut value[..]).is_ok(),
        "metacopy xattr"
    );
    let through = std::fs::metadata(m(target)).unwrap();
    assert_eq!((through.uid(), through.gid()), (1234, 4321));
    assert!(
        std::fs::read(m(target)).unwrap() == std::fs::read(r(target)).unwrap(),
        "metacopy data"
    );
}

#[test]
fn ext4_access_paths() {
    if require_root("ext4_access_paths") {
        access_paths("ext4", "fanotify");
    }
}

#[test]
fn xfs_access_paths() {
    if require_root("xfs_access_paths") {
        access_paths("xfs", "fanotify");
    }
}

#[test]
fn fuse_access_paths() {
    if require_root("fuse_access_paths") {
        access_paths("ext4", "fuse");
    }
}

#[test]
fn concurrent_readers_during_background_population() {
    if require_root("concurrent_readers_during_background_population") {
        concurrent_readers("fanotify");
    }
}

#[test]
fn fuse_concurrent_readers_during_background_population() {
    if require_root("fuse_concurrent_readers_during_background_population") {
        concurrent_readers("fuse");
    }
}

fn concurrent_readers(mode: &'static str) {
    let registry = indexed_registry();
    let mut lazy = Lazy::with_mode("ext4", mode);
    let reference = Reference::new("bookworm");
    let mnt = lazy.pull_and_mount(&format!("{registry}/test/debian:bookworm"), "debian");
    let mut files = Vec::new();
    for entry in walk(&reference.path()) {
        if std::fs::symlink_metadata(&entry).unwrap().is_file() {
            files.push(entry.strip_prefix(reference.path()).unwrap().to_path_buf());
        }
    }
    files.sort();
    let shared = files[files.len() / 2].clone();
    std::thread::scope(|scope| {
        for t in 0..32usize {
            let (files, shared, mnt, reference) = (&files, &shared, &mnt, &reference);
            scope.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(t as u64);
                for k in 0..40 {
                    let file = if k % 4 == 0 {
                        shared
                    } else {
                        &files[rng.usize(..files.len())]
                    };
                    let got = std::fs::read(mnt.join(file)).unwrap();
                    let want = std::fs::read(reference.path().join(file)).unwrap();
                    assert!(got == want, "{}", file.display());
                }
            });
        }
    });
}

#[test]
fn a_registry_that_goes_away_gives_eio_never_zeros() {
    if require_root("a_registry_that_goes_away_gives_eio_never_zeros") {
        registry_goes_away("fanotify");
    }
}

#[test]
fn fuse_a_registry_that_goes_away_gives_eio_never_zeros() {
    if require_root("fuse_a_registry_that_goes_away_gives_eio_never_zeros") {
        registry_goes_away("fuse");
    }
}

fn registry_goes_away(mode: &'static str) {
    let registry = own_registry();
    let mut lazy = Lazy::with_mode("ext4", mode);
    lazy.serve(&["--background-rate", "1", "--fetch-deadline", "3"]);
    let mnt = lazy.pull_and_mount(
        &format!("{}/test/debian:bookworm", registry.host()),
        "debian",
    );
    drop(registry);
    for file in ["usr/bin/perl5.36.0", "usr/lib/x86_64-linux-gnu/libc.so.6"] {
        for _ in 0..2 {
            let started = Instant::now();
            let error = std::fs::read(mnt.join(file)).expect_err("no data without the registry");
            assert_eq!(error.raw_os_error(), Some(libc::EIO), "{file}: {error}");
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "denied within the budget"
            );
        }
    }
}

fn detach_leaves_a_plain_directory(kind: &str, mode: &'static str) {
    let registry = own_registry();
    let mut lazy = Lazy::with_mode(kind, mode);
    let reference = Reference::new("bookworm");
    let image = format!("{}/test/debian:bookworm", registry.host());
    let mnt = lazy.pull_and_mount(&image, "debian");
    let probes = [
        "etc/os-release",
        "usr/bin/bash",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "usr/share/doc/bash/copyright",
    ];
    let inodes: Vec<u64> = probes
        .iter()
        .map(|p| std::fs::metadata(mnt.join(p)).unwrap().ino())
        .collect();
    let pid = lazy.status()["pid"].as_i64().unwrap();
    lazy.ll(&["detach", "--wait", &image]);
    let status = lazy.status();
    assert!(
        status["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["phase"] == "detached"),
        "{status}"
    );
    drop(registry);
    let after: Vec<u64> = probes
        .iter()
        .map(|p| std::fs::metadata(mnt.join(p)).unwrap().ino())
        .collect();
    assert_eq!(inodes, after, "st_ino is stable across detach");
    let differences = diff_trees(&reference.path(), &mnt, true);
    assert!(
        differences.is_empty(),
        "{kind}: {:#?}",
        &differences[..differences.len().min(20)]
    );
    // The layer directory is what tar -x gives.
    let layers = lazy.root().join("layers/sha256");
    let layer = std::fs::read_dir(&layers)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("fs");
    let differences = diff_trees(&reference.layer(0), &layer, true);
    assert!(
        differences.is_empty(),
        "{kind} layer dir: {:#?}",
        &differences[..differences.len().min(20)]
    );
    // No fanotify mark remains: the daemon left (nothing lazy) or holds no marks.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fdinfo = std::fs::read_dir(format!("/proc/{pid}/fdinfo"));
        let marks = match fdinfo {
            Err(_) => 0,
            Ok(listing) => listing
                .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                .map(|info| {
                    info.lines()
                        .filter(|l| l.starts_with("fanotify ino:"))
                        .count()
                })
                .sum(),
        };
        if marks == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{marks} fanotify marks remain");
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(&["--root", &lazy.root_arg(), "verify", &image]);
}

#[test]
fn ext4_detach_leaves_a_plain_directory() {
    if require_root("ext4_detach_leaves_a_plain_directory") {
        detach_leaves_a_plain_directory("ext4", "fanotify");
    }
}

#[test]
fn xfs_detach_leaves_a_plain_directory() {
    if require_root("xfs_detach_leaves_a_plain_directory") {
        detach_leaves_a_plain_directory("xfs", "fanotify");
    }
}

#[test]
fn fuse_detach_leaves_a_plain_directory() {
    if require_root("fuse_detach_leaves_a_plain_directory") {
        detach_leaves_a_plain_directory("ext4", "fuse");
    }
}

#[test]
fn stores_without_pre_content_support_are_refused_clearly() {
    if !require_root("stores_without_pre_content_support_are_refused_clearly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    sh(&format!("mount -t tmpfs tmpfs {}", dir.path().display()));
    let output = run(&[
        "--root",
        dir.path().join("root").to_str().unwrap(),
        "pull",
        "--mode",
        "fanotify",
        &format!("oci:{}:layers", layout_dir().display()),
    ]);
    let _ = Command::new("umount").arg(dir.path()).status();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("without fanotify pre-content support") && stderr.contains("ext4"),
        "{stderr}"
    );
}

#[test]
fn layers_without_an_index_are_fetched_once_and_verify_catches_damage() {
    if !require_root("layers_without_an_index_are_fetched_once_and_verify_catches_damage") {
        return;
    }
    let mut lazy = Lazy::new("ext4");
    let image = format!("oci:{}:layers", layout_dir().display());
    let root = lazy.root_arg();
    let output = run(&["--root", &root, "pull", &image]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no lazy index; fetching the layer once"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("lazylayer index --push"));
    let target = lazy.fs.path().join("mnt-layers");
    std::fs::create_dir_all(&target).unwrap();
    lazy.ll(&["mount", &image, target.to_str().unwrap()]);
    lazy.mounts.push(target.clone());
    let reference = Reference::new("layers");
    assert!(diff_trees(&reference.path(), &target, true).is_empty());
    lazy.ll(&["detach", "--wait", &image]);
    ok(&["--root", &root, "verify", &image]);
    // Damage one populated file in a layer directory: verify names it and fails.
    let layers = lazy.root().join("layers/sha256");
    let damaged = std::fs::read_dir(&layers)
        .unwrap()
        .map(|e| e.unwrap().path().join("fs/etc/hello.txt"))
        .find(|p| p.exists())
        .unwrap();
    let original = std::fs::read(&damaged).unwrap();
    std::fs::write(&damaged, original.to_ascii_uppercase()).unwrap();
    let output = run(&["--root", &root, "verify", &image]);
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("etc/hello.txt") && stdout.contains("content differs"),
        "{stdout}"
    );
}

//! Lazy layers end to end, as root, on ext4 and XFS loop images: pull from a real registry,
//! mount with overlayfs, read through the mount while layers are still lazy, every access path,
//! concurrency, a registry that goes away, and detach.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lazylayer_testkit::fixtures::{layout_dir, shared_registry, skopeo_copy};
use lazylayer_testkit::registry::{RegistryAuth, TestRegistry};
use lazylayer_testkit::require_root;
use lazylayer_testkit::tree_diff::{diff_trees, extract_layer};

const EXE: &str = env!("CARGO_BIN_EXE_lazylayer");

fn run(args: &[&str]) -> Output {
    Command::new(EXE)
        .args(args)
        .env_remove("LAZYLAYER_LOG")
        .output()
        .expect("run lazylayer")
}

fn ok(args: &[&str]) -> String {
    let output = run(args);
    assert!(
        output.status.success(),
        "lazylayer {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn sh(command: &str) {
    let status = Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
        .expect("sh");
    assert!(status.success(), "{command}");
}

/// A filesystem image (ext4 or xfs) loop-mounted for a store.
struct LoopFs {
    dir: tempfile::TempDir,
}

impl LoopFs {
    fn new(kind: &str) -> LoopFs {
        let dir = tempfile::Builder::new()
            .prefix("lazylayer-fs.")
            .tempdir()
            .unwrap();
        let image = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        sh(&format!("truncate -s 3G {}", image.display()));
        match kind {
            "xfs" => sh(&format!("mkfs.xfs -q -f {}", image.display())),
            _ => sh(&format!("mkfs.ext4 -q -F {}", image.display())),
        }
        sh(&format!(
            "mount -o loop {} {}",
            image.display(),
            mnt.display()
        ));
        LoopFs { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// A store on a loop filesystem, its daemon and its mounts; all cleaned up on drop.
struct Lazy {
    fs: LoopFs,
    serve: Option<Child>,
    mounts: Vec<PathBuf>,
}

impl Lazy {
    fn new(kind: &str) -> Lazy {
        Lazy {
            fs: LoopFs::new(kind),
            serve: None,
            mounts: Vec::new(),
        }
    }

    fn root(&self) -> PathBuf {
        self.fs.path().join("root")
    }

    fn root_arg(&self) -> String {
        self.root().display().to_string()
    }

    /// Starts the daemon with these extra options (before any pull starts one on demand).
    fn serve(&mut self, extra: &[&str]) {
        std::fs::create_dir_all(self.root()).unwrap();
        let child = Command::new(EXE)
            .args(["--root", &self.root_arg(), "serve"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.serve = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.root().join("lazylayer.sock").exists() {
            assert!(Instant::now() < deadline, "serve did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ll(&self, args: &[&str]) -> String {
        let root = self.root_arg();
        let mut all = vec!["--root", root.as_str()];
        all.extend_from_slice(args);
        ok(&all)
    }

    fn pull_and_mount(&mut self, image: &str, name: &str) -> PathBuf {
        self.ll(&["pull", image]);
        let target = self.fs.path().join(format!("mnt-{name}"));
        std::fs::create_dir_all(&target).unwrap();
        self.ll(&["mount", image, target.to_str().unwrap()]);
        self.mounts.push(target.clone());
        target
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ll(&["status", "--json"])).unwrap()
    }
}

impl Drop for Lazy {
    fn drop(&mut self) {
        for target in &self.mounts {
            let _ = Command::new("umount").arg("-l").arg(target).status();
        }
        if let Some(mut child) = self.serve.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A daemon started on demand: ask it to stop.
        if let Ok(status) = serde_json::from_str::<serde_json::Value>(&String::from_utf8_lossy(
            &run(&["--root", &self.root_arg(), "status", "--json"]).stdout,
        )) && status["daemon_running"] == true
        {
            let pid = status["pid"].as_i64().unwrap_or(0) as i32;
            if pid > 0 {
                // SAFETY: sending a signal to a process id has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// The shared registry, with lazy indexes pushed for the Debian and multi-layer images.
fn indexed_registry() -> String {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let host = shared_registry().host();
        let scratch = tempfile::tempdir().unwrap();
        for image in ["test/debian:bookworm", "test/layers:latest"] {
            ok(&[
                "--root",
                scratch.path().to_str().unwrap(),
                "index",
                "--push",
                &format!("{host}/{image}"),
            ]);
        }
        host
    })
    .clone()
}

/// The layer blobs of a fixture image, bottom first.
fn layer_blobs(tag: &str) -> Vec<PathBuf> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout_dir().join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout_dir().join("blobs/sha256").join(manifest_digest)).unwrap(),
    )
    .unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            layout_dir()
                .join("blobs/sha256")
                .join(l["digest"].as_str().unwrap().trim_start_matches("sha256:"))
        })
        .collect()
}

/// The reference view of an image: an overlay (mounted by util-linux mount) over GNU tar
/// extractions of its layers. Unmounted on drop.
struct Reference {
    dir: tempfile::TempDir,
}

impl Reference {
    fn new(tag: &str) -> Reference {
        let dir = tempfile::Builder::new()
            .prefix("lazylayer-ref.")
            .tempdir()
            .unwrap();
        let mut lowers = Vec::new();
        for (i, blob) in layer_blobs(tag).iter().enumerate() {
            let layer = dir.path().join(format!("layer{i}"));
            extract_layer(blob, &layer);
            lowers.push(layer.display().to_string());
        }
        lowers.reverse();
        let mnt = dir.path().join("mnt");
        if lowers.len() == 1 {
            // overlayfs needs two lowers without an upper; one layer is its own view.
            std::os::unix::fs::symlink(&lowers[0], &mnt).unwrap();
        } else {
            std::fs::create_dir(&mnt).unwrap();
            sh(&format!(
                "mount -t overlay overlay -o lowerdir={} {}",
                lowers.join(":"),
                mnt.display()
            ));
        }
        Reference { dir }
    }

    fn path(&self) -> PathBuf {
        let mnt = self.dir.path().join("mnt");
        std::fs::read_link(&mnt).unwrap_or(mnt)
    }

    fn layer(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("layer{i}"))
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

fn lazy_reads_equal_the_extraction(kind: &str) {
    let registry = indexed_registry();
    let mut lazy = Lazy::new(kind);
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
        lazy_reads_equal_the_extraction("ext4");
    }
}

#[test]
fn xfs_lazy_reads_equal_the_extraction() {
    if require_root("xfs_lazy_reads_equal_the_extraction") {
        lazy_reads_equal_the_extraction("xfs");
    }
}

/// A registry of its own (to stop it), holding the Debian image and its pushed index.
fn own_registry() -> TestRegistry {
    let registry = TestRegistry::start(RegistryAuth::Anonymous).unwrap();
    skopeo_copy(
        &format!("oci:{}:bookworm", layout_dir().display()),
        &format!("docker://{}/test/debian:bookworm", registry.host()),
        &[],
    );
    let scratch = tempfile::tempdir().unwrap();
    ok(&[
        "--root",
        scratch.path().to_str().unwrap(),
        "index",
        "--push",
        &format!("{}/test/debian:bookworm", registry.host()),
    ]);
    registry
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

fn access_paths(kind: &str) {
    use std::os::unix::fs::FileExt;
    let registry = indexed_registry();
    let mut lazy = Lazy::new(kind);
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
        access_paths("ext4");
    }
}

#[test]
fn xfs_access_paths() {
    if require_root("xfs_access_paths") {
        access_paths("xfs");
    }
}

#[test]
fn concurrent_readers_during_background_population() {
    if !require_root("concurrent_readers_during_background_population") {
        return;
    }
    let registry = indexed_registry();
    let mut lazy = Lazy::new("ext4");
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

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if std::fs::symlink_metadata(&path).unwrap().is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

#[test]
fn a_registry_that_goes_away_gives_eio_never_zeros() {
    if !require_root("a_registry_that_goes_away_gives_eio_never_zeros") {
        return;
    }
    let registry = own_registry();
    let mut lazy = Lazy::new("ext4");
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

fn detach_leaves_a_plain_directory(kind: &str) {
    let registry = own_registry();
    let mut lazy = Lazy::new(kind);
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
        detach_leaves_a_plain_directory("ext4");
    }
}

#[test]
fn xfs_detach_leaves_a_plain_directory() {
    if require_root("xfs_detach_leaves_a_plain_directory") {
        detach_leaves_a_plain_directory("xfs");
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

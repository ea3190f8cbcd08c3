//! Lazy layers end to end, as root, on ext4 and XFS loop images, served with fanotify and (the
//! `fuse_` tests, the same checks) with FUSE: pull from a real registry,
//! mount with overlayfs, read through the mount while layers are still lazy, every access path,
//! concurrency, readers of one file sharing its fetch, a registry that goes away, and detach.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{
    Lazy, Reference, all_detached, bytes_fetched, indexed_registry, layer_hexes, ok, own_registry,
    push_indexed, run, sh, wait_for_status, walk,
};
use lazylayer_testkit::fixtures::layout_dir;
use lazylayer_testkit::proxy::{FaultProxy, Shaping};
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
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let registry = indexed_registry();
    let mut lazy = Lazy::with_mode(kind, mode);
    lazy.serve(&["--background-rate", "1"]);
    let reference = Reference::new("bookworm");
    let mnt = lazy.pull_and_mount(&format!("{registry}/test/debian:bookworm"), "debian");
    let (r, m) = (|p: &str| reference.path().join(p), |p: &str| mnt.join(p));
    let layer_fs = |p: &str| lazy.layer_fs(&layer_hexes("bookworm")[0]).join(p);
    // Blocks of a file's placeholder in the layer directory: 0 until it is filled.
    let blocks = |p: &str| std::fs::metadata(layer_fs(p)).unwrap().blocks();
    let upper = std::fs::read_dir(lazy.root().join("mounts"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("upper");

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

    // exec of Debian binaries before any background population: the shell and perl are still
    // unfilled placeholders, so exec is what fills them.
    let binaries = ["usr/bin/dash", "usr/bin/perl"];
    for binary in binaries {
        assert_eq!(blocks(binary), 0, "{binary} is filled before exec");
    }
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
    for binary in binaries {
        assert!(blocks(binary) > 0, "{binary} is filled after exec");
    }

    // splice from a file not read yet, through a pipe.
    let spliced = "usr/bin/tar";
    assert_eq!(blocks(spliced), 0, "{spliced} is filled before splice");
    let source = std::fs::File::open(m(spliced)).unwrap();
    let (mut pipe_out, pipe_in) = std::io::pipe().unwrap();
    let (mut got, mut offset) = (Vec::new(), 0 as libc::loff_t);
    loop {
        // SAFETY: both descriptors are open for the whole call; `offset` is a live local the
        // kernel reads and advances; a null output offset is allowed for a pipe.
        let n = unsafe {
            libc::splice(
                source.as_raw_fd(),
                &mut offset,
                pipe_in.as_raw_fd(),
                std::ptr::null_mut(),
                64 << 10,
                0,
            )
        };
        assert!(n >= 0, "splice: {}", std::io::Error::last_os_error());
        if n == 0 {
            break;
        }
        let mut chunk = vec![0u8; n as usize];
        pipe_out.read_exact(&mut chunk).unwrap();
        got.extend_from_slice(&chunk);
    }
    assert!(got == std::fs::read(r(spliced)).unwrap(), "splice");

    // copy_file_range from a file not read yet to a new file in the mount: the copy lands in
    // the upper directory, on the layer's filesystem, so with fanotify the kernel copies
    // between the two (no EXDEV fallback to read and write). With FUSE the lower is the FUSE
    // filesystem: the kernel refuses, as between any two filesystems, and a program copies
    // some other way.
    let copy_source = "usr/bin/grep";
    assert_eq!(
        blocks(copy_source),
        0,
        "{copy_source} is filled before copy_file_range"
    );
    let mut source = std::fs::File::open(m(copy_source)).unwrap();
    let mut destination = std::fs::File::create(m("grep-copy")).unwrap();
    let size = source.metadata().unwrap().len();
    let mut left = size;
    while left > 0 {
        // SAFETY: both descriptors are open for the whole call; null offsets make the kernel
        // use and advance the files' own positions.
        let n = unsafe {
            libc::copy_file_range(
                source.as_raw_fd(),
                std::ptr::null_mut(),
                destination.as_raw_fd(),
                std::ptr::null_mut(),
                left as usize,
                0,
            )
        };
        let error = std::io::Error::last_os_error();
        if n < 0 && mode == "fuse" && left == size && error.raw_os_error() == Some(libc::EXDEV) {
            std::io::copy(&mut source, &mut destination).unwrap();
            break;
        }
        assert!(n > 0, "copy_file_range: {error}");
        left -= n as u64;
    }
    drop(destination);
    assert_eq!(
        std::fs::metadata(upper.join("grep-copy")).unwrap().dev(),
        std::fs::metadata(layer_fs(copy_source)).unwrap().dev(),
        "the copy is on the layer's filesystem"
    );
    assert!(
        std::fs::read(m("grep-copy")).unwrap() == std::fs::read(r(copy_source)).unwrap(),
        "copy_file_range"
    );

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

fn concurrent_readers(kind: &str, mode: &'static str) {
    let registry = indexed_registry();
    let mut lazy = Lazy::with_mode(kind, mode);
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

fn registry_goes_away(kind: &str, mode: &'static str) {
    let registry = own_registry();
    let mut lazy = Lazy::with_mode(kind, mode);
    lazy.serve(&["--background-rate", "1", "--fetch-deadline", "3"]);
    let mnt = lazy.pull_and_mount(
        &format!("{}/test/debian:bookworm", registry.host()),
        "debian",
    );
    drop(registry);
    // Not libc, ld.so or the files in etc: those are fetched first at take-up (startup
    // files), perhaps before the registry went.
    for file in [
        "usr/bin/perl5.36.0",
        "usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30",
    ] {
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

fn same_file_readers_share_one_fetch(kind: &str, mode: &'static str) {
    let registry = indexed_registry();
    // A slow link, so that the readers all arrive while the file's spans are in flight.
    let proxy = FaultProxy::start(registry.parse().unwrap(), Shaping::link(40, 100)).unwrap();
    let mut lazy = Lazy::with_mode(kind, mode);
    lazy.serve(&["--background-rate", "1"]);
    let reference = Reference::new("bookworm");
    let image = format!("{}/test/debian:bookworm", proxy.host());
    let mnt = lazy.pull_and_mount(&image, "debian");
    let file = "usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30";

    // The compressed bytes of the spans holding the file, from its lazy index.
    let inspect: serde_json::Value =
        serde_json::from_str(&lazy.ll(&["inspect", "--json", "--files", &image])).unwrap();
    let index = &inspect["layers"][0]["index"];
    let entry = index["fileTable"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == file)
        .unwrap();
    let (first, last) = (
        entry["spans"][0].as_u64().unwrap() as usize,
        entry["spans"][1].as_u64().unwrap() as usize,
    );
    let spans = index["spanTable"].as_array().unwrap();
    // A read fetches from the checkpoint of the file's first span.
    let first = spans[first]["checkpoint"].as_u64().unwrap() as usize;
    let span_bytes = spans[last]["compressedEnd"].as_u64().unwrap()
        - spans[first]["compressedStart"].as_u64().unwrap();

    // The startup files (libc the last of them) are fetched first; the held-back background
    // then fills the first files and waits for about a second per byte it fetched: start once
    // both are done, with the file still unfilled.
    let layer_fs = lazy.layer_fs(&layer_hexes("bookworm")[0]);
    let libc = layer_fs.join("usr/lib/x86_64-linux-gnu/libc.so.6");
    wait_for_status(
        &lazy,
        "the startup files and the background's first fetch",
        |s| bytes_fetched(s) > 0 && std::fs::metadata(&libc).is_ok_and(|m| m.blocks() > 0),
    );
    assert_eq!(
        std::fs::metadata(layer_fs.join(file)).unwrap().blocks(),
        0,
        "{file} is unfilled"
    );
    let blob_gets = || {
        proxy
            .exchanges()
            .iter()
            .filter(|e| e.method == "GET" && e.target.contains("/blobs/"))
            .count()
    };
    let (fetched_before, gets_before) = (bytes_fetched(&lazy.status()), blob_gets());

    let want = std::fs::read(reference.path().join(file)).unwrap();
    let barrier = std::sync::Barrier::new(32);
    std::thread::scope(|scope| {
        for _ in 0..32 {
            scope.spawn(|| {
                barrier.wait();
                let got = std::fs::read(mnt.join(file)).unwrap();
                assert!(got == want, "{file}");
            });
        }
    });
    let fetched = bytes_fetched(&lazy.status()) - fetched_before;
    let gets = blob_gets() - gets_before;
    // Each of the file's spans once (32 readers fetching for themselves would be 32 times
    // that); nothing else fetches meanwhile, the background waits about a second per byte it
    // fetched. The slack is far below one more copy of the spans.
    assert!(
        fetched <= span_bytes + (64 << 10),
        "{fetched} bytes fetched for 32 readers of a file in spans {first}..={last} of {span_bytes} bytes"
    );
    assert!(
        gets <= last - first + 1,
        "{gets} blob requests for a file in {} spans",
        last - first + 1
    );
}

/// Whether process `pid` runs (exists and is not a zombie).
fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        !matches!(state, None | Some('Z' | 'X'))
    })
}

/// The `fanotify ino:` lines (one per inode mark of a fanotify group) in the fdinfo of every
/// descriptor of the running process `pid`. Fails when the process is gone or its fdinfo cannot
/// be read: an fdinfo nobody could read must not pass for "no marks".
fn fanotify_marks(pid: i64) -> Vec<String> {
    assert!(alive(pid), "process {pid} is not running");
    let dir = format!("/proc/{pid}/fdinfo");
    let listing = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
    let (mut marks, mut read) = (Vec::new(), 0);
    for entry in listing {
        let entry = entry.unwrap_or_else(|e| panic!("{dir}: {e}"));
        match std::fs::read_to_string(entry.path()) {
            Ok(info) => {
                read += 1;
                marks.extend(
                    info.lines()
                        .filter(|l| l.starts_with("fanotify ino:"))
                        .map(str::to_string),
                );
            }
            // A descriptor closed between the listing and the read (a status connection).
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && !Path::new(&format!("/proc/{pid}/fd"))
                        .join(entry.file_name())
                        .exists() => {}
            Err(e) => panic!("{}: {e}", entry.path().display()),
        }
    }
    assert!(read > 0, "no readable fdinfo in {dir}");
    assert!(alive(pid), "process {pid} exited while its fdinfo was read");
    marks
}

/// The kernel's fanotify marks held by the daemon's processes (holder and worker) that
/// `status` names; a mark shows once per process holding the group.
fn daemon_marks(status: &serde_json::Value) -> Vec<String> {
    ["pid", "worker_pid"]
        .iter()
        .flat_map(|key| fanotify_marks(status[key].as_i64().unwrap()))
        .collect()
}

/// Whether `marks` hold a mark on the inode of `path` (fdinfo shows inode numbers in hex).
fn marked(marks: &[String], path: &Path) -> bool {
    let prefix = format!("fanotify ino:{:x} ", std::fs::metadata(path).unwrap().ino());
    marks.iter().any(|m| m.starts_with(&prefix))
}

/// Polls the daemon's kernel marks until `done` holds (ten seconds at most).
fn wait_for_marks(lazy: &Lazy, what: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let marks = daemon_marks(&lazy.status());
        if done(&marks) {
            return marks;
        }
        assert!(Instant::now() < deadline, "{what}: {marks:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn detach_leaves_a_plain_directory(kind: &str, mode: &'static str) {
    let registry = own_registry();
    push_indexed(&registry.host(), "layers", "test/layers:latest");
    let mut lazy = Lazy::with_mode(kind, mode);
    // A daemon that stays (no --exit-when-idle), so its descriptors can be checked after
    // detach; background held back, so the layers are lazy until detach forces them.
    lazy.serve(&["--background-rate", "1"]);
    let reference = Reference::new("bookworm");
    let layers_reference = Reference::new("layers");
    let image = format!("{}/test/debian:bookworm", registry.host());
    let layers_image = format!("{}/test/layers:latest", registry.host());
    let mnt = lazy.pull_and_mount(&image, "debian");
    let layers_mnt = lazy.pull_and_mount(&layers_image, "layers");
    let status = lazy.status();
    assert_eq!(
        status["pid"].as_i64(),
        Some(i64::from(lazy.serve.as_ref().unwrap().id())),
        "the daemon is the one the test started: {status}"
    );

    // Whiteouts and opaque directories of the upper layers hide the lower files while lazy.
    let layers_lazy = |status: &serde_json::Value| {
        status["layers"].as_array().unwrap().iter().any(|l| {
            l["phase"] == "lazy"
                && layer_hexes("layers")
                    .iter()
                    .any(|h| l["digest"] == format!("sha256:{h}"))
        })
    };
    assert!(layers_lazy(&status), "{status}");
    for hidden in [
        "remove-me.txt",
        "remove-dir",
        "opaque-dir/top-file",
        "opaque-dir/keep-not",
    ] {
        assert!(
            std::fs::symlink_metadata(layers_reference.layer(0).join(hidden)).is_ok(),
            "the lowest layer holds {hidden}"
        );
        assert!(
            std::fs::symlink_metadata(layers_mnt.join(hidden))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound),
            "{hidden} shows through the mount"
        );
    }
    assert_eq!(
        std::fs::read(layers_mnt.join("opaque-dir/new/file")).unwrap(),
        b"visible after opaque\n"
    );

    let debian_fs = lazy.layer_fs(&layer_hexes("bookworm")[0]);
    if mode == "fanotify" {
        // Reading a file fully fills it, and its kernel mark goes.
        let file = "usr/bin/tar";
        let placeholder = debian_fs.join(file);
        let after_pull = wait_for_marks(&lazy, "the file is marked after pull", |marks| {
            marked(marks, &placeholder)
        });
        assert_eq!(
            std::fs::metadata(&placeholder).unwrap().blocks(),
            0,
            "{file} is unfilled"
        );
        assert!(
            std::fs::read(mnt.join(file)).unwrap()
                == std::fs::read(reference.path().join(file)).unwrap(),
            "{file}"
        );
        let after_read = wait_for_marks(&lazy, "the mark of a read file goes", |marks| {
            !marked(marks, &placeholder)
        });
        assert!(
            after_read.len() < after_pull.len(),
            "{} marks after pull, {} after reading {file}",
            after_pull.len(),
            after_read.len()
        );
    }

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
    lazy.ll(&["detach", "--wait", &image]);
    lazy.ll(&["detach", "--wait", &layers_image]);
    let status = lazy.status();
    assert!(all_detached(&status), "{status}");
    drop(registry);
    let after: Vec<u64> = probes
        .iter()
        .map(|p| std::fs::metadata(mnt.join(p)).unwrap().ino())
        .collect();
    assert_eq!(inodes, after, "st_ino is stable across detach");
    for (mount, reference) in [(&mnt, &reference), (&layers_mnt, &layers_reference)] {
        let differences = diff_trees(&reference.path(), mount, true);
        assert!(
            differences.is_empty(),
            "{kind} {}: {:#?}",
            mount.display(),
            &differences[..differences.len().min(20)]
        );
    }
    // Each layer directory is what tar -x gives, whiteouts in overlay form.
    for (tag, reference) in [("bookworm", &reference), ("layers", &layers_reference)] {
        for (i, hex) in layer_hexes(tag).iter().enumerate() {
            let differences = diff_trees(&reference.layer(i), &lazy.layer_fs(hex), true);
            assert!(
                differences.is_empty(),
                "{kind} {tag} layer {i} dir: {:#?}",
                &differences[..differences.len().min(20)]
            );
        }
    }
    // The daemon is still running, and no fanotify mark remains in either of its processes.
    let status = lazy.status();
    for key in ["pid", "worker_pid"] {
        let pid = status[key].as_i64().unwrap();
        assert!(pid > 0 && alive(pid), "{key} {pid} is running: {status}");
    }
    wait_for_marks(
        &lazy,
        "fanotify marks remain after detach",
        <[String]>::is_empty,
    );
    ok(&["--root", &lazy.root_arg(), "verify", &image]);
    ok(&["--root", &lazy.root_arg(), "verify", &layers_image]);
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
        stderr.contains("no usable lazy index; fetching the layer once"),
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

#[test]
fn an_unindexed_image_from_a_registry_is_fetched_once() {
    if !require_root("an_unindexed_image_from_a_registry_is_fetched_once") {
        return;
    }
    // A registry holding the multi-layer image without lazy indexes, behind a proxy that
    // records every request.
    let registry = lazylayer_testkit::registry::TestRegistry::start(
        lazylayer_testkit::registry::RegistryAuth::Anonymous,
    )
    .unwrap();
    lazylayer_testkit::fixtures::skopeo_copy(
        &format!("oci:{}:layers", layout_dir().display()),
        &format!("docker://{}/test/layers:latest", registry.host()),
        &[],
    );
    let proxy = FaultProxy::start(registry.addr(), Shaping::default()).unwrap();
    let image = format!("{}/test/layers:latest", proxy.host());
    let mut lazy = Lazy::new("ext4");
    let output = run(&["--root", &lazy.root_arg(), "pull", &image]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("no usable lazy index; fetching the layer once"),
        "{stderr}"
    );
    let target = lazy.fs.path().join("mnt-layers");
    std::fs::create_dir_all(&target).unwrap();
    lazy.ll(&["mount", &image, target.to_str().unwrap()]);
    lazy.mounts.push(target.clone());
    assert!(diff_trees(&Reference::new("layers").path(), &target, true).is_empty());
    lazy.ll(&["detach", "--wait", &image]);
    lazy.ll(&["verify", &image]);

    let exchanges = proxy.exchanges();
    let inspect: serde_json::Value =
        serde_json::from_str(&lazy.ll(&["inspect", "--json", &image])).unwrap();
    let status = lazy.status();
    for layer in inspect["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        // Every byte the registry served is counted, also those fetched to build the index.
        let shown = status["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["digest"] == digest)
            .unwrap();
        assert_eq!(shown["bytes_fetched"], layer["size"], "{status}");
        let gets: Vec<_> = exchanges
            .iter()
            .filter(|e| e.method == "GET" && e.target.ends_with(&format!("/blobs/{digest}")))
            .collect();
        assert_eq!(
            gets.len(),
            1,
            "layer {digest} was requested {} times: {gets:?}",
            gets.len()
        );
        assert_eq!(gets[0].status, 200);
    }
}

on_every_store!(
    lazy_reads_equal_the_extraction,
    access_paths,
    concurrent_readers,
    registry_goes_away,
    same_file_readers_share_one_fetch,
    detach_leaves_a_plain_directory,
);

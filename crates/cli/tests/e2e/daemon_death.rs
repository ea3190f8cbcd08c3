//! The daemon dies under a workload reading a lazy image. The worker is killed with SIGKILL
//! five times at random moments: readers wait and get the right bytes (never zeros, never an
//! error), the holder starts a new worker each time, and population completes and detaches.
//! The holder is killed: the worker keeps the fanotify group and goes on alone.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::{
    Lazy, Reference, all_detached, assert_same_tree, indexed_registry, wait_for_status, walk,
};
use lazylayer_testkit::proxy::{FaultProxy, Shaping};
use lazylayer_testkit::require_root;

fn pids(lazy: &Lazy) -> (i32, i32) {
    let status = lazy.status();
    (
        status["pid"].as_i64().unwrap() as i32,
        status["worker_pid"].as_i64().unwrap() as i32,
    )
}

fn kill(pid: i32) {
    // SAFETY: sending a signal to a process id has no memory-safety preconditions.
    let sent = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(sent, 0, "kill {pid}");
}

/// The regular files of a tree, relative, in walk order.
fn regular_files(root: &Path) -> Vec<PathBuf> {
    walk(root)
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).unwrap().is_file())
        .map(|p| p.strip_prefix(root).unwrap().to_path_buf())
        .collect()
}

/// Reads every file through the mount, comparing each with the reference, until every file
/// was read once and `keep_going` is false; returns how many reads were made.
fn read_everything(
    mnt: &Path,
    reference: &Path,
    files: &[PathBuf],
    keep_going: &AtomicBool,
) -> usize {
    let mut reads = 0;
    let mut round = 0;
    loop {
        for file in files {
            let got = std::fs::read(mnt.join(file))
                .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
            let want = std::fs::read(reference.join(file)).unwrap();
            assert!(
                got == want,
                "{}: {} bytes differ from the extraction",
                file.display(),
                got.iter().zip(&want).filter(|(a, b)| a != b).count()
                    + got.len().abs_diff(want.len())
            );
            reads += 1;
        }
        round += 1;
        if !keep_going.load(Ordering::SeqCst) || round > 50 {
            return reads;
        }
    }
}

/// The Debian image pulled lazily over a shaped link (so that reading it lasts long enough to
/// be interrupted), mounted, with its reference extraction and its regular files.
struct Setup {
    lazy: Lazy,
    _proxy: FaultProxy,
    reference: Reference,
    image: String,
    mnt: PathBuf,
    files: Vec<PathBuf>,
}

impl Setup {
    fn new() -> Setup {
        Setup::with_mode("auto")
    }

    fn with_mode(mode: &'static str) -> Setup {
        let registry = indexed_registry();
        let proxy = FaultProxy::start(registry.parse().unwrap(), Shaping::link(100, 20)).unwrap();
        let mut lazy = Lazy::with_mode("ext4", mode);
        lazy.serve(&["--background-rate", "300000"]);
        let reference = Reference::new("bookworm");
        let image = format!("{}/test/debian:bookworm", proxy.host());
        let mnt = lazy.pull_and_mount(&image, "debian");
        let files = regular_files(&reference.path());
        Setup {
            lazy,
            _proxy: proxy,
            reference,
            image,
            mnt,
            files,
        }
    }
}

#[test]
fn killing_the_worker_five_times_never_shows_a_reader_wrong_data() {
    if require_root("killing_the_worker_five_times_never_shows_a_reader_wrong_data") {
        kill_the_worker_five_times("fanotify");
    }
}

/// FUSE mode: the holder serves the FUSE mounts, so the workload's overlay keeps working while
/// workers die and restart (the restart of `serve`'s working half during reads).
#[test]
fn fuse_killing_the_worker_five_times_never_shows_a_reader_wrong_data() {
    if require_root("fuse_killing_the_worker_five_times_never_shows_a_reader_wrong_data") {
        kill_the_worker_five_times("fuse");
    }
}

fn kill_the_worker_five_times(mode: &'static str) {
    let Setup {
        lazy,
        _proxy,
        reference,
        image,
        mnt,
        files,
    } = Setup::with_mode(mode);
    assert!(files.len() > 1000, "{} files", files.len());
    assert_eq!(lazy.status()["layers"][0]["mode"], mode);
    let (holder, first_worker) = pids(&lazy);
    let killing = AtomicBool::new(true);
    let mut killed = Vec::new();
    let reads = std::thread::scope(|scope| {
        let reader = scope.spawn(|| read_everything(&mnt, &reference.path(), &files, &killing));
        let mut rng = fastrand::Rng::with_seed(7);
        let mut worker = first_worker;
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(rng.u64(100..900)));
            kill(worker);
            killed.push(worker);
            // The holder starts the next worker; commands queue on the socket meanwhile.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let (now_holder, now_worker) = pids(&lazy);
                assert_eq!(now_holder, holder, "the holder survives its workers");
                if now_worker != worker {
                    worker = now_worker;
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "no new worker after killing {worker}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                !reader.is_finished(),
                "the workload finished before kill {}: nothing was interrupted",
                killed.len()
            );
        }
        killing.store(false, Ordering::SeqCst);
        reader
            .join()
            .expect("the workload saw no error and no wrong byte")
    });
    assert_eq!(killed.len(), 5);
    assert!(reads >= files.len());
    lazy.ll(&["detach", "--wait", &image]);
    wait_for_status(&lazy, "never detached", all_detached);
    assert_same_tree(&reference.path(), &mnt);
    // Every layer checks out against its index and blob digest (non-zero exit otherwise).
    lazy.ll(&["verify", &image]);
}

#[test]
fn killing_the_holder_leaves_the_worker_serving_the_group() {
    if !require_root("killing_the_holder_leaves_the_worker_serving_the_group") {
        return;
    }
    let Setup {
        lazy,
        _proxy,
        reference,
        image,
        mnt,
        files,
    } = Setup::new();
    let (holder, worker) = pids(&lazy);
    let keep_going = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| read_everything(&mnt, &reference.path(), &files, &keep_going));
        std::thread::sleep(Duration::from_millis(700));
        assert!(!reader.is_finished(), "the workload finished too soon");
        kill(holder);
        reader
            .join()
            .expect("the workload saw no error and no wrong byte");
    });
    // The worker answers commands on (with the holder's pid as the daemon's) and completes.
    let (_, still) = pids(&lazy);
    assert_eq!(still, worker);
    lazy.ll(&["detach", "--wait", &image]);
    wait_for_status(&lazy, "never detached", all_detached);
    assert_same_tree(&reference.path(), &mnt);
}

fn signal(pid: i32, signal: i32) {
    // SAFETY: sending a signal to a process id has no memory-safety preconditions.
    let sent = unsafe { libc::kill(pid, signal) };
    assert_eq!(sent, 0, "kill -{signal} {pid}");
}

#[test]
fn an_event_no_worker_answers_is_denied_by_the_holder_after_twice_the_deadline() {
    if !require_root("an_event_no_worker_answers_is_denied_by_the_holder_after_twice_the_deadline")
    {
        return;
    }
    let registry = indexed_registry();
    let mut lazy = Lazy::new("ext4");
    // The background barely moves: the files read below are not local yet.
    lazy.serve(&["--fetch-deadline", "5", "--background-rate", "1"]);
    let reference = Reference::new("bookworm");
    let mnt = lazy.pull_and_mount(&format!("{registry}/test/debian:bookworm"), "debian");
    let (_, worker) = pids(&lazy);
    let mut files: Vec<(u64, PathBuf)> = regular_files(&reference.path())
        .into_iter()
        .map(|f| {
            (
                std::fs::metadata(reference.path().join(&f)).unwrap().len(),
                f,
            )
        })
        .collect();
    // Files of a few MiB: filled well within the deadline once the worker is back.
    files.sort();
    files.truncate(files.len() - 10);
    let (_, big) = files.pop().unwrap();
    let (_, next) = files.pop().unwrap();

    // A worker that hangs (stopped, not dead: the holder does not replace it).
    signal(worker, libc::SIGSTOP);
    let started = Instant::now();
    let denied = std::fs::read(mnt.join(&big));
    let waited = started.elapsed();
    signal(worker, libc::SIGCONT);
    let e = denied.expect_err("a read nobody answered returned data");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{}: {e}", big.display());
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(60),
        "denied after {waited:?}, not after twice the 5 s deadline"
    );

    // The worker is back: its late answer to the expired event is dropped, and reads work.
    for file in [&big, &next] {
        assert!(
            std::fs::read(mnt.join(file)).unwrap()
                == std::fs::read(reference.path().join(file)).unwrap(),
            "{} differs from the extraction",
            file.display()
        );
    }
}

#[test]
fn stopping_the_daemon_with_lazy_layers_mounted_fills_them_first() {
    if !require_root("stopping_the_daemon_with_lazy_layers_mounted_fills_them_first") {
        return;
    }
    let registry = indexed_registry();
    let mut lazy = Lazy::new("ext4");
    // The background barely moves: the layer is lazy when the daemon is told to stop.
    lazy.serve(&["--background-rate", "1"]);
    let reference = Reference::new("bookworm");
    let mnt = lazy.pull_and_mount(&format!("{registry}/test/debian:bookworm"), "debian");
    assert_eq!(lazy.status()["layers"][0]["phase"], "lazy");
    let mut holder = lazy.serve.take().unwrap();
    signal(holder.id() as i32, libc::SIGTERM);
    // It fills the mounted layer (uncapped) and only then stops.
    let deadline = Instant::now() + Duration::from_secs(240);
    let code = loop {
        if let Some(status) = holder.try_wait().unwrap() {
            break status.code();
        }
        assert!(Instant::now() < deadline, "the daemon never stopped");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, Some(0));
    let status = lazy.status();
    assert_eq!(status["daemon_running"], false, "{status}");
    assert!(all_detached(&status), "stopped before detaching: {status}");
    // Nothing serves the mount now, and nothing needs to.
    assert_same_tree(&reference.path(), &mnt);

    // Told twice, it stops at once (the second layer stays lazy).
    lazy.serve(&["--background-rate", "1"]);
    let layers = format!("{registry}/test/layers:latest");
    lazy.pull_and_mount(&layers, "layers");
    let mut holder = lazy.serve.take().unwrap();
    signal(holder.id() as i32, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    signal(holder.id() as i32, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while holder.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "a second SIGTERM did not stop the daemon"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An upgrade: the binary is replaced where it was installed and the worker killed; the holder
/// starts the new binary as the next worker and keeps serving the FUSE mount, so a workload on
/// an overlay over a lazy FUSE layer reads on, with the right bytes.
#[test]
fn upgrading_the_worker_keeps_fuse_mounts_serving() {
    if !require_root("upgrading_the_worker_keeps_fuse_mounts_serving") {
        return;
    }
    let registry = indexed_registry();
    let mut lazy = Lazy::with_mode("ext4", "fuse");
    // The daemon runs from a copy of the binary, which the test then replaces.
    let installed = lazy.fs.path().join("bin/lazylayer");
    std::fs::create_dir_all(installed.parent().unwrap()).unwrap();
    std::fs::copy(crate::common::EXE, &installed).unwrap();
    std::fs::create_dir_all(lazy.root()).unwrap();
    lazy.serve = Some(
        std::process::Command::new(&installed)
            .args([
                "--root",
                &lazy.root_arg(),
                "serve",
                "--background-rate",
                "1",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lazy.root().join("lazylayer.sock").exists() {
        assert!(Instant::now() < deadline, "serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let reference = Reference::new("bookworm");
    let mnt = lazy.pull_and_mount(&format!("{registry}/test/debian:bookworm"), "debian");
    let probe = "usr/bin/bash";
    assert_eq!(
        std::fs::read(mnt.join(probe)).unwrap(),
        std::fs::read(reference.path().join(probe)).unwrap()
    );
    let (holder, worker) = pids(&lazy);

    // Install the new binary (a new file renamed over the old one), then replace the worker.
    let staged = installed.with_extension("new");
    std::fs::copy(crate::common::EXE, &staged).unwrap();
    std::fs::rename(&staged, &installed).unwrap();
    kill(worker);
    let deadline = Instant::now() + Duration::from_secs(60);
    let upgraded = loop {
        let (now_holder, now_worker) = pids(&lazy);
        assert_eq!(now_holder, holder, "the holder stays");
        if now_worker != worker {
            break now_worker;
        }
        assert!(Instant::now() < deadline, "no new worker");
        std::thread::sleep(Duration::from_millis(50));
    };
    let exe = std::fs::read_link(format!("/proc/{upgraded}/exe")).unwrap();
    assert_eq!(
        exe, installed,
        "the new worker does not run the installed binary"
    );
    let old = std::fs::read_link(format!("/proc/{holder}/exe")).unwrap();
    assert!(
        old.to_string_lossy().ends_with("(deleted)"),
        "the holder should still run the replaced binary: {}",
        old.display()
    );
    // The overlay made before the upgrade reads every file right, through the same FUSE mount.
    assert_same_tree(&reference.path(), &mnt);
}

/// md5 of every regular file under `dirs` of `root`, by path relative to it (from md5sum, an
/// independent tool).
fn md5sums(root: &Path, dirs: &str) -> std::collections::HashMap<String, String> {
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find {dirs} -xdev -type f -print0 | xargs -0 md5sum",
            root.display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once("  "))
        .map(|(sum, path)| (path.trim_start_matches('/').to_string(), sum.to_string()))
        .collect()
}

/// Both daemon processes killed (SIGKILL) while a container started by `lazylayer run` reads
/// every file of a lazy image: the `run` process keeps a duplicate of the fanotify group, so
/// the group does not fail open; it starts a new daemon, which takes the group over and denies
/// the accesses the dead one had read and not answered. Not one file reads wrong bytes (a few
/// get EIO), and no reader is left waiting.
#[test]
fn killing_both_daemon_processes_during_a_run_shows_no_reader_wrong_data() {
    if !require_root("killing_both_daemon_processes_during_a_run_shows_no_reader_wrong_data") {
        return;
    }
    use std::io::Read;
    let registry = indexed_registry();
    let proxy = FaultProxy::start(registry.parse().unwrap(), Shaping::link(100, 5)).unwrap();
    let mut lazy = Lazy::new("ext4");
    lazy.serve(&["--background-rate", "1"]);
    let image = format!("{}/test/debian:bookworm", proxy.host());
    lazy.ll(&["pull", &image]);
    let reference = Reference::new("bookworm");
    let expected = md5sums(&reference.path(), "etc usr");
    let mut container = std::process::Command::new(crate::common::EXE)
        .args([
            "--root",
            &lazy.root_arg(),
            "run",
            &image,
            "--",
            "/bin/sh",
            "-c",
        ])
        .arg("find /etc /usr -xdev -type f -print0 | xargs -0 md5sum 2>&1; echo done")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = container.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    // Kill both once the container is well into its reads.
    wait_for_status(&lazy, "the container read nothing", |status| {
        status["demanded_files"].as_u64().unwrap_or(0) > 100
    });
    let (holder, worker) = pids(&lazy);
    kill(holder);
    kill(worker);
    if let Some(mut serve) = lazy.serve.take() {
        let _ = serve.wait();
    }
    let deadline = Instant::now() + Duration::from_secs(400);
    let status = loop {
        if let Some(status) = container.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "a reader was left waiting");
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = reader.join().unwrap();
    assert!(
        status.success(),
        "{status}: {}",
        &text[text.len().saturating_sub(2000)..]
    );
    assert!(
        text.ends_with("done\n"),
        "{}",
        &text[text.len().saturating_sub(2000)..]
    );
    let (mut right, mut wrong, mut denied) = (0, Vec::new(), 0);
    for line in text.lines() {
        if line.contains("Input/output error") {
            denied += 1;
        } else if let Some((sum, path)) = line.split_once("  ") {
            match expected.get(path.trim_start_matches('/')) {
                Some(want) if want == sum => right += 1,
                Some(_) => wrong.push(path.to_string()),
                None => {}
            }
        }
    }
    eprintln!(
        "kill -9 of both daemon processes during a run: {right} files right, {} wrong, {denied} EIO",
        wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "{} files read wrong bytes: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    assert!(
        right > expected.len() / 2,
        "only {right} of {} files read",
        expected.len()
    );
    // The new daemon serves the store and the layer completes.
    wait_for_status(
        &lazy,
        "the layer never detached after the takeover",
        all_detached,
    );
}

/// Under systemd's file descriptor store (a notify socket this test serves, as systemd would):
/// the holder says it is ready and stores the fanotify group; both daemon processes are killed
/// while a workload reads the lazy image; the daemon started again with the stored group
/// (`LISTEN_FDS`, as systemd restarts a unit) takes it over. Every read gives the right bytes
/// or EIO, never zeros, and no reader is left waiting.
#[test]
fn under_systemd_the_fd_store_keeps_the_group_through_the_death_of_both() {
    if !require_root("under_systemd_the_fd_store_keeps_the_group_through_the_death_of_both") {
        return;
    }
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::process::CommandExt;
    use std::sync::atomic::AtomicUsize;
    let registry = indexed_registry();
    let proxy = FaultProxy::start(registry.parse().unwrap(), Shaping::link(100, 5)).unwrap();
    let mut lazy = Lazy::new("ext4");
    std::fs::create_dir_all(lazy.root()).unwrap();
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let holder = std::process::Command::new(crate::common::EXE)
        .args([
            "--root",
            &lazy.root_arg(),
            "serve",
            "--background-rate",
            "1",
        ])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    lazy.serve = Some(holder);
    let mut message = [0u8; 256];
    let (stored, n) = lazylayer_daemon::keeper::recv_fd(notify.as_fd(), &mut message).unwrap();
    let message = String::from_utf8_lossy(&message[..n]).into_owned();
    for line in ["READY=1", "FDSTORE=1", "FDNAME=fanotify-group"] {
        assert!(message.lines().any(|l| l == line), "{message}");
    }
    let image = format!("{}/test/debian:bookworm", proxy.host());
    let mnt = lazy.pull_and_mount(&image, "debian");
    let reference = Reference::new("bookworm");
    let files = regular_files(&reference.path());
    let (wrong, denied) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            for file in &files {
                let want = std::fs::read(reference.path().join(file)).unwrap();
                match std::fs::read(mnt.join(file)) {
                    Ok(got) if got == want => {}
                    Ok(_) => {
                        wrong.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                        denied.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => panic!("{}: {e}", file.display()),
                }
            }
        });
        wait_for_status(&lazy, "the workload read nothing", |status| {
            status["demanded_files"].as_u64().unwrap_or(0) > 50
        });
        let (holder, worker) = pids(&lazy);
        kill(holder);
        kill(worker);
        if let Some(mut serve) = lazy.serve.take() {
            let _ = serve.wait();
        }
        assert!(
            !reader.is_finished(),
            "the workload finished before the kill"
        );
        // The service manager starts the unit again, handing it the stored group as fd 3.
        let raw = stored.as_raw_fd();
        let mut again = std::process::Command::new("sh");
        again
            .arg("-c")
            .arg(format!(
                "export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=fanotify-group; exec {} --root {} serve",
                crate::common::EXE,
                lazy.root_arg()
            ))
            .stdout(std::process::Stdio::null());
        // SAFETY: between fork and exec: dup2 and fcntl are async-signal-safe; fd 3 becomes the
        // stored group, inherited across exec as systemd passes it.
        unsafe {
            again.pre_exec(move || {
                if raw != 3 && libc::dup2(raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        lazy.serve = Some(again.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(300);
        while !reader.is_finished() {
            assert!(Instant::now() < deadline, "a reader was left waiting");
            std::thread::sleep(Duration::from_millis(200));
        }
        reader.join().unwrap();
    });
    let (wrong, denied) = (wrong.into_inner(), denied.into_inner());
    eprintln!(
        "kill -9 of both daemon processes under the fd store: {} files, {wrong} wrong, {denied} EIO",
        files.len()
    );
    assert_eq!(wrong, 0, "files read wrong bytes");
    assert!(denied < files.len() / 10, "{denied} reads denied");
    lazy.ll(&["detach", "--wait", &image]);
    assert_same_tree(&reference.path(), &mnt);
}

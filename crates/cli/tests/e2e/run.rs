//! `lazylayer run` as a user runs it, as root: the image's Entrypoint, Cmd, Env, WorkingDir and
//! User; command-line overrides; exit codes; Ctrl-C; and nothing left behind, even when the
//! run itself is killed.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lazylayer_testkit::fixtures::shared_registry;
use lazylayer_testkit::require_root;

const EXE: &str = env!("CARGO_BIN_EXE_lazylayer");

fn lazylayer(root: &std::path::Path, args: &[&str]) -> Output {
    Command::new(EXE)
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run lazylayer")
}

/// A store root on the host's filesystem (ext4 in CI); its daemon is stopped on drop.
struct Root(tempfile::TempDir);

impl Root {
    fn new() -> Root {
        Root(
            tempfile::Builder::new()
                .prefix("lazylayer-run.")
                .tempdir_in("/var/tmp")
                .unwrap(),
        )
    }
    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let status = lazylayer(self.path(), &["status", "--json"]);
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&status.stdout) {
            lazylayer_testkit::daemon::kill_from_status(&value);
        }
    }
}

fn overlay_mounts_under(path: &std::path::Path) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(path.to_str().unwrap()))
        .count()
}

#[test]
fn the_image_config_is_honoured() {
    if !require_root("the_image_config_is_honoured") {
        return;
    }
    let root = Root::new();
    let output = lazylayer(
        root.path(),
        &[
            "run",
            &format!("{}/test/debian:config", shared_registry().host()),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "hello from the image config\nnobody\n/tmp\n"
    );
}

#[test]
fn commands_run_and_their_exit_codes_come_back() {
    if !require_root("commands_run_and_their_exit_codes_come_back") {
        return;
    }
    let root = Root::new();
    let image = format!("{}/test/debian:bookworm", shared_registry().host());
    let output = lazylayer(
        root.path(),
        &[
            "run",
            &image,
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/os-release; id; hostname; exit 7",
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("uid=0(root)") && stdout.contains("lazylayer\n"),
        "{stdout}"
    );
    // The pid namespace: the workload's shell is pid 2 under a small init.
    let output = lazylayer(
        root.path(),
        &[
            "run",
            &image,
            "--",
            "/bin/sh",
            "-c",
            "echo $$; ls /proc | grep -c '^[0-9]'",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).lines().next(),
        Some("2")
    );
    // The image's Cmd overridden by a command from PATH; a missing command is 127.
    let output = lazylayer(
        root.path(),
        &["run", &image, "--", "perl", "-e", "print 6*7"],
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "42");
    let output = lazylayer(root.path(), &["run", &image, "--", "no-such-command"]);
    assert_eq!(output.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&output.stderr).contains("command not found"));
    // Nothing stays mounted and the writable layer is gone; --keep keeps it.
    assert_eq!(overlay_mounts_under(root.path()), 0);
    assert_eq!(
        std::fs::read_dir(root.path().join("run")).unwrap().count(),
        0
    );
    let output = lazylayer(
        root.path(),
        &[
            "run",
            "--keep",
            &image,
            "--",
            "/bin/sh",
            "-c",
            "echo kept > /kept",
        ],
    );
    assert!(output.status.success());
    let kept: Vec<_> = std::fs::read_dir(root.path().join("run"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        std::fs::read_to_string(kept[0].join("upper/kept")).unwrap(),
        "kept\n"
    );
    assert_eq!(overlay_mounts_under(root.path()), 0);
}

fn wait_for_process(name: &str) -> i32 {
    // Generous: the first run also fetches the whole (unindexed) layer once, beside other tests.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let comm = std::fs::read_to_string(entry.path().join("cmdline")).unwrap_or_default();
            if comm.replace('\0', " ").trim() == name {
                return entry.file_name().to_string_lossy().parse().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "{name} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn ctrl_c_stops_the_workload_and_a_killed_run_leaves_nothing() {
    if !require_root("ctrl_c_stops_the_workload_and_a_killed_run_leaves_nothing") {
        return;
    }
    let root = Root::new();
    let image = format!("{}/test/debian:bookworm", shared_registry().host());
    // Ctrl-C (SIGINT to the run) reaches the workload; the run ends with its status.
    let mut run = Command::new(EXE)
        .arg("--root")
        .arg(root.path())
        .args(["run", &image, "--", "sleep", "1001"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let sleeper = wait_for_process("sleep 1001");
    // SAFETY: signalling a child process.
    unsafe {
        libc::kill(run.id() as i32, libc::SIGINT);
    }
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(gone(sleeper));
    assert_eq!(overlay_mounts_under(root.path()), 0);
    // A run killed outright takes its container with it; the next run cleans up after it.
    let mut run = Command::new(EXE)
        .arg("--root")
        .arg(root.path())
        .args(["run", &image, "--", "sleep", "1002"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let sleeper = wait_for_process("sleep 1002");
    run.kill().unwrap();
    run.wait().unwrap();
    assert!(gone(sleeper), "the workload died with the run");
    assert_eq!(
        overlay_mounts_under(root.path()),
        0,
        "its mount namespace (and overlay) went too"
    );
    assert_eq!(
        std::fs::read_dir(root.path().join("run")).unwrap().count(),
        1,
        "a stale writable layer"
    );
    let output = lazylayer(root.path(), &["run", &image, "--", "true"]);
    assert!(output.status.success());
    assert_eq!(
        std::fs::read_dir(root.path().join("run")).unwrap().count(),
        0,
        "cleaned by the next run"
    );
}

/// Starts the daemon with the background held back and waits until it answers.
fn serve_held_back(root: &Root) -> std::process::Child {
    let child = Command::new(EXE)
        .arg("--root")
        .arg(root.path())
        .args(["serve", "--background-rate", "1"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !root.path().join("lazylayer.sock").exists() {
        assert!(Instant::now() < deadline, "serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn files_populated(root: &Root) -> u64 {
    let status: serde_json::Value =
        serde_json::from_slice(&lazylayer(root.path(), &["status", "--json"]).stdout).unwrap();
    crate::common::files_populated(&status)
}

/// The one prefetch profile in `root`'s store: its file, and the paths it lists in order.
fn profile_of(root: &Root) -> (std::path::PathBuf, Vec<String>) {
    let profiles = root.path().join("profiles");
    let mut files: Vec<_> = std::fs::read_dir(&profiles)
        .unwrap()
        .map(|f| f.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let file = files.pop().unwrap();
    let profile: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let paths = profile["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect();
    (file, paths)
}

/// Waits until `root`'s daemon has filled at least `count` files.
fn wait_for_populated(root: &Root, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while files_populated(root) < count as u64 {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} profile files filled",
            files_populated(root),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_recorded_profile_and_the_startup_files_are_fetched_first_by_later_pulls() {
    if !require_root("a_recorded_profile_and_the_startup_files_are_fetched_first_by_later_pulls") {
        return;
    }
    let image = format!("{}/test/debian:bookworm", shared_registry().host());
    // With its index in the registry, so that pulls load it lazily.
    let scratch = Root::new();
    assert!(
        lazylayer(scratch.path(), &["index", "--push", &image])
            .status
            .success()
    );
    let recorder = Root::new();
    let mut daemon = serve_held_back(&recorder);
    let output = lazylayer(
        recorder.path(),
        &["run", "--record", &image, "--", "perl", "-e", "print 1"],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("recorded"), "{stderr}");
    let inspect = String::from_utf8_lossy(&lazylayer(recorder.path(), &["inspect", &image]).stdout)
        .into_owned();
    assert!(inspect.contains("Profile:"), "{inspect}");
    let (profile_file, recorded) = profile_of(&recorder);
    assert!(recorded.iter().any(|p| p == "usr/bin/perl"), "{recorded:?}");
    lazylayer_testkit::daemon::stop(&mut daemon);

    // A store with the profile fills those files at once, background or not.
    let with_profile = Root::new();
    std::fs::create_dir_all(with_profile.path().join("profiles")).unwrap();
    std::fs::copy(
        &profile_file,
        with_profile
            .path()
            .join("profiles")
            .join(profile_file.file_name().unwrap()),
    )
    .unwrap();
    let mut daemon = serve_held_back(&with_profile);
    assert!(
        lazylayer(with_profile.path(), &["pull", &image])
            .status
            .success()
    );
    wait_for_populated(&with_profile, recorded.len());
    lazylayer_testkit::daemon::stop(&mut daemon);

    // Without it, the held-back background fills only the five files nearly every start
    // opens (passwd, group, ld.so.cache, the dynamic linker, libc), and perhaps its first
    // file, in the same time.
    let without = Root::new();
    let mut daemon = serve_held_back(&without);
    assert!(
        lazylayer(without.path(), &["pull", &image])
            .status
            .success()
    );
    std::thread::sleep(Duration::from_secs(3));
    let populated = files_populated(&without);
    assert!(
        (5..=6).contains(&populated),
        "{populated}: {}",
        String::from_utf8_lossy(&lazylayer(without.path(), &["status", "--json"]).stdout)
    );
    lazylayer_testkit::daemon::stop(&mut daemon);
}

#[test]
fn the_demo_runs_on_this_machine_alone() {
    if !require_root("the_demo_runs_on_this_machine_alone") {
        return;
    }
    let root = Root::new();
    let output = lazylayer(
        root.path(),
        &["demo", "--mbit", "1000", "--latency-ms", "1"],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for line in [
        "full pull + extract + run",
        "lazylayer run ",
        "lazylayer run, profiled",
        "nothing lazy left: yes",
    ] {
        assert!(stdout.contains(line), "{line:?} missing: {stdout}");
    }
    assert_eq!(
        stdout.matches("from a lazily loaded image").count(),
        3,
        "three runs, one output each: {stdout}"
    );
    assert_eq!(overlay_mounts_under(root.path()), 0);
}

/// A copy of the Debian test image under `name` in the shared registry, with its lazy index
/// bound when `indexed` (tests that bind profiles must not change the image other tests pull).
fn copy_of_debian(name: &str, indexed: bool) -> String {
    let host = shared_registry().host();
    let image = format!("{host}/test/{name}:bookworm");
    lazylayer_testkit::fixtures::skopeo_copy(
        &format!("docker://{host}/test/debian:bookworm"),
        &format!("docker://{image}"),
        &[],
    );
    if indexed {
        let scratch = Root::new();
        let output = lazylayer(scratch.path(), &["index", "--push", &image]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    image
}

#[test]
fn a_pushed_profile_travels_to_other_stores_and_grows_with_each_recording() {
    if !require_root("a_pushed_profile_travels_to_other_stores_and_grows_with_each_recording") {
        return;
    }
    let image = copy_of_debian("profile-travels", true);
    let recorder = Root::new();
    let mut daemon = serve_held_back(&recorder);
    let output = lazylayer(
        recorder.path(),
        &[
            "run", "--record", "--push", &image, "--", "perl", "-e", "print 1",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("pushed the prefetch profile"), "{stderr}");
    let (_, recorded) = profile_of(&recorder);
    assert!(recorded.iter().any(|p| p == "usr/bin/perl"), "{recorded:?}");
    lazylayer_testkit::daemon::stop(&mut daemon);

    // Another machine, with no profile of its own: the pull brings the registry's, and its
    // files are filled at once although the background is held back.
    let elsewhere = Root::new();
    let mut daemon = serve_held_back(&elsewhere);
    let output = lazylayer(elsewhere.path(), &["pull", &image]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "prefetch profile from the registry lists {} files",
            recorded.len()
        )),
        "{stderr}"
    );
    assert_eq!(profile_of(&elsewhere).1, recorded);
    wait_for_populated(&elsewhere, recorded.len());

    // Recording there keeps what was listed and adds what this workload waited for.
    let output = lazylayer(
        elsewhere.path(),
        &["run", "--record", &image, "--", "cat", "/usr/bin/apt-get"],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (_, grown) = profile_of(&elsewhere);
    assert_eq!(grown[..recorded.len()], recorded[..]);
    assert!(
        grown[recorded.len()..]
            .iter()
            .any(|p| p == "usr/bin/apt-get"),
        "{grown:?}"
    );
    lazylayer_testkit::daemon::stop(&mut daemon);

    // A store that has a profile keeps its own: the pull does not replace it.
    let output = lazylayer(elsewhere.path(), &["pull", &image]);
    assert!(output.status.success());
    assert!(!String::from_utf8_lossy(&output.stderr).contains("from the registry"));
    assert_eq!(profile_of(&elsewhere).1, grown);
}

#[test]
fn a_bound_profile_that_names_another_layer_is_not_used() {
    if !require_root("a_bound_profile_that_names_another_layer_is_not_used") {
        return;
    }
    use lazylayer_engine::profiles::{PROFILE_ARTIFACT_TYPE, PROFILE_MEDIA_TYPE};
    use lazylayer_index::distribution::{bind_artifact, push_artifact};
    use lazylayer_source::registry::Body;
    use lazylayer_source::{
        BlobDescriptor, ClientOptions, Digest, ImageSource, PlatformChoice, RegistryClient,
    };

    let image = copy_of_debian("foreign-profile", false);
    // Bound by the tag, as `run --record --push` binds one, but listing a file of a layer
    // that is not in the image.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = RegistryClient::new(ClientOptions {
            insecure_registries: vec![shared_registry().host()],
            ..ClientOptions::default()
        })
        .unwrap();
        let source = ImageSource::open(&image.parse().unwrap(), &client).unwrap();
        let resolved = source
            .resolve(&PlatformChoice::from_flag(None).unwrap())
            .await
            .unwrap();
        let ImageSource::Registry { repository, .. } = &source else {
            unreachable!("a registry image");
        };
        let profile = serde_json::json!({
            "manifest": resolved.manifest.digest,
            "files": [
                {"layer": resolved.layers[0].digest, "path": "etc/passwd"},
                {"layer": Digest::sha256(b"not in the image"), "path": "usr/bin/perl"},
            ],
        });
        let bytes = serde_json::to_vec(&profile).unwrap();
        let blob = BlobDescriptor {
            digest: Digest::sha256(&bytes),
            media_type: PROFILE_MEDIA_TYPE.into(),
            size: bytes.len() as u64,
        };
        repository
            .push_blob(&blob, Body::Bytes(bytes.into()))
            .await
            .unwrap();
        let listed = vec![serde_json::json!({
            "mediaType": PROFILE_MEDIA_TYPE, "digest": blob.digest, "size": blob.size,
        })];
        let artifact = push_artifact(
            repository,
            &resolved.manifest,
            PROFILE_ARTIFACT_TYPE,
            listed,
        )
        .await
        .unwrap();
        bind_artifact(
            repository,
            &resolved,
            "bookworm",
            &artifact,
            PROFILE_ARTIFACT_TYPE,
        )
        .await
        .unwrap();
    });
    let root = Root::new();
    let output = lazylayer(root.path(), &["pull", &image]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("not using the image's prefetch profile")
            && stderr.contains("which is not a layer of the image"),
        "{stderr}"
    );
    // The pull made the store's directories, `profiles` among them.
    let profiles = std::fs::read_dir(root.path().join("profiles")).unwrap();
    assert_eq!(profiles.count(), 0);
}

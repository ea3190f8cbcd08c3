//! The `lazylayer` binary as a user runs it, against a real registry and OCI layout, with
//! skopeo as the independent reference.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lazylayer_testkit::fixtures::{
    layout_dir, shared_registry, skopeo_copy, skopeo_inspect, skopeo_layers,
};
use lazylayer_testkit::registry::{RegistryAuth, RegistryOptions, TestRegistry, non_loopback_ipv4};
use lazylayer_testkit::token_issuer::{IssuerOptions, TokenIssuer};

fn lazylayer(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lazylayer"));
    command
        .args(args)
        .env_remove("LAZYLAYER_LOG")
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
    // No credentials from the machine running the tests.
    command
        .env("HOME", "/nonexistent")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("DOCKER_CONFIG");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run lazylayer")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "lazylayer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("utf-8")
}

fn json_layers(value: &serde_json::Value) -> Vec<String> {
    value["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_string())
        .collect()
}

#[test]
fn inspect_prints_the_layers_skopeo_sees_for_registry_and_layout() {
    // With its lazy index bound (the tag names an image index from here on).
    let host = crate::common::indexed_registry();
    let layout = layout_dir();
    let skopeo = skopeo_inspect(&format!("docker://{host}/test/debian:bookworm"), &[]);
    let expected = skopeo_layers(&skopeo);

    let remote: serde_json::Value = serde_json::from_str(&stdout(&lazylayer(
        &["inspect", "--json", &format!("{host}/test/debian:bookworm")],
        &[],
    )))
    .unwrap();
    let local: serde_json::Value = serde_json::from_str(&stdout(&lazylayer(
        &[
            "inspect",
            "--json",
            &format!("oci:{}:bookworm", layout.display()),
        ],
        &[],
    )))
    .unwrap();
    assert_eq!(json_layers(&remote), expected);
    assert_eq!(json_layers(&local), expected);
    // Once `index --push` has bound the lazy index, the tag names an image index: skopeo's
    // Digest is the index's then, and the manifest is the one lazylayer chose from it.
    let top = if remote["index"].is_null() {
        &remote["manifest"]["digest"]
    } else {
        &remote["index"]["digest"]
    };
    assert_eq!(top, &skopeo["Digest"]);
    let by_digest = format!(
        "docker://{host}/test/debian@{}",
        remote["manifest"]["digest"].as_str().unwrap()
    );
    // skopeo reads the layout itself too.
    let oci = format!("oci:{}:bookworm", layout.display());
    let skopeo_oci = skopeo_inspect(&oci, &[]);
    assert_eq!(json_layers(&local), skopeo_layers(&skopeo_oci));
    assert_eq!(local["manifest"]["digest"], skopeo_oci["Digest"]);
    // Compressed sizes, media types and the config as the manifest states them.
    for (out, source) in [(&remote, by_digest), (&local, oci.clone())] {
        let raw = skopeo_inspect(&source, &["--raw"]);
        let raw_layers = raw["layers"].as_array().expect("raw layers");
        let layers = out["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), raw_layers.len(), "{source}");
        for (ours, theirs) in layers.iter().zip(raw_layers) {
            assert_eq!(ours["digest"], theirs["digest"], "{source}");
            assert_eq!(ours["size"], theirs["size"], "{source}");
            assert_eq!(ours["mediaType"], theirs["mediaType"], "{source}");
            assert!(ours["size"].as_u64().unwrap() > 1 << 20, "{source}: {ours}");
        }
        assert_eq!(out["config"]["digest"], raw["config"]["digest"], "{source}");
        assert_eq!(out["config"]["size"], raw["config"]["size"], "{source}");
    }
    assert_eq!(remote["platform"]["os"], "linux");
    assert_eq!(remote["config"]["digest"], local["config"]["digest"]);
    assert!(
        remote["layers"][0]["diffId"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(
        remote["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );

    let text = stdout(&lazylayer(
        &["inspect", &format!("{host}/test/debian:bookworm")],
        &[],
    ));
    for layer in &expected {
        assert!(text.contains(layer.as_str()), "{text}");
    }
    assert!(text.contains("Platform:  linux/amd64"), "{text}");
}

#[test]
fn inspect_of_a_multi_platform_image_shows_the_index_and_honours_platform() {
    let host = shared_registry().host();
    let out: serde_json::Value = serde_json::from_str(&stdout(&lazylayer(
        &[
            "inspect",
            "--json",
            "--platform",
            "linux/arm64",
            &format!("{host}/test/multiarch-docker"),
        ],
        &[],
    )))
    .unwrap();
    assert_eq!(
        out["index"]["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    assert_eq!(out["platform"]["architecture"], "arm64");
    let arm = skopeo_inspect(
        &format!("docker://{host}/test/multiarch-docker"),
        &["--override-arch", "arm64"],
    );
    assert_eq!(
        json_layers(&out),
        vec![arm["Layers"][0].as_str().unwrap().to_string()]
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_a_failing_exit_code() {
    let host = shared_registry().host();
    for (args, expected) in [
        (
            vec!["inspect", "Not/Valid"],
            "repository names must be lowercase",
        ),
        (
            vec!["inspect", "--platform", "linux", "debian"],
            "invalid platform",
        ),
        (
            vec!["inspect", "oci:/nonexistent"],
            "not an OCI image layout",
        ),
        (
            vec!["inspect", &format!("{host}/test/absent:latest")],
            "not found",
        ),
    ] {
        let output = lazylayer(&args, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn help_lists_only_working_commands_and_the_root_option() {
    let help = stdout(&lazylayer(&["--help"], &[]));
    for command in [
        "demo", "inspect", "index", "pull", "run", "mount", "umount", "status", "detach", "verify",
        "serve", "rmi", "gc",
    ] {
        assert!(
            help.contains(&format!("  {command} ")),
            "{command} missing: {help}"
        );
    }
    assert!(help.contains("--root"), "{help}");
    for absent in ["fuse", "images"] {
        assert!(
            !help.contains(&format!("  {absent} ")),
            "{absent} listed: {help}"
        );
    }
    assert!(help.contains("/var/lib/lazylayer"), "{help}");
    let help = stdout(&lazylayer(&["inspect", "--help"], &[]));
    assert!(
        help.contains("--platform") && help.contains("Examples"),
        "{help}"
    );
}

/// `text` in base64, as auth files store `user:password`.
fn base64(text: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
}

/// Writes `dir/config.json` in Docker's format with `user:password` for `host`.
fn write_docker_config(dir: &std::path::Path, host: &str, user: &str, password: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let auth = base64(&format!("{user}:{password}"));
    std::fs::write(
        dir.join("config.json"),
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
}

/// A registry with htpasswd auth for `user` holding the tiny fixture image: the registry and
/// the image's reference.
fn private_tiny_image(user: &str, password: &str) -> (TestRegistry, String) {
    let registry = TestRegistry::start(RegistryAuth::Htpasswd { user, password }).unwrap();
    let image = format!("{}/private/tiny:latest", registry.host());
    skopeo_copy(
        &format!("oci:{}:tiny-amd64", layout_dir().display()),
        &format!("docker://{image}"),
        &["--dest-creds", &format!("{user}:{password}")],
    );
    (registry, image)
}

#[test]
fn credentials_come_from_docker_config_in_home_or_docker_config_dir() {
    let (user, password) = ("dave", "Docker-Config-Passw0rd");
    let (registry, image) = private_tiny_image(user, password);
    let host = registry.host();
    let expected = skopeo_inspect(
        &format!("docker://{image}"),
        &["--creds", &format!("{user}:{password}")],
    );
    let check = |output: &Output| {
        let out: serde_json::Value = serde_json::from_str(&stdout(output)).unwrap();
        assert_eq!(out["manifest"]["digest"], expected["Digest"]);
    };

    // ~/.docker/config.json, as `docker login` writes it.
    let home = tempfile::tempdir().unwrap();
    let home_path = home.path().to_str().unwrap();
    write_docker_config(&home.path().join(".docker"), &host, user, password);
    check(&lazylayer(
        &["inspect", "--json", &image],
        &[("HOME", home_path)],
    ));

    // $DOCKER_CONFIG/config.json, with no usable home.
    let docker_config = tempfile::tempdir().unwrap();
    write_docker_config(docker_config.path(), &host, user, password);
    check(&lazylayer(
        &["inspect", "--json", &image],
        &[("DOCKER_CONFIG", docker_config.path().to_str().unwrap())],
    ));

    // $DOCKER_CONFIG replaces ~/.docker, as in docker: its wrong password is the one tried.
    let wrong = tempfile::tempdir().unwrap();
    write_docker_config(wrong.path(), &host, user, "not-the-password");
    let output = lazylayer(
        &["inspect", &image],
        &[
            ("HOME", home_path),
            ("DOCKER_CONFIG", wrong.path().to_str().unwrap()),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("rejected the stored credentials"),
        "{stderr}"
    );

    // Neither file: the registry's refusal says no credentials were found.
    let empty = tempfile::tempdir().unwrap();
    let output = lazylayer(
        &["inspect", &image],
        &[("HOME", empty.path().to_str().unwrap())],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("authentication failed") && stderr.contains("no credentials were found"),
        "{stderr}"
    );
}

#[test]
fn credentials_never_appear_in_logs_or_errors() {
    let (user, password) = ("carol", "Very-Secret-Passw0rd");
    let (registry, image) = private_tiny_image(user, password);
    let dir = tempfile::tempdir().unwrap();
    let encoded = base64(&format!("{user}:{password}"));
    // An auth.json has the same format as Docker's config.json.
    write_docker_config(dir.path(), &registry.host(), user, password);
    let auth = dir.path().join("config.json");
    let env = [
        ("REGISTRY_AUTH_FILE", auth.to_str().unwrap()),
        ("LAZYLAYER_LOG", "trace"),
    ];
    let output = lazylayer(&["inspect", &image], &env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.len() > 1000, "trace logging was on: {stderr}");
    assert!(
        !stderr.contains(password) && !stderr.contains(&encoded),
        "credential in the log"
    );

    let wrong = dir.path().join("wrong.json");
    std::fs::write(
        &wrong,
        format!(
            r#"{{"auths":{{"{}":{{"username":"{user}","password":"Wrong-{password}"}}}}}}"#,
            registry.host()
        ),
    )
    .unwrap();
    let output = lazylayer(
        &["-vv", "inspect", &image],
        &[("REGISTRY_AUTH_FILE", wrong.to_str().unwrap())],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("rejected the stored credentials"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(password),
        "password in the error: {stderr}"
    );
}

/// A registry on this machine's non-loopback address (so lazylayer does not assume plain HTTP),
/// holding the tiny image as `test/tiny:latest`; returns it and the image reference.
fn off_loopback_registry(tls: bool) -> (TestRegistry, String) {
    let registry = TestRegistry::start_with(RegistryOptions {
        auth: RegistryAuth::Anonymous,
        ip: non_loopback_ipv4().into(),
        tls,
    })
    .unwrap();
    let image = format!("{}/test/tiny:latest", registry.host());
    skopeo_copy(
        &format!("oci:{}:tiny-amd64", layout_dir().display()),
        &format!("docker://{image}"),
        &[],
    );
    (registry, image)
}

#[test]
fn https_registries_are_verified_with_the_cas_of_ssl_cert_file() {
    let (registry, image) = off_loopback_registry(true);
    let expected = skopeo_inspect(&format!("docker://{image}"), &[]);
    let ca = registry.ca_cert().unwrap();
    let out: serde_json::Value = serde_json::from_str(&stdout(&lazylayer(
        &["inspect", "--json", &image],
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    )))
    .unwrap();
    assert_eq!(out["manifest"]["digest"], expected["Digest"]);

    // Without the CA the certificate is refused at once: no retries, no plain-HTTP fallback.
    let started = Instant::now();
    let output = lazylayer(&["inspect", &image], &[]);
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    assert!(!stderr.contains("gave up after"), "retried: {stderr}");
    assert!(
        elapsed < Duration::from_secs(10),
        "took {elapsed:?}: {stderr}"
    );
}

#[test]
fn plain_http_registries_off_loopback_need_insecure_registry() {
    let (registry, image) = off_loopback_registry(false);
    let host = registry.host();
    let expected = skopeo_inspect(&format!("docker://{image}"), &[]);

    let started = Instant::now();
    let output = lazylayer(&["inspect", &image], &[]);
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("https://{host}/")), "{stderr}");
    assert!(
        stderr.contains("does not speak TLS") && stderr.contains("--insecure-registry"),
        "{stderr}"
    );
    // A server that does not speak TLS will not start to on a retry.
    assert!(!stderr.contains("gave up after"), "retried: {stderr}");
    assert!(
        elapsed < Duration::from_secs(10),
        "took {elapsed:?}: {stderr}"
    );

    let out: serde_json::Value = serde_json::from_str(&stdout(&lazylayer(
        &["--insecure-registry", &host, "inspect", "--json", &image],
        &[],
    )))
    .unwrap();
    assert_eq!(out["manifest"]["digest"], expected["Digest"]);
}

#[test]
fn bearer_tokens_never_appear_in_logs() {
    let options = IssuerOptions::default();
    let (user, password) = options.users[0].clone();
    let issuer = TokenIssuer::start(options).unwrap();
    let registry = TestRegistry::start(RegistryAuth::Token(&issuer)).unwrap();
    let host = registry.host();
    skopeo_copy(
        &format!("oci:{}:layers", layout_dir().display()),
        &format!("docker://{host}/private/layers:latest"),
        &["--dest-creds", &format!("{user}:{password}")],
    );
    let dir = tempfile::tempdir().unwrap();
    write_docker_config(dir.path(), &host, &user, &password);
    let issued = issuer.issued();
    let root = tempfile::tempdir().unwrap();
    let image = format!("{host}/private/layers:latest");
    // `index` reads every layer blob too: many requests that carry the token.
    let output = lazylayer(
        &["--root", root.path().to_str().unwrap(), "index", &image],
        &[
            ("DOCKER_CONFIG", dir.path().to_str().unwrap()),
            ("LAZYLAYER_LOG", "trace"),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(issuer.issued() > issued, "a token was issued");
    assert!(
        stderr.contains("TRACE") && stderr.contains("DEBUG"),
        "trace logging was on: {stderr}"
    );
    assert!(
        stderr.contains("using stored credentials"),
        "the credentials were found: {stderr}"
    );
    // Tokens are JWTs: base64 of `{"` starts every one of them.
    assert!(!stderr.contains("eyJ"), "a token in the log: {stderr}");
    let basic = base64(&format!("{user}:{password}"));
    assert!(
        !stderr.contains(&password) && !stderr.contains(&basic),
        "the password in the log: {stderr}"
    );
}

#[test]
fn index_push_then_inspect_on_a_fresh_root_finds_and_verifies_the_index() {
    let registry = TestRegistry::start(RegistryAuth::Anonymous).unwrap();
    let host = registry.host();
    skopeo_copy(
        &format!("oci:{}:layers", layout_dir().display()),
        &format!("docker://{host}/test/layers:latest"),
        &[],
    );
    let image = format!("{host}/test/layers:latest");
    let builder_root = tempfile::tempdir().unwrap();
    let root = builder_root.path().to_str().unwrap();
    let before: serde_json::Value = serde_json::from_str(&stdout(&lazylayer(
        &["--root", root, "inspect", "--json", &image],
        &[],
    )))
    .unwrap();
    assert!(
        before["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["index"].is_null())
    );

    let pushed = stdout(&lazylayer(
        &["--root", root, "index", "--push", &image],
        &[],
    ));
    assert!(
        pushed.starts_with("pushed index artifact sha256:"),
        "{pushed}"
    );
    // skopeo sees the referrers tag the registry lacks an API for.
    let manifest_digest = before["manifest"]["digest"]
        .as_str()
        .unwrap()
        .replace(':', "-");
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{host}/test/layers:{manifest_digest}"))
        .output()
        .unwrap();
    assert!(raw.status.success());
    let referrers: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(
        referrers["manifests"][0]["artifactType"],
        "application/vnd.lazylayer.index.v1"
    );

    let fresh = tempfile::tempdir().unwrap();
    let fresh_root = fresh.path().to_str().unwrap();
    let after: serde_json::Value = serde_json::from_str(&stdout(&lazylayer(
        &["--root", fresh_root, "inspect", "--json", &image],
        &[],
    )))
    .unwrap();
    for layer in after["layers"].as_array().unwrap() {
        let index = &layer["index"];
        assert_eq!(index["origin"], "bound", "{layer}");
        assert_eq!(index["stored"], false, "{layer}");
        let hex = layer["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        let local = std::fs::read(builder_root.path().join("indexes/sha256").join(hex)).unwrap();
        let local_digest = format!("{:x}", sha256_of(&local));
        assert_eq!(
            index["digest"],
            format!("sha256:{local_digest}"),
            "the pushed index is the built one"
        );
    }
    let text = stdout(&lazylayer(
        &["--root", fresh_root, "inspect", "--files", &image],
        &[],
    ));
    assert!(text.contains("registry, bound to the image"), "{text}");
    assert!(
        text.contains("data/sparse.img") && text.contains("d+o") && text.contains("remove-me.txt"),
        "{text}"
    );

    // A registry that serves other bytes for the index is caught: here in its head, which a
    // pull fetches alone when the artifact gives its digest, else with the whole blob (a
    // wrong window is caught when a read fetches it: the index crate's sweep tests).
    let index_digest = after["layers"][0]["index"]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let stored = registry
        .storage()
        .join("data/docker/registry/v2/blobs/sha256")
        .join(&index_digest[..2])
        .join(&index_digest)
        .join("data");
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[40] ^= 1;
    std::fs::write(&stored, bytes).unwrap();
    let other = tempfile::tempdir().unwrap();
    let output = lazylayer(
        &["--root", other.path().to_str().unwrap(), "inspect", &image],
        &[],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("does not match the digest its artifact gives")
            || stderr.contains("digest mismatch"),
        "{stderr}"
    );
}

#[test]
fn lazylayer_root_sets_the_root_and_root_overrides_it() {
    let root = tempfile::tempdir().unwrap();
    let root_env = [("LAZYLAYER_ROOT", root.path().to_str().unwrap())];
    let image = format!("oci:{}:layers", layout_dir().display());
    stdout(&lazylayer(&["index", &image], &root_env));
    let inspected: serde_json::Value = serde_json::from_str(&stdout(&lazylayer(
        &["inspect", "--json", &image],
        &root_env,
    )))
    .unwrap();
    let layers = inspected["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    for layer in layers {
        let hex = layer["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        assert!(
            root.path().join("indexes/sha256").join(hex).is_file(),
            "index of {hex} under LAZYLAYER_ROOT"
        );
        assert_eq!(layer["index"]["origin"], "local", "{layer}");
    }
    // --root wins over the environment: another root has no indexes.
    let other = tempfile::tempdir().unwrap();
    let inspected: serde_json::Value = serde_json::from_str(&stdout(&lazylayer(
        &[
            "--root",
            other.path().to_str().unwrap(),
            "inspect",
            "--json",
            &image,
        ],
        &root_env,
    )))
    .unwrap();
    assert!(
        inspected["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["index"].is_null())
    );
}

#[test]
fn a_single_frame_zstd_layer_says_so() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path().to_str().unwrap();
    let image = format!("oci:{}:bookworm-zstd", layout_dir().display());
    stdout(&lazylayer(&["--root", root, "index", &image], &[]));
    let text = stdout(&lazylayer(&["--root", root, "inspect", &image], &[]));
    assert!(
        text.contains("a single zstd frame: any read fetches the whole layer"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout(&lazylayer(
        &["--root", root, "inspect", "--json", &image],
        &[],
    )))
    .unwrap();
    assert_eq!(json["layers"][0]["index"]["singleSpan"], true);
    assert_eq!(json["layers"][0]["index"]["origin"], "local");
    let output = lazylayer(&["--root", root, "index", "--push", &image], &[]);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--push needs an image in a registry")
    );
}

fn sha256_of(bytes: &[u8]) -> impl std::fmt::LowerHex {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
}

/// A user who is not root is told at once what is needed, instead of retrying a registry for
/// seconds and failing somewhere else.
#[test]
fn commands_that_need_root_say_so_at_once() {
    if !lazylayer_testkit::require_root("commands_that_need_root_say_so_at_once") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    for command in [
        vec!["pull", "127.0.0.1:9/test/debian:bookworm"],
        vec!["run", "127.0.0.1:9/test/debian:bookworm", "--", "true"],
        vec!["detach", "anything"],
    ] {
        let started = std::time::Instant::now();
        let output = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_lazylayer"))
            .arg("--root")
            .arg(root.path())
            .args(&command)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{command:?}: {stderr}");
        assert!(stderr.contains("needs root"), "{command:?}: {stderr}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "{command:?} took {:?}",
            started.elapsed()
        );
    }
}

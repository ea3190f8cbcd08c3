//! The registry client and OCI layout reader against real parts: Debian's docker-registry,
//! images built by debootstrap/umoci/skopeo, skopeo as the independent reference, a real token
//! issuer flow, and the fault-injecting proxy. Run as part of `scripts/test`.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use lazylayer_source::registry::Body;
use lazylayer_source::registry::auth::credentials::CredentialSource;
use lazylayer_source::registry::retry::RetryPolicy;
use lazylayer_source::{
    BlobDescriptor, BlobStream, ClientOptions, Digest, Error, ImageReference, ImageSource,
    PlatformChoice, RegistryClient, RegistryReference, ResolvedImage,
};
use lazylayer_testkit::blackhole::Blackhole;
use lazylayer_testkit::fixtures::{
    layout_dir, shared_registry, skopeo_copy, skopeo_inspect, skopeo_layers,
};
use lazylayer_testkit::layout_registry::LayoutRegistry;
use lazylayer_testkit::proxy::{Fault, FaultProxy, Rule, Shaping};
use lazylayer_testkit::registry::{RegistryAuth, TestRegistry};
use lazylayer_testkit::token_issuer::{IssuerOptions, TokenIssuer};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 8,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        ..RetryPolicy::default()
    }
}

fn client_with(credentials: CredentialSource, read_timeout: Duration) -> RegistryClient {
    RegistryClient::new(ClientOptions {
        credentials,
        read_timeout,
        retry: quick_retries(),
        ..ClientOptions::default()
    })
    .expect("client")
}

fn anonymous() -> RegistryClient {
    client_with(CredentialSource::None, Duration::from_secs(30))
}

fn reference(host: &str, name: &str) -> RegistryReference {
    format!("{host}/{name}").parse().expect("reference")
}

async fn resolve(
    client: &RegistryClient,
    image: &str,
    platform: Option<&str>,
) -> lazylayer_source::Result<ResolvedImage> {
    let reference: ImageReference = image.parse()?;
    let source = ImageSource::open(&reference, client)?;
    source.resolve(&PlatformChoice::from_flag(platform)?).await
}

async fn collect(mut stream: BlobStream) -> lazylayer_source::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

async fn read_blob(
    client: &RegistryClient,
    host: &str,
    name: &str,
    blob: &BlobDescriptor,
) -> lazylayer_source::Result<Vec<u8>> {
    let repository = client.repository(host, name)?;
    collect(repository.open_blob(blob).await?).await
}

fn digests(image: &ResolvedImage) -> Vec<String> {
    image.layers.iter().map(|l| l.digest.to_string()).collect()
}

#[tokio::test]
async fn registry_and_layout_agree_with_skopeo() {
    let host = shared_registry().host();
    let layout = layout_dir();
    let client = anonymous();
    for (name, tag, media_type) in [
        (
            "test/debian:bookworm",
            "bookworm",
            "application/vnd.oci.image.manifest.v1+json",
        ),
        (
            "test/debian:bookworm-zstd",
            "bookworm-zstd",
            "application/vnd.oci.image.manifest.v1+json",
        ),
        (
            "test/layers:latest",
            "layers",
            "application/vnd.oci.image.manifest.v1+json",
        ),
        (
            "test/layers:zstd",
            "layers-zstd",
            "application/vnd.oci.image.manifest.v1+json",
        ),
        (
            "test/layers:plain",
            "layers-plain",
            "application/vnd.oci.image.manifest.v1+json",
        ),
    ] {
        let remote = resolve(&client, &format!("{host}/{name}"), None)
            .await
            .expect(name);
        let local = resolve(&client, &format!("oci:{}:{tag}", layout.display()), None)
            .await
            .expect(tag);
        let skopeo = skopeo_inspect(&format!("docker://{host}/{name}"), &[]);
        assert_eq!(digests(&remote), skopeo_layers(&skopeo), "{name}: layers");
        assert_eq!(
            remote.manifest.digest.to_string(),
            skopeo["Digest"],
            "{name}: manifest digest"
        );
        assert_eq!(remote.manifest.media_type, media_type, "{name}");
        assert_eq!(
            digests(&local),
            digests(&remote),
            "{tag}: layout vs registry"
        );
        assert_eq!(local.manifest.digest, remote.manifest.digest, "{tag}");
        assert_eq!(local.config.digest, remote.config.digest, "{tag}");
        assert_eq!(remote.platform.to_string(), "linux/amd64");
        assert_eq!(
            remote.config_summary.rootfs.diff_ids.len(),
            remote.layers.len()
        );
    }
    let zstd = resolve(&client, &format!("{host}/test/debian:bookworm-zstd"), None)
        .await
        .unwrap();
    assert_eq!(
        zstd.layers[0].media_type,
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let plain = resolve(&client, &format!("{host}/test/layers:plain"), None)
        .await
        .unwrap();
    assert!(
        plain
            .layers
            .iter()
            .all(|l| l.media_type == "application/vnd.oci.image.layer.v1.tar")
    );
    assert_eq!(plain.layers.len(), 3);
}

#[tokio::test]
async fn docker_schema2_manifests_resolve_like_skopeo_sees_them() {
    let host = shared_registry().host();
    let client = anonymous();
    for name in ["test/debian-docker:bookworm", "test/layers-docker:latest"] {
        let image = resolve(&client, &format!("{host}/{name}"), None)
            .await
            .expect(name);
        assert_eq!(
            image.manifest.media_type,
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        assert_eq!(
            image.config.media_type,
            "application/vnd.docker.container.image.v1+json"
        );
        assert!(
            image
                .layers
                .iter()
                .all(|l| l.media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip")
        );
        let skopeo = skopeo_inspect(&format!("docker://{host}/{name}"), &[]);
        assert_eq!(digests(&image), skopeo_layers(&skopeo), "{name}");
    }
}

#[tokio::test]
async fn multi_platform_indexes_and_lists_select_the_platform() {
    let host = shared_registry().host();
    let layout = layout_dir();
    let client = anonymous();
    let tiny_amd64 = resolve(
        &client,
        &format!("oci:{}:tiny-amd64", layout.display()),
        None,
    )
    .await
    .unwrap();
    let tiny_arm64 = resolve(
        &client,
        &format!("oci:{}:tiny-arm64", layout.display()),
        Some("linux/arm64"),
    )
    .await
    .unwrap();
    assert_ne!(digests(&tiny_amd64), digests(&tiny_arm64));
    for (image, index_type) in [
        (
            format!("{host}/test/multiarch:latest"),
            "application/vnd.oci.image.index.v1+json",
        ),
        (
            format!("{host}/test/multiarch-docker:latest"),
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ),
        (
            format!("oci:{}:multiarch", layout.display()),
            "application/vnd.oci.image.index.v1+json",
        ),
    ] {
        let default = resolve(&client, &image, None).await.expect(&image);
        assert_eq!(
            default.index.as_ref().expect("index").media_type,
            index_type,
            "{image}"
        );
        assert_eq!(default.platform.to_string(), "linux/amd64");
        assert_eq!(digests(&default), digests(&tiny_amd64), "{image}");
        for arm in ["linux/arm64", "linux/arm64/v8", "linux/aarch64"] {
            let arm64 = resolve(&client, &image, Some(arm)).await.expect(arm);
            assert_eq!(arm64.platform.to_string(), "linux/arm64");
            assert_eq!(digests(&arm64), digests(&tiny_arm64), "{image} {arm}");
        }
        let err = resolve(&client, &image, Some("linux/s390x"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NoMatchingPlatform { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("available: linux/amd64, linux/arm64"),
            "{err}"
        );
    }
    // An explicit platform that a single-platform image does not have is refused.
    let err = resolve(
        &client,
        &format!("{host}/test/layers:latest"),
        Some("linux/arm64"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::NoMatchingPlatform { .. }), "{err}");
}

#[tokio::test]
async fn digest_references_are_verified() {
    let registry = shared_registry();
    let client = anonymous();
    let by_tag = resolve(
        &client,
        &format!("{}/test/layers:latest", registry.host()),
        None,
    )
    .await
    .unwrap();
    let by_digest = resolve(
        &client,
        &format!("{}/test/layers@{}", registry.host(), by_tag.manifest.digest),
        None,
    )
    .await
    .unwrap();
    assert_eq!(by_digest.manifest.digest, by_tag.manifest.digest);
    assert_eq!(digests(&by_digest), digests(&by_tag));

    // A registry (here: the network) that returns other bytes than the digest names.
    let proxy = FaultProxy::start(registry.addr(), Shaping::default()).unwrap();
    proxy.add_rule(
        Rule::new(Fault::CorruptAt { at: 20 })
            .on_path("/manifests/")
            .always(),
    );
    let err = resolve(
        &client,
        &format!("{}/test/layers@{}", proxy.host(), by_tag.manifest.digest),
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    // By tag, the digest the registry states (Docker-Content-Digest) is checked too.
    let err = resolve(
        &client,
        &format!("{}/test/layers:latest", proxy.host()),
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
}

#[tokio::test]
async fn ranged_reads_equal_the_same_bytes_of_the_full_blob() {
    let registry = shared_registry();
    let client = anonymous();
    let image = resolve(
        &client,
        &format!("{}/test/debian:bookworm", registry.host()),
        None,
    )
    .await
    .unwrap();
    let layer = &image.layers[0];
    let full = read_blob(&client, &registry.host(), "test/debian", layer)
        .await
        .expect("full blob");
    assert_eq!(full.len() as u64, layer.size);
    let repository = client.repository(&registry.host(), "test/debian").unwrap();
    let size = layer.size;
    let mut ranges = vec![
        (0, 1),
        (size - 1, size),
        (0, size),
        (size / 2, size / 2 + (1 << 20)),
    ];
    let mut rng = fastrand::Rng::with_seed(42);
    for _ in 0..200 {
        let start = rng.u64(0..size);
        let len = match rng.u8(0..3) {
            0 => rng.u64(1..=64),
            1 => rng.u64(1..=256 << 10),
            _ => rng.u64(1..=4 << 20),
        };
        ranges.push((start, (start + len).min(size)));
    }
    for (start, end) in ranges {
        let bytes = repository
            .read_range(&layer.digest, start..end)
            .await
            .expect("range");
        assert!(
            bytes[..] == full[start as usize..end as usize],
            "range {start}..{end} differs"
        );
    }
    // The same through the OCI layout.
    let source = ImageSource::open(
        &format!("oci:{}:bookworm", layout_dir().display())
            .parse()
            .unwrap(),
        &client,
    )
    .unwrap();
    let bytes = source.read_range(&layer.digest, 1000..5000).await.unwrap();
    assert!(bytes[..] == full[1000..5000]);
    // Past the end is an error, not short data.
    let err = repository
        .read_range(&layer.digest, size - 10..size + 10)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
    assert!(
        source
            .read_range(&layer.digest, size - 10..size + 10)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_200_answer_to_a_range_request_is_handled() {
    let registry = shared_registry();
    let client = anonymous();
    let image = resolve(
        &client,
        &format!("{}/test/layers:latest", registry.host()),
        None,
    )
    .await
    .unwrap();
    let layer = &image.layers[0];
    let full = read_blob(&client, &registry.host(), "test/layers", layer)
        .await
        .unwrap();
    let proxy = FaultProxy::start(registry.addr(), Shaping::default()).unwrap();
    proxy.add_rule(Rule::new(Fault::IgnoreRange).always());
    let repository = client.repository(&proxy.host(), "test/layers").unwrap();
    for (start, end) in [(0u64, 100u64), (12345, 70000), (layer.size - 3, layer.size)] {
        let bytes = repository
            .read_range(&layer.digest, start..end)
            .await
            .unwrap();
        assert!(bytes[..] == full[start as usize..end as usize]);
    }
    assert!(
        proxy.exchanges().iter().all(|e| e.status == 200),
        "the server saw no Range"
    );
}

#[tokio::test]
async fn corrupted_blobs_are_errors_never_data() {
    let registry = shared_registry();
    let client = anonymous();
    let image = resolve(
        &client,
        &format!("{}/test/layers:latest", registry.host()),
        None,
    )
    .await
    .unwrap();
    let layer = image.layers[0].clone();
    let proxy = FaultProxy::start(registry.addr(), Shaping::default()).unwrap();
    proxy.add_rule(
        Rule::new(Fault::CorruptAt { at: 1000 })
            .on_path("/blobs/")
            .always(),
    );
    let err = read_blob(&client, &proxy.host(), "test/layers", &layer)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&layer.digest.to_string()));

    // A registry whose storage holds the wrong bytes for a digest.
    let own = TestRegistry::start(RegistryAuth::Anonymous).unwrap();
    let repository = client.repository(&own.host(), "test/damaged").unwrap();
    let content = Bytes::from(vec![7u8; 100_000]);
    let blob = BlobDescriptor {
        digest: Digest::sha256(&content),
        media_type: "application/octet-stream".into(),
        size: content.len() as u64,
    };
    assert!(
        repository
            .push_blob(&blob, Body::Bytes(content))
            .await
            .unwrap()
    );
    let data = own
        .storage()
        .join("data/docker/registry/v2/blobs/sha256")
        .join(&blob.digest.hex()[..2])
        .join(blob.digest.hex())
        .join("data");
    let mut damaged = std::fs::read(&data).unwrap();
    damaged[50_000] ^= 1;
    std::fs::write(&data, damaged).unwrap();
    let err = collect(repository.open_blob(&blob).await.unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    // A blob of the wrong size is refused as soon as it overflows.
    let short = BlobDescriptor {
        size: 99_999,
        ..blob.clone()
    };
    let err = collect(repository.open_blob(&short).await.unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
}

#[tokio::test]
async fn transient_faults_are_retried_and_transfers_resume() {
    let registry = shared_registry();
    let image = resolve(
        &anonymous(),
        &format!("{}/test/debian:bookworm", registry.host()),
        None,
    )
    .await
    .unwrap();
    let layer = &image.layers[0];
    let proxy = FaultProxy::start(registry.addr(), Shaping::default()).unwrap();
    let client = client_with(CredentialSource::None, Duration::from_secs(1));
    let blob = layer.digest.to_string();
    for rule in [
        Rule::new(Fault::Status {
            code: 503,
            retry_after: None,
        })
        .on_path("/manifests/")
        .times(2),
        Rule::new(Fault::Status {
            code: 500,
            retry_after: None,
        })
        .on_path(&blob),
        Rule::new(Fault::ResetBeforeResponse).on_path(&blob),
        Rule::new(Fault::ResetAfter { after: 5 << 20 }).on_path(&blob),
        Rule::new(Fault::TruncateAfter { after: 7 << 20 }).on_path(&blob),
        Rule::new(Fault::StallAfter {
            after: 1 << 20,
            pause: Some(Duration::from_secs(5)),
        })
        .on_path(&blob),
    ] {
        proxy.add_rule(rule);
    }
    let through_proxy = resolve(
        &client,
        &format!("{}/test/debian:bookworm", proxy.host()),
        None,
    )
    .await
    .unwrap();
    assert_eq!(through_proxy.manifest.digest, image.manifest.digest);
    let data = read_blob(&client, &proxy.host(), "test/debian", layer)
        .await
        .expect("blob despite faults");
    assert_eq!(Digest::sha256(&data), layer.digest);
    let injected = proxy.faults_injected();
    assert_eq!(injected, 7, "every fault was hit: {:#?}", proxy.exchanges());
    // Resumed transfers asked for the rest only.
    let resumed = proxy
        .exchanges()
        .iter()
        .filter(|e| e.target.contains("/blobs/") && e.status == 206)
        .count();
    assert!(resumed >= 3, "{:#?}", proxy.exchanges());
    // Ranged reads recover from the same faults.
    proxy.add_rule(Rule::new(Fault::ResetAfter { after: 100 }).on_path("/blobs/"));
    proxy.add_rule(
        Rule::new(Fault::Status {
            code: 502,
            retry_after: None,
        })
        .on_path("/blobs/"),
    );
    let repository = client.repository(&proxy.host(), "test/debian").unwrap();
    let bytes = repository
        .read_range(&layer.digest, 4096..(4096 + (1 << 20)))
        .await
        .unwrap();
    assert!(bytes[..] == data[4096..4096 + (1 << 20)]);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let registry = shared_registry();
    let proxy = FaultProxy::start(registry.addr(), Shaping::default()).unwrap();
    proxy.add_rule(
        Rule::new(Fault::Status {
            code: 429,
            retry_after: Some(2),
        })
        .on_path("/manifests/"),
    );
    let started = Instant::now();
    let image = resolve(
        &anonymous(),
        &format!("{}/test/layers:latest", proxy.host()),
        None,
    )
    .await
    .unwrap();
    assert_eq!(image.layers.len(), 3);
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "waited {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_exhausted_retry_budget_is_a_clear_error() {
    let registry = shared_registry();
    let proxy = FaultProxy::start(registry.addr(), Shaping::default()).unwrap();
    proxy.add_rule(
        Rule::new(Fault::Status {
            code: 503,
            retry_after: None,
        })
        .always(),
    );
    let client = RegistryClient::new(ClientOptions {
        credentials: CredentialSource::None,
        retry: RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(10),
            ..RetryPolicy::default()
        },
        ..ClientOptions::default()
    })
    .unwrap();
    let err = resolve(
        &client,
        &format!("{}/test/layers:latest", proxy.host()),
        None,
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::RetriesExhausted { attempts: 4, .. }),
        "{text}"
    );
    assert!(
        text.contains("gave up after 4 attempts") && text.contains("HTTP 503"),
        "{text}"
    );
    assert!(text.contains("test/layers"), "names the request: {text}");
    assert_eq!(proxy.exchanges().len(), 4);
    // A registry that is down entirely.
    proxy.clear_rules();
    proxy.set_down(true);
    let err = resolve(
        &client,
        &format!("{}/test/layers:latest", proxy.host()),
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::RetriesExhausted { .. }), "{err}");
}

fn auth_file(dir: &std::path::Path, host: &str, user: &str, password: &str) -> CredentialSource {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let path = dir.join(format!("auth-{user}-{password}.json"));
    std::fs::write(
        &path,
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    CredentialSource::Files(vec![path])
}

#[tokio::test]
async fn basic_auth_against_the_real_registry() {
    let (user, password) = ("alice", "correct-horse-battery");
    let registry = TestRegistry::start(RegistryAuth::Htpasswd { user, password }).unwrap();
    let host = registry.host();
    skopeo_copy(
        &format!("oci:{}:layers", layout_dir().display()),
        &format!("docker://{host}/private/layers:latest"),
        &["--dest-creds", &format!("{user}:{password}")],
    );
    let dir = tempfile::tempdir().unwrap();
    let image = format!("{host}/private/layers:latest");

    let good = client_with(
        auth_file(dir.path(), &host, user, password),
        Duration::from_secs(30),
    );
    let resolved = resolve(&good, &image, None)
        .await
        .expect("with credentials");
    let data = read_blob(&good, &host, "private/layers", &resolved.layers[0])
        .await
        .unwrap();
    assert_eq!(Digest::sha256(&data), resolved.layers[0].digest);

    let err = resolve(&anonymous(), &image, None).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    assert!(
        err.to_string().contains("no credentials were found"),
        "{err}"
    );

    let wrong = client_with(
        auth_file(dir.path(), &host, user, "wrong-password-123"),
        Duration::from_secs(30),
    );
    let err = resolve(&wrong, &image, None).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Unauthorized { .. }), "{text}");
    assert!(
        text.contains("rejected") && text.contains("alice"),
        "{text}"
    );
    assert!(
        !text.contains("wrong-password-123"),
        "the password leaked: {text}"
    );
}

struct TokenSetup {
    issuer: TokenIssuer,
    registry: TestRegistry,
    user: String,
    password: String,
}

async fn token_registry(options: IssuerOptions) -> TokenSetup {
    let (user, password) = options.users[0].clone();
    let issuer = TokenIssuer::start(options).unwrap();
    let registry = TestRegistry::start(RegistryAuth::Token(&issuer)).unwrap();
    // skopeo runs the same token flow: an independent check of the issuer and registry.
    skopeo_copy(
        &format!("oci:{}:layers", layout_dir().display()),
        &format!("docker://{}/private/layers:latest", registry.host()),
        &["--dest-creds", &format!("{user}:{password}")],
    );
    TokenSetup {
        issuer,
        registry,
        user,
        password,
    }
}

#[tokio::test]
async fn bearer_token_flow_against_the_real_registry() {
    let setup = token_registry(IssuerOptions::default()).await;
    let host = setup.registry.host();
    let dir = tempfile::tempdir().unwrap();
    let image = format!("{host}/private/layers:latest");
    let before = setup.issuer.issued();
    let client = client_with(
        auth_file(dir.path(), &host, &setup.user, &setup.password),
        Duration::from_secs(30),
    );
    let resolved = resolve(&client, &image, None).await.expect("token flow");
    for layer in &resolved.layers {
        let data = read_blob(&client, &host, "private/layers", layer)
            .await
            .unwrap();
        assert_eq!(Digest::sha256(&data), layer.digest);
    }
    assert_eq!(
        setup.issuer.issued() - before,
        1,
        "one token serves every request of the repository"
    );

    let err = resolve(&anonymous(), &image, None).await.unwrap_err();
    assert!(
        err.to_string().contains("refused anonymous access"),
        "{err}"
    );
    let wrong = client_with(
        auth_file(dir.path(), &host, &setup.user, "not-the-password"),
        Duration::from_secs(30),
    );
    let err = resolve(&wrong, &image, None).await.unwrap_err();
    assert!(
        err.to_string().contains("rejected the stored credentials"),
        "{err}"
    );
    assert!(!err.to_string().contains("not-the-password"));

    // Pushing asks for a push token.
    let repository = client.repository(&host, "private/pushed").unwrap();
    let content = Bytes::from_static(b"pushed through the token flow");
    let blob = BlobDescriptor {
        digest: Digest::sha256(&content),
        media_type: "application/octet-stream".into(),
        size: content.len() as u64,
    };
    assert!(
        repository
            .push_blob(&blob, Body::Bytes(content.clone()))
            .await
            .unwrap()
    );
    assert_eq!(
        read_blob(&client, &host, "private/pushed", &blob)
            .await
            .unwrap(),
        content
    );
}

#[tokio::test]
async fn a_token_that_expires_during_a_long_read_is_refreshed() {
    // Tokens live 3 s but claim 300 s, so the client learns of expiry from a 401.
    let setup = token_registry(IssuerOptions {
        lifetime: Duration::from_secs(3),
        advertised_lifetime: Some(Duration::from_secs(300)),
        ..IssuerOptions::default()
    })
    .await;
    let proxy = FaultProxy::start(setup.registry.addr(), Shaping::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client_with(
        auth_file(dir.path(), &proxy.host(), &setup.user, &setup.password),
        Duration::from_secs(30),
    );
    let image = resolve(
        &client,
        &format!("{}/private/layers:latest", proxy.host()),
        None,
    )
    .await
    .unwrap();
    let layer = image.layers.iter().max_by_key(|l| l.size).unwrap().clone();
    assert!(layer.size > 2 << 20, "the big layer: {}", layer.size);
    // The transfer pauses past the token's life, then breaks; the resume needs a new token.
    proxy.add_rule(
        Rule::new(Fault::PauseThenReset {
            after: 1 << 20,
            pause: Duration::from_secs(4),
        })
        .on_path("/blobs/"),
    );
    let issued_before = setup.issuer.issued();
    let data = read_blob(&client, &proxy.host(), "private/layers", &layer)
        .await
        .expect("read survives expiry");
    assert_eq!(Digest::sha256(&data), layer.digest);
    assert!(
        setup.issuer.issued() > issued_before,
        "a new token was fetched"
    );
    assert!(
        proxy.exchanges().iter().any(|e| e.status == 401),
        "the expired token was refused"
    );
}

#[tokio::test]
async fn tokens_are_renewed_before_they_expire() {
    let setup = token_registry(IssuerOptions {
        lifetime: Duration::from_secs(2),
        ..IssuerOptions::default()
    })
    .await;
    let proxy = FaultProxy::start(setup.registry.addr(), Shaping::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client_with(
        auth_file(dir.path(), &proxy.host(), &setup.user, &setup.password),
        Duration::from_secs(30),
    );
    let name = format!("{}/private/layers:latest", proxy.host());
    resolve(&client, &name, None).await.unwrap();
    let unauthorized = proxy.exchanges().iter().filter(|e| e.status == 401).count();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    resolve(&client, &name, None).await.unwrap();
    assert_eq!(
        proxy.exchanges().iter().filter(|e| e.status == 401).count(),
        unauthorized,
        "the second resolve sent a fresh token up front"
    );
    assert!(setup.issuer.issued() >= 2);
}

#[tokio::test]
async fn pushed_blobs_and_manifests_are_what_skopeo_reads() {
    let registry = TestRegistry::start(RegistryAuth::Anonymous).unwrap();
    let client = anonymous();
    let repository = client
        .repository(&registry.host(), "built/by-lazylayer")
        .unwrap();
    let layer_bytes = Bytes::from(
        std::fs::read(lazylayer_testkit::fixtures::fixtures_dir().join("layer3.tar")).unwrap(),
    );
    let layer = BlobDescriptor {
        digest: Digest::sha256(&layer_bytes),
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        size: layer_bytes.len() as u64,
    };
    let config_bytes = Bytes::from(format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        layer.digest
    ));
    let config = BlobDescriptor {
        digest: Digest::sha256(&config_bytes),
        media_type: "application/vnd.oci.image.config.v1+json".into(),
        size: config_bytes.len() as u64,
    };
    // A file body and a memory body.
    let layer_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(layer_file.path(), &layer_bytes).unwrap();
    assert!(
        repository
            .push_blob(&layer, Body::File(layer_file.path().to_path_buf()))
            .await
            .unwrap()
    );
    assert!(
        repository
            .push_blob(&config, Body::Bytes(config_bytes))
            .await
            .unwrap()
    );
    assert!(
        !repository
            .push_blob(&config, Body::Bytes(Bytes::new()))
            .await
            .unwrap(),
        "already there"
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [layer],
    });
    let manifest_bytes = Bytes::from(serde_json::to_vec(&manifest).unwrap());
    let digest = repository
        .put_manifest(
            "v1",
            "application/vnd.oci.image.manifest.v1+json",
            manifest_bytes.clone(),
        )
        .await
        .unwrap();
    assert_eq!(digest, Digest::sha256(&manifest_bytes));
    let skopeo = skopeo_inspect(
        &format!("docker://{}/built/by-lazylayer:v1", registry.host()),
        &[],
    );
    assert_eq!(skopeo["Digest"], digest.to_string());
    assert_eq!(skopeo_layers(&skopeo), vec![layer.digest.to_string()]);
    let image = resolve(
        &client,
        &format!("{}/built/by-lazylayer:v1", registry.host()),
        None,
    )
    .await
    .unwrap();
    assert_eq!(image.config.digest, config.digest);
    // A blob whose content does not match its digest is refused by the registry.
    let lie = BlobDescriptor {
        digest: Digest::sha256(b"something else"),
        media_type: "application/octet-stream".into(),
        size: 5,
    };
    assert!(
        repository
            .push_blob(&lie, Body::Bytes(Bytes::from_static(b"hello")))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn missing_things_are_named_in_errors() {
    let host = shared_registry().host();
    let client = anonymous();
    let err = resolve(&client, &format!("{host}/test/layers:no-such-tag"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(
        err.to_string().contains("no-such-tag") && err.to_string().contains("MANIFEST_UNKNOWN"),
        "{err}"
    );
    let err = resolve(
        &client,
        &format!("oci:{}:no-such-tag", layout_dir().display()),
        None,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("tags: bookworm"), "{err}");
    let err = resolve(&client, "oci:/nonexistent/layout", None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not an OCI image layout"), "{err}");
    let err = resolve(&client, &format!("oci:{}", layout_dir().display()), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("name one as oci:DIR:TAG"), "{err}");
    let reference = reference(&host, "test/layers:latest");
    assert_eq!(reference.tag.as_deref(), Some("latest"));
}

/// A manifest of an empty image, padded with an annotation to exactly `size` bytes.
fn padded_manifest(config: &BlobDescriptor, size: usize) -> Bytes {
    let build = |pad: usize| {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": [],
            "annotations": {"org.example.padding": "x".repeat(pad)},
        }))
        .unwrap()
    };
    let bytes = build(size - build(0).len());
    assert_eq!(bytes.len(), size);
    Bytes::from(bytes)
}

/// Writes `bytes` as a blob of the OCI layout at `dir`.
fn write_layout_blob(dir: &Path, bytes: &[u8]) -> Digest {
    let digest = Digest::sha256(bytes);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(digest.hex()), bytes).unwrap();
    digest
}

/// Writes an OCI layout at `dir` whose index.json tags the given manifests (blobs already
/// written), padded with an index annotation of `index_padding` bytes.
fn write_layout_index(dir: &Path, tags: &[(&str, &Digest, usize)], index_padding: usize) {
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let manifests: Vec<serde_json::Value> = tags
        .iter()
        .map(|(tag, digest, size)| {
            serde_json::json!({
                "mediaType": OCI_MANIFEST,
                "digest": digest.to_string(),
                "size": size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            })
        })
        .collect();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
        "annotations": {"org.example.padding": "x".repeat(index_padding)},
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

#[tokio::test]
async fn oversized_manifests_are_refused() {
    const LIMIT: usize = 4 << 20;
    let client = anonymous();
    let config_bytes = Bytes::from_static(
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    let config = BlobDescriptor {
        digest: Digest::sha256(&config_bytes),
        media_type: "application/vnd.oci.image.config.v1+json".into(),
        size: config_bytes.len() as u64,
    };
    let at_limit = padded_manifest(&config, LIMIT);
    let over = padded_manifest(&config, LIMIT + 1);

    // The real registry takes and serves a manifest of exactly the limit, and so does the client.
    let registry = TestRegistry::start(RegistryAuth::Anonymous).unwrap();
    let host = registry.host();
    let repository = client.repository(&host, "big/image").unwrap();
    repository
        .push_blob(&config, Body::Bytes(config_bytes.clone()))
        .await
        .unwrap();
    let at_limit_digest = repository
        .put_manifest("at-limit", OCI_MANIFEST, at_limit.clone())
        .await
        .expect("a manifest at the limit is pushed");
    for image in [
        format!("{host}/big/image:at-limit"),
        format!("{host}/big/image@{at_limit_digest}"),
    ] {
        let resolved = resolve(&client, &image, None).await.expect(&image);
        assert_eq!(resolved.manifest.digest, at_limit_digest);
        assert_eq!(resolved.config.digest, config.digest);
    }
    // CNCF distribution refuses one byte more (the limit is its limit), so a registry that
    // serves bigger manifests is played by the embedded layout registry below.
    let err = repository
        .put_manifest("over", OCI_MANIFEST, over.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Http { status: 400, .. }), "{err}");

    let dir = tempfile::tempdir().unwrap();
    write_layout_blob(dir.path(), &config_bytes);
    let at_limit_digest = write_layout_blob(dir.path(), &at_limit);
    let over_digest = write_layout_blob(dir.path(), &over);
    write_layout_index(
        dir.path(),
        &[
            ("at-limit", &at_limit_digest, at_limit.len()),
            ("over", &over_digest, over.len()),
        ],
        0,
    );
    let served = LayoutRegistry::start(dir.path()).unwrap();
    let layout = dir.path().display();
    let limit_text = format!("larger than the {LIMIT}-byte limit");
    for (image, named) in [
        (
            format!("{}/big/image:over", served.host()),
            "big/image:over".to_string(),
        ),
        (
            format!("{}/big/image@{over_digest}", served.host()),
            format!("big/image:{over_digest}"),
        ),
        (format!("oci:{layout}:over"), over_digest.to_string()),
        (
            format!("oci:{layout}@{over_digest}"),
            over_digest.to_string(),
        ),
    ] {
        let err = match resolve(&client, &image, None).await {
            Ok(resolved) => panic!("{image}: took a {}-byte manifest", resolved.manifest.size),
            Err(err) => err,
        };
        let text = err.to_string();
        assert!(matches!(err, Error::TooLarge { .. }), "{image}: {text}");
        assert!(
            text.contains(&limit_text) && text.contains(&named),
            "{image}: {text}"
        );
    }
    // The same source serves a manifest at the limit: the refusal is about size alone.
    for image in [
        format!("{}/big/image:at-limit", served.host()),
        format!("oci:{layout}:at-limit"),
    ] {
        let resolved = resolve(&client, &image, None).await.expect(&image);
        assert_eq!(resolved.manifest.digest, at_limit_digest);
    }

    // An oversized index.json is refused before it is parsed.
    let padded = tempfile::tempdir().unwrap();
    write_layout_blob(padded.path(), &config_bytes);
    let small = padded_manifest(&config, 1000);
    let small_digest = write_layout_blob(padded.path(), &small);
    write_layout_index(
        padded.path(),
        &[("small", &small_digest, small.len())],
        LIMIT,
    );
    let err = resolve(
        &client,
        &format!("oci:{}:small", padded.path().display()),
        None,
    )
    .await
    .map(|_| "resolved")
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::TooLarge { .. }), "{text}");
    assert!(
        text.contains("index.json") && text.contains(&limit_text),
        "{text}"
    );
    // Without the padding the same layout resolves.
    write_layout_index(padded.path(), &[("small", &small_digest, small.len())], 0);
    resolve(
        &client,
        &format!("oci:{}:small", padded.path().display()),
        None,
    )
    .await
    .expect("small index.json");
}

#[tokio::test]
async fn anonymous_bearer_tokens_pull_public_images() {
    // Docker Hub and GHCR: no credentials, yet every request needs a token from the realm.
    let setup = token_registry(IssuerOptions {
        anonymous_pull: true,
        ..IssuerOptions::default()
    })
    .await;
    let host = setup.registry.host();
    let skopeo = skopeo_inspect(
        &format!("docker://{host}/private/layers:latest"),
        &["--creds", &format!("{}:{}", setup.user, setup.password)],
    );
    let (issued, refused) = (setup.issuer.issued(), setup.issuer.refused());
    let client = anonymous();
    let image = resolve(&client, &format!("{host}/private/layers:latest"), None)
        .await
        .expect("anonymous token flow");
    assert_eq!(digests(&image), skopeo_layers(&skopeo));
    let layer = image.layers.iter().min_by_key(|l| l.size).unwrap();
    let data = read_blob(&client, &host, "private/layers", layer)
        .await
        .unwrap();
    assert_eq!(Digest::sha256(&data), layer.digest);
    let bytes = client
        .repository(&host, "private/layers")
        .unwrap()
        .read_range(&layer.digest, 10..20)
        .await
        .unwrap();
    assert!(bytes[..] == data[10..20]);
    assert_eq!(
        setup.issuer.issued() - issued,
        1,
        "one anonymous token serves the repository"
    );
    assert_eq!(setup.issuer.refused(), refused);

    // The anonymous token grants pull only: pushing is refused, with no credentials to blame.
    let content = Bytes::from_static(b"anonymous push");
    let blob = BlobDescriptor {
        digest: Digest::sha256(&content),
        media_type: "application/octet-stream".into(),
        size: content.len() as u64,
    };
    let err = client
        .repository(&host, "private/layers")
        .unwrap()
        .push_blob(&blob, Body::Bytes(content))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Unauthorized { .. } | Error::Denied { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_registry_that_never_accepts_times_out_within_the_budget() {
    let blackhole = Blackhole::start().unwrap();
    let client = RegistryClient::new(ClientOptions {
        credentials: CredentialSource::None,
        connect_timeout: Duration::from_secs(1),
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            ..RetryPolicy::default()
        },
        ..ClientOptions::default()
    })
    .unwrap();
    let image = format!("{}/test/layers:latest", blackhole.host());
    let err = tokio::time::timeout(Duration::from_secs(30), resolve(&client, &image, None))
        .await
        .expect("an error within 30 s, not a hang")
        .map(|_| "resolved")
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::RetriesExhausted { attempts: 3, .. }),
        "{text}"
    );
    assert!(
        text.contains("gave up after 3 attempts") && text.contains("test/layers"),
        "{text}"
    );
    // A connect timeout, in hyper's words ("tcp connect error: deadline has elapsed") or
    // reqwest's ("client error (Connect): operation timed out"), whichever timer fires first.
    let connect = text.contains("connect error") || text.contains("(Connect)");
    let timed_out = text.contains("deadline has elapsed") || text.contains("timed out");
    assert!(connect && timed_out, "names a connect timeout: {text}");
}

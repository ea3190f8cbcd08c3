//! The Kubernetes path of the snapshotter: containerd's CRI plugin (as kubelet drives it)
//! configured with `snapshotter = "lazylayer"` and `disable_snapshot_annotations = false`,
//! driven over its gRPC socket with the generated CRI clients: PullImage, RunPodSandbox,
//! CreateContainer, StartContainer, and the container's log.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use lazylayer_testkit::containerd::Containerd;
use lazylayer_testkit::fixtures::{layout_dir, shared_registry, skopeo_copy};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::common::*;
use crate::containerd::{SnapshotterProcess, holds_layer_blobs, require_containerd};

/// CRI's namespace in containerd.
const K8S: &str = "k8s.io";

/// A channel to containerd's gRPC socket (where CRI is served).
async fn channel(socket: &Path) -> Channel {
    let socket = socket.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connecting to CRI")
}

/// A pause image for the pod sandbox: the Debian fixture with `sleep infinity` as its command,
/// made by umoci and pushed with skopeo to the shared registry. Returns its reference.
fn pause_image() -> String {
    let scratch = tempfile::tempdir().unwrap();
    let layout = scratch.path().join("oci");
    skopeo_copy(
        &format!("oci:{}:bookworm", layout_dir().display()),
        &format!("oci:{}:pause", layout.display()),
        &[],
    );
    sh(&format!(
        "umoci config --image {}:pause --config.cmd sleep --config.cmd infinity",
        layout.display()
    ));
    let image = format!("{}/test/pause:latest", shared_registry().host());
    skopeo_copy(
        &format!("oci:{}:pause", layout.display()),
        &format!("docker://{image}"),
        &[],
    );
    image
}

/// CRI pulls the Debian image through the snapshotter (lazily: containerd's content store
/// holds no layer blob), runs a pod and a container in it, and the container's log shows
/// what it read from the image.
#[test]
fn cri_pulls_lazily_and_runs_a_pod() {
    if !require_containerd("cri::cri_pulls_lazily_and_runs_a_pod") {
        return;
    }
    let registry = indexed_registry();
    let image = format!("{registry}/test/debian:bookworm");
    let pause = pause_image();
    let lazy = Lazy::with_mode("ext4", "fanotify");
    std::fs::create_dir_all(lazy.root()).unwrap();
    let snapshotter = SnapshotterProcess::start(&lazy);
    let containerd = Containerd::start_with(&[("lazylayer", &snapshotter.socket)], Some(&pause));
    containerd.allow_plain_http(&registry);
    let logs = containerd.pod_logs();
    std::fs::create_dir_all(&logs).unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let output = runtime.block_on(async {
        let channel = channel(&containerd.cri_socket()).await;
        let mut images = ImageServiceClient::new(channel.clone());
        let mut pods = RuntimeServiceClient::new(channel);
        images
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", snapshotter.log()));
        let sandbox_config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "lazy".into(),
                uid: "lazy-uid".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            log_directory: logs.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        // The host's network: no CNI plugin is needed.
                        network: NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let pod = pods
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log()))
            .into_inner()
            .pod_sandbox_id;
        let container = pods
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: "reader".into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: image.clone(),
                        ..Default::default()
                    }),
                    command: vec!["sh".into()],
                    args: vec![
                        "-c".into(),
                        "cat /etc/debian_version; sha256sum /usr/bin/perl".into(),
                    ],
                    log_path: "reader.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(sandbox_config),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", containerd.log()))
            .into_inner()
            .container_id;
        pods.start_container(StartContainerRequest {
            container_id: container.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {e}"));
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = pods
                .container_status(ContainerStatusRequest {
                    container_id: container.clone(),
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap();
            if status.state == ContainerState::ContainerExited as i32 {
                assert_eq!(status.exit_code, 0, "{status:?}");
                break;
            }
            assert!(Instant::now() < deadline, "the container did not exit");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let output = std::fs::read_to_string(logs.join("reader.log")).unwrap();
        pods.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
        pods.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
        output
    });
    // CRI's log format: TIME STREAM TAG TEXT.
    let lines: Vec<&str> = output
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .collect();
    assert!(lines[0].starts_with("12."), "{output}");
    let reference = Reference::new("bookworm");
    let perl = std::fs::read(reference.path().join("usr/bin/perl")).unwrap();
    let expected = {
        use sha2::Digest;
        sha2::Sha256::digest(&perl)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert!(lines[1].starts_with(&expected), "{output}");
    assert_eq!(
        holds_layer_blobs(&containerd, K8S, "bookworm"),
        Vec::<String>::new(),
        "CRI downloaded the layer"
    );
    let log = snapshotter.log();
    assert!(log.contains("is lazy as"), "{log}");
}

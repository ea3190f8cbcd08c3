//! Today's way of starting a container, as the yardstick lazylayer is measured against: fetch
//! every layer whole (digest-verified), extract it with GNU tar, then run the workload on the
//! extraction with the same container runtime. Also: timing a workload's first output and exit.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lazylayer_source::{
    ClientOptions, ImageReference, ImageSource, PlatformChoice, RegistryClient,
};
use tokio::io::AsyncReadExt;

use crate::spec::{ContainerSpec, ImageRuntimeConfig};

/// When a run printed its first output and when it ended.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Time to the first byte on stdout, if any.
    pub first_output: Option<Duration>,
    /// Time to the exit.
    pub exit: Duration,
    /// The exit code.
    pub code: i32,
    /// Everything the workload printed on stdout.
    pub output: String,
}

/// Runs `command` (its stdout and stderr captured) and times it from `started`. A failing
/// workload is an error carrying its stderr.
pub async fn timed(
    mut command: tokio::process::Command,
    started: Instant,
) -> Result<Timing, String> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let errors = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let mut output = Vec::new();
    let mut first_output = None;
    let mut buffer = [0u8; 4096];
    loop {
        let n = stdout.read(&mut buffer).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        first_output.get_or_insert_with(|| started.elapsed());
        output.extend_from_slice(&buffer[..n]);
    }
    let status = child.wait().await.map_err(|e| e.to_string())?;
    let exit = started.elapsed();
    let code = status.code().unwrap_or(1);
    let errors = errors.await.unwrap_or_default();
    if code != 0 {
        return Err(format!("the workload failed ({code}): {errors}"));
    }
    Ok(Timing {
        first_output,
        exit,
        code,
        output: String::from_utf8_lossy(&output).into_owned(),
    })
}

/// Fetches every layer of `image` whole, extracts it under `work`, and runs `command` there
/// through `helper` (a `lazylayer` binary: `helper __container SPEC`). Returns the timing from
/// the start of the fetch and the bytes fetched.
pub async fn pull_extract_run(
    image: &str,
    command: &[String],
    work: &Path,
    helper: &Path,
) -> Result<(Timing, u64), String> {
    let started = Instant::now();
    let client = RegistryClient::new(ClientOptions::default()).map_err(|e| e.to_string())?;
    let reference: ImageReference = image
        .parse()
        .map_err(|e: lazylayer_source::Error| e.to_string())?;
    let source = ImageSource::open(&reference, &client).map_err(|e| e.to_string())?;
    let resolved = source
        .resolve(&PlatformChoice::host())
        .await
        .map_err(|e| e.to_string())?;
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| e.to_string())?;
    let mut fetched = 0;
    for layer in &resolved.layers {
        let path = work.join("layer");
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| e.to_string())?;
        let mut stream = source.open_blob(layer).await.map_err(|e| e.to_string())?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            fetched += chunk.len() as u64;
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                .await
                .map_err(|e| e.to_string())?;
        }
        let status = tokio::process::Command::new("tar")
            .args(["--numeric-owner", "-xpf"])
            .arg(&path)
            .arg("-C")
            .arg(&rootfs)
            .status()
            .await
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err("extracting the image failed".into());
        }
        let _ = std::fs::remove_file(&path);
    }
    let config: serde_json::Value =
        serde_json::from_slice(&resolved.config_bytes).map_err(|e| e.to_string())?;
    let runtime = ImageRuntimeConfig::from_image_config(&config);
    let spec = ContainerSpec {
        lowers: vec![rootfs],
        upper: work.join("upper"),
        work: work.join("work"),
        rootfs: work.join("mnt"),
        args: runtime.command(command),
        env: runtime.environment("lazylayer"),
        cwd: runtime
            .working_dir
            .clone()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "/".into()),
        user: runtime.user.clone().unwrap_or_default(),
        hostname: "lazylayer".into(),
    };
    for dir in [&spec.upper, &spec.work, &spec.rootfs] {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let spec_path = work.join("spec.json");
    std::fs::write(
        &spec_path,
        serde_json::to_vec(&spec).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let mut run = tokio::process::Command::new(helper);
    run.arg(crate::HELPER_ARGUMENT).arg(&spec_path);
    Ok((timed(run, started).await?, fetched))
}

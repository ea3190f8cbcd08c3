//! `lazylayer demo`: the whole story in one command, with nothing but this machine. A sample
//! image is built once from files already here, served by a registry embedded in this process
//! behind a link shaped like a real one (100 Mbit/s, 20 ms by default), and one workload runs
//! three times, measured in the same run: the way it is done today (pull the whole image,
//! extract, run), lazily with lazylayer, then (once that store's background population has
//! finished, its layers have detached and a check confirms that nothing lazy is left, so that
//! nothing else shares the link) lazily on a fresh store with the profile the second run
//! recorded.

mod image;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use lazylayer_container::baseline::{pull_extract_run, timed};
use lazylayer_loopback::layout_registry::LayoutRegistry;
use lazylayer_loopback::proxy::{FaultProxy, Shaping};
use lazylayer_source::{ClientOptions, ImageSource, PlatformChoice, RegistryClient};

use crate::options::GlobalArgs;
use crate::shared::human_size;

/// Options of `demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Bandwidth of the simulated link to the registry, in Mbit/s.
    #[arg(long, default_value_t = 100)]
    pub mbit: u64,
    /// Added round-trip latency of the simulated link, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub latency_ms: u64,
}

fn exe() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?)
}

fn lazylayer(root: &Path, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(exe().expect("own executable"));
    command.arg("--root").arg(root).args(args);
    command
}

async fn status(root: &Path) -> anyhow::Result<serde_json::Value> {
    let output = lazylayer(root, &["status", "--json"]).output().await?;
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn seconds(duration: Option<Duration>) -> String {
    duration.map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

/// Runs `demo`.
pub async fn run(global: &GlobalArgs, args: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        rustix::process::geteuid().is_root(),
        "the demo mounts filesystems and uses fanotify: run it as root (sudo lazylayer demo)"
    );
    std::fs::create_dir_all(&global.root)?;
    let sample = image::ensure(&global.root.join("demo"))?;
    let registry = LayoutRegistry::start(&sample.layout)?;
    let shaping = Shaping::link(args.mbit, args.latency_ms);
    let proxy = FaultProxy::start(registry.addr(), shaping)?;
    let image = format!("{}/demo/sample:latest", proxy.host());
    let size: u64 = {
        let client = RegistryClient::new(ClientOptions::default())?;
        let source = ImageSource::open(&image.parse()?, &client)?;
        source
            .resolve(&PlatformChoice::host())
            .await?
            .layers
            .iter()
            .map(|l| l.size)
            .sum()
    };
    let work = tempfile::Builder::new()
        .prefix("lazylayer-demo.")
        .tempdir_in("/var/tmp")?;
    let lazy_root = work.path().join("store");
    std::fs::create_dir_all(&lazy_root)?;
    println!("lazylayer demo");
    println!("  workload: {}", sample.description);
    println!(
        "  image:    {} compressed, served by a registry in this process over a {} Mbit/s link with {} ms latency",
        human_size(size),
        args.mbit,
        args.latency_ms
    );
    println!();

    println!("1. today: pull the whole image, extract it, run the workload");
    let (baseline, baseline_fetched) = pull_extract_run(
        &image,
        &sample.command,
        &work.path().join("baseline"),
        &exe()?,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    println!("   output: {}", baseline.output.trim());
    println!("2. lazylayer: run the workload at once, fetching what it reads");
    let started = Instant::now();
    let pulled = lazylayer(&lazy_root, &["pull", &image]).output().await?;
    anyhow::ensure!(
        pulled.status.success(),
        "pull failed: {}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    let pull_time = started.elapsed();
    let mut command = lazylayer(&lazy_root, &["run", "--record", &image, "--"]);
    command.args(&sample.command);
    let lazy = timed(command, started).await.map_err(anyhow::Error::msg)?;
    println!("   output: {}", lazy.output.trim());
    let after_run = status(&lazy_root).await?;
    println!(
        "   the image was usable after {:.2} s; the workload then waited for {} files",
        pull_time.as_secs_f64(),
        after_run["demanded_files"].as_u64().unwrap_or(0)
    );
    let lazy_fetched: u64 = after_run["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["bytes_fetched"].as_u64().unwrap_or(0))
        .sum();
    println!();
    println!("3. background population of run 2's store until its layers detach");
    let started = Instant::now();
    let output = lazylayer(&lazy_root, &["detach", "--wait", &image])
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "detach failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let final_status = status(&lazy_root).await?;
    let layers = final_status["layers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let detached = layers.iter().all(|l| l["phase"] == "detached");
    let marks = if final_status["daemon_running"] == true {
        final_status["marked_files"].as_u64().unwrap_or(0)
    } else {
        0
    };
    println!(
        "   every layer detached after {:.2} s more",
        started.elapsed().as_secs_f64()
    );
    println!(
        "   nothing lazy left: {} ({} layer(s) detached, {} fanotify marks, daemon {})",
        if detached && marks == 0 { "yes" } else { "NO" },
        layers.iter().filter(|l| l["phase"] == "detached").count(),
        marks,
        if final_status["daemon_running"] == true {
            "still running"
        } else {
            "exited"
        }
    );
    stop_daemon(&final_status);
    // After run 2's store has detached: its background population would share the link.
    println!("4. lazylayer again, on a fresh store that has the profile recorded by run 2");
    let profiled_root = work.path().join("profiled");
    std::fs::create_dir_all(profiled_root.join("profiles"))?;
    for profile in std::fs::read_dir(lazy_root.join("profiles"))? {
        let profile = profile?.path();
        std::fs::copy(
            &profile,
            profiled_root
                .join("profiles")
                .join(profile.file_name().unwrap_or_default()),
        )?;
    }
    let started = Instant::now();
    let mut command = lazylayer(&profiled_root, &["run", &image, "--"]);
    command.args(&sample.command);
    let profiled = timed(command, started).await.map_err(anyhow::Error::msg)?;
    println!("   output: {}", profiled.output.trim());
    let profiled_status = status(&profiled_root).await?;
    let profiled_fetched: u64 = profiled_status["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["bytes_fetched"].as_u64().unwrap_or(0))
        .sum();
    stop_daemon_now(&profiled_status).await;
    println!();
    println!(
        "{:<28} {:>14} {:>10} {:>22}",
        "", "first output", "exit", "fetched"
    );
    println!(
        "{:<28} {:>14} {:>10} {:>22}",
        "full pull + extract + run",
        seconds(baseline.first_output),
        seconds(Some(baseline.exit)),
        format!("{} (100%)", human_size(baseline_fetched))
    );
    println!(
        "{:<28} {:>14} {:>10} {:>22}",
        "lazylayer run",
        seconds(lazy.first_output),
        seconds(Some(lazy.exit)),
        format!(
            "{} ({:.0}%)",
            human_size(lazy_fetched),
            lazy_fetched as f64 * 100.0 / size.max(1) as f64
        )
    );
    println!(
        "{:<28} {:>14} {:>10} {:>22}",
        "lazylayer run, profiled",
        seconds(profiled.first_output),
        seconds(Some(profiled.exit)),
        format!(
            "{} ({:.0}%)",
            human_size(profiled_fetched),
            profiled_fetched as f64 * 100.0 / size.max(1) as f64
        )
    );
    println!(
        "lazily, the workload finished {:.1}x sooner ({:.1}x with the profile); its exit code was {}",
        baseline.exit.as_secs_f64() / lazy.exit.as_secs_f64(),
        baseline.exit.as_secs_f64() / profiled.exit.as_secs_f64(),
        lazy.code
    );
    anyhow::ensure!(detached && marks == 0, "something lazy was left");
    Ok(())
}

/// The pid of the daemon's holder, if `status` says the daemon runs.
fn running_daemon(status: &serde_json::Value) -> Option<rustix::process::Pid> {
    if status["daemon_running"] != true {
        return None;
    }
    status["pid"]
        .as_i64()
        .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
}

/// Stops a daemon the demo started (from its status) once it has nothing lazy left.
fn stop_daemon(status: &serde_json::Value) {
    if let Some(pid) = running_daemon(status) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// Stops a daemon whose layers are still lazy at once, as told twice (see `lazylayer serve
/// --help`): told once, it would fill them first, over the link the demo measures. Nothing
/// uses the layers any more, and their store is removed with the demo's directory.
async fn stop_daemon_now(status: &serde_json::Value) {
    let Some(pid) = running_daemon(status) else {
        return;
    };
    for _ in 0..2 {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while rustix::process::test_kill_process(pid).is_ok() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

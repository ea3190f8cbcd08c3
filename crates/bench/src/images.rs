//! What the container-start benchmarks through an engine share (containerd, podman): the
//! Debian and python fixture images pushed to a registry with their bound lazy indexes, and the
//! three workloads run on them.

use std::process::{Command, Stdio};

use lazylayer_testkit::containerd::Containerd;
use lazylayer_testkit::fixtures::{layout_dir, skopeo_copy};
use lazylayer_testkit::proxy::Shaping;

/// Options of the container-start benchmarks through an engine.
#[derive(clap::Args)]
pub struct Args {
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Only the workloads whose name contains this.
    #[arg(long)]
    pub workload: Option<String>,
    /// Only the 100 Mbit/s + 20 ms link.
    #[arg(long)]
    pub slow_link_only: bool,
}

/// The links measured: 100 Mbit/s + 20 ms, and (unless `slow_only`) 1 Gbit/s + 1 ms.
pub fn links(slow_only: bool) -> Vec<(Shaping, &'static str)> {
    let mut links = vec![(Shaping::link(100, 20), "100 Mbit/s + 20 ms")];
    if !slow_only {
        links.push((Shaping::link(1000, 1), "1 Gbit/s + 1 ms"));
    }
    links
}

/// The images in the registry: Debian minbase and Debian with python3.
pub const IMAGES: [&str; 2] = ["bench/debian:bookworm", "bench/python:bookworm"];

/// A command run in a fresh container of an image.
pub struct Workload {
    /// What the tables call it.
    pub name: &'static str,
    /// Repository:tag in the registry.
    pub image: &'static str,
    /// The command.
    pub command: Vec<&'static str>,
}

/// The fixture layout's tag of each of [`IMAGES`].
const LAYOUT_TAGS: [&str; 2] = ["bookworm", "bookworm-python"];

/// Pushes `image` (one of [`IMAGES`]) from the fixture layout to `registry` as `to` with skopeo,
/// then binds its lazy index to it (`lazylayer index --push INDEX_ARGS`, indexing into the store
/// `root`).
fn push_one(
    registry: &str,
    image: &str,
    to: &str,
    root: &std::path::Path,
    index_args: &[String],
) -> anyhow::Result<()> {
    let position = IMAGES.iter().position(|i| *i == image);
    let tag = LAYOUT_TAGS[position.ok_or_else(|| anyhow::anyhow!("{image} is not a fixture"))?];
    skopeo_copy(
        &format!("oci:{}:{tag}", layout_dir().display()),
        &format!("docker://{registry}/{to}"),
        &[],
    );
    let status = Command::new(crate::lazylayer())
        .arg("--root")
        .arg(root)
        .args(["index", "--push", &format!("{registry}/{to}")])
        .args(index_args)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "indexing {to}");
    Ok(())
}

/// Pushes [`IMAGES`] to `registry` with skopeo, then binds their lazy indexes to them
/// (`lazylayer index --push INDEX_ARGS`).
pub fn push_indexed(registry: &str, index_args: &[String]) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    for image in IMAGES {
        push_one(registry, image, image, scratch.path(), index_args)?;
    }
    Ok(())
}

/// A copy of `workload`'s image at its tag + `suffix`, with its lazy index and a prefetch
/// profile of the workload bound to it: recorded on a fresh store by `lazylayer run --record
/// --push`, as the first node of a cluster would. Returns the paths the profile lists.
pub fn push_profiled(
    registry: &str,
    workload: &Workload,
    suffix: &str,
) -> anyhow::Result<Vec<String>> {
    let dir = crate::scratch::dir("ll-bench-profile.")?;
    let root = dir.path().join("root");
    let to = format!("{}{suffix}", workload.image);
    push_one(registry, workload.image, &to, &root, &[])?;
    let image = format!("{registry}/{to}");
    eprintln!("recording a profile of {:?} on {image}", workload.name);
    let output = Command::new(crate::lazylayer())
        .arg("--root")
        .arg(&root)
        .args(["run", "--record", "--push", &image, "--"])
        .args(&workload.command)
        .output()?;
    if let Ok(status) = Command::new(crate::lazylayer())
        .arg("--root")
        .arg(&root)
        .args(["status", "--json"])
        .output()
        && let Ok(status) = serde_json::from_slice::<serde_json::Value>(&status.stdout)
    {
        lazylayer_testkit::daemon::kill_from_status(&status);
    }
    lazylayer_testkit::unmount_everything_under(dir.path());
    anyhow::ensure!(
        output.status.success(),
        "recording a profile on {image}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut paths = Vec::new();
    for profile in std::fs::read_dir(root.join("profiles"))? {
        let profile: serde_json::Value = serde_json::from_slice(&std::fs::read(profile?.path())?)?;
        paths.extend(
            profile["files"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f["path"].as_str().map(str::to_string)),
        );
    }
    Ok(paths)
}

/// Copies of `images` made by `ctr-remote image convert FLAG --oci` (`--estargz`,
/// `--zstdchunked`) in a private containerd, pushed next to the originals with `suffix` after
/// their tag.
pub fn convert(registry: &str, images: &[&str], flag: &str, suffix: &str) -> anyhow::Result<()> {
    for image in images {
        convert_one(registry, image, &format!("{image}{suffix}"), &[flag])?;
    }
    Ok(())
}

/// A copy of `image` at `to` made by `ctr-remote image convert ARGS --oci` in a private
/// containerd.
pub fn convert_one(registry: &str, image: &str, to: &str, args: &[&str]) -> anyhow::Result<()> {
    let unused = std::path::PathBuf::from("/nonexistent.sock");
    let containerd = Containerd::start_with(&[("unused", &unused)], None);
    let (from, to) = (format!("{registry}/{image}"), format!("{registry}/{to}"));
    eprintln!("converting {from} with {args:?} (ctr-remote, about a minute)");
    containerd.ctr_remote_ok(&["image", "pull", "--plain-http", &from]);
    let mut convert = vec!["image", "convert"];
    convert.extend(args);
    convert.extend(["--oci", &from, &to]);
    containerd.ctr_remote_ok(&convert);
    containerd.ctr_remote_ok(&["image", "push", "--plain-http", &to]);
    Ok(())
}

/// The workloads `--workload` selects (`only`: a part of the name).
pub fn workloads(only: Option<&str>) -> Vec<Workload> {
    [
        Workload {
            name: "minbase: /bin/true",
            image: IMAGES[0],
            command: vec!["/bin/true"],
        },
        Workload {
            name: "python3: import json, http.server",
            image: IMAGES[1],
            command: vec!["python3", "-c", "import json, http.server"],
        },
        Workload {
            name: "perl: one-liner",
            image: IMAGES[0],
            command: vec![
                "perl",
                "-e",
                "print join(q(,), map { $_ * $_ } 1..5), qq(\\n)",
            ],
        },
    ]
    .into_iter()
    .filter(|w| crate::selected(only, w.name))
    .collect()
}

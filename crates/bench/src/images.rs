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

/// Pushes [`IMAGES`] to `registry` with skopeo, then binds their lazy indexes to them
/// (`lazylayer index --push`).
pub fn push_indexed(registry: &str) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    for (tag, name) in [("bookworm", IMAGES[0]), ("bookworm-python", IMAGES[1])] {
        skopeo_copy(
            &format!("oci:{}:{tag}", layout_dir().display()),
            &format!("docker://{registry}/{name}"),
            &[],
        );
        let status = Command::new(crate::lazylayer())
            .arg("--root")
            .arg(scratch.path())
            .args(["index", "--push", &format!("{registry}/{name}")])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "indexing {name}");
    }
    Ok(())
}

/// Copies of `images` made by `ctr-remote image convert FLAG --oci` (`--estargz`,
/// `--zstdchunked`) in a private containerd, pushed next to the originals with `suffix` after
/// their tag.
pub fn convert(registry: &str, images: &[&str], flag: &str, suffix: &str) -> anyhow::Result<()> {
    let unused = std::path::PathBuf::from("/nonexistent.sock");
    let containerd = Containerd::start_with(&[("unused", &unused)], None);
    for image in images {
        let from = format!("{registry}/{image}");
        let to = format!("{from}{suffix}");
        eprintln!("converting {from} with {flag} (ctr-remote, about a minute)");
        containerd.ctr_remote_ok(&["image", "pull", "--plain-http", &from]);
        containerd.ctr_remote_ok(&["image", "convert", flag, "--oci", &from, &to]);
        containerd.ctr_remote_ok(&["image", "push", "--plain-http", &to]);
    }
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

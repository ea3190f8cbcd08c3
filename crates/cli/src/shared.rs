//! What several commands share: the engine for the global options, sizes as people read
//! them, and how a pull's progress is shown.

use std::sync::Mutex;

use indicatif::ProgressBar;
use lazylayer_engine::{Engine, EngineOptions, PullEvent};
use lazylayer_source::RegistryClient;

use crate::options::GlobalArgs;

/// The pipeline over the store the global options name; `lazylayer` itself is the program it
/// starts as the daemon and as the container helper.
pub fn engine(global: &GlobalArgs) -> anyhow::Result<Engine> {
    Ok(Engine::new(EngineOptions {
        root: global.root.clone(),
        insecure_registries: global.insecure_registries.clone(),
        hosts_dir: global.hosts_dir(),
        program: std::env::current_exe()?,
    }))
}

/// Fails at once, saying why, unless this process runs as root.
pub fn require_root(command: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        rustix::process::geteuid().is_root(),
        "lazylayer {command} needs root: it mounts filesystems, places fanotify marks or serves \
         FUSE (run it with sudo)"
    );
    Ok(())
}

/// The registry client every command uses, configured from the global options.
pub fn registry_client(global: &GlobalArgs) -> anyhow::Result<RegistryClient> {
    Ok(engine(global)?.registry_client()?)
}

/// Sizes as people read them: `95.1 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Shows a pull's progress on stderr: a line per layer, a bar while a layer is fetched whole.
#[derive(Default)]
pub struct PullReport {
    bar: Mutex<Option<ProgressBar>>,
}

impl PullReport {
    /// Shows one event.
    pub fn show(&self, event: PullEvent<'_>) {
        match event {
            PullEvent::Present { layer, phase } => {
                eprintln!("{layer}: already in the store ({phase:?})")
            }
            PullEvent::IndexUnbound { layer } => {
                eprintln!(
                    "{layer}: the registry's lazy index is an unbound referrer, which nothing \
                     the image reference names vouches for; building one here from the \
                     verified blob instead (--index-trust referrer would use it)"
                )
            }
            PullEvent::IndexUnusable { layer, reason } => {
                eprintln!(
                    "{layer}: the registry's lazy index is unusable ({reason}); building one here"
                )
            }
            PullEvent::FetchingWhole { layer, size } => {
                eprintln!(
                    "{layer}: no usable lazy index; fetching the layer once ({}) to build one",
                    human_size(size)
                );
                let label = format!("layer {}/{}", layer.position, layer.count);
                *self.bar.lock().expect("bar") = Some(crate::progress::bytes(size, &label));
            }
            PullEvent::Fetched { bytes, .. } => {
                if let Some(bar) = self.bar.lock().expect("bar").as_ref() {
                    bar.set_position(bytes);
                }
            }
            PullEvent::FetchedWhole { .. } => {
                if let Some(bar) = self.bar.lock().expect("bar").take() {
                    bar.finish_and_clear();
                }
            }
            PullEvent::ProfileFetched { files } => eprintln!(
                "the image's prefetch profile from the registry lists {files} files: they are \
                 filled first"
            ),
            PullEvent::ProfileUnusable { reason } => {
                eprintln!("not using the image's prefetch profile: {reason}")
            }
            PullEvent::Ready {
                layer,
                entries,
                origin,
                frontend,
            } => eprintln!(
                "{layer}: {entries} entries ready ({}, {} index)",
                frontend.name(),
                origin.name()
            ),
        }
    }
}

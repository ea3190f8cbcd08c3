//! `lazylayer pull IMAGE`: make an image's layers available lazily and return once it can be
//! mounted.

use clap::{Args, ValueEnum};
use lazylayer_engine::PullOptions;

use crate::options::GlobalArgs;
use crate::shared::{PullReport, engine};

/// How lazy layers are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// fanotify where the store's filesystem takes pre-content marks, FUSE elsewhere.
    Auto,
    /// fanotify pre-content events (Linux 6.14+, store on ext4, xfs or btrfs).
    Fanotify,
    /// A FUSE mount per lazy layer, with passthrough once a file is local (any kernel, any
    /// store filesystem).
    Fuse,
}

impl From<Mode> for lazylayer_engine::Mode {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Auto => lazylayer_engine::Mode::Auto,
            Mode::Fanotify => lazylayer_engine::Mode::Fanotify,
            Mode::Fuse => lazylayer_engine::Mode::Fuse,
        }
    }
}

/// Which of the registry's lazy indexes `pull` uses lazily.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IndexTrust {
    /// Only an index the image reference covers: listed, next to the manifest, by the image
    /// index the tag or digest names (what `lazylayer index --push` publishes). Any other
    /// layer is fetched whole once and indexed here.
    Bound,
    /// Also an unbound index found among the manifest's referrers. Whoever may push to the
    /// repository can attach one to any image, even one pinned by digest. Each file's tar
    /// header is checked against it before the file's data is served, but names, modes and
    /// link targets of entries without data show what it says until the layer is checked
    /// whole at detach; any lie then fails the layer for good.
    Referrer,
}

impl From<IndexTrust> for lazylayer_engine::IndexTrust {
    fn from(trust: IndexTrust) -> Self {
        match trust {
            IndexTrust::Bound => lazylayer_engine::IndexTrust::Bound,
            IndexTrust::Referrer => lazylayer_engine::IndexTrust::Referrer,
        }
    }
}

/// Options of `pull`.
#[derive(Args, Debug)]
pub struct PullArgs {
    /// The image: HOST[:PORT]/NAME[:TAG|@DIGEST] or oci:DIR[:TAG].
    #[arg(value_name = "IMAGE")]
    pub image: String,

    /// How lazy layers are served.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,

    /// Platform to pick from a multi-platform image (default: this machine's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,

    /// Which of the registry's lazy indexes to use lazily.
    #[arg(long, value_enum, default_value_t = IndexTrust::Bound)]
    pub index_trust: IndexTrust,
}

/// Runs `pull`.
pub async fn run(global: &GlobalArgs, args: PullArgs) -> anyhow::Result<()> {
    let report = PullReport::default();
    let options = PullOptions {
        platform: args.platform.clone(),
        mode: args.mode.into(),
        index_trust: args.index_trust.into(),
        lazy_only: false,
        background_takeup: false,
    };
    let pulled = engine(global)?
        .pull(&args.image, &options, &|event| report.show(event))
        .await?;
    let mut text = format!(
        "pulled {} ({} layers); mount it with `lazylayer mount`\n",
        pulled.image.reference,
        pulled.image.layers.len()
    );
    if pulled.built_here > 0 {
        text.push_str(&format!(
            "note: {} layer(s) had no lazy index and were fetched whole; after `lazylayer index --push {}` other machines load them lazily\n",
            pulled.built_here, args.image
        ));
    }
    crate::output::print(&text)
}

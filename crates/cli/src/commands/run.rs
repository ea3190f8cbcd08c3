//! `lazylayer run IMAGE [-- COMMAND ARGS...]`: pull lazily, then run the command (by default
//! the image's Entrypoint/Cmd) in a container on the image, and exit with its exit code.

use clap::Args;
use lazylayer_engine::{PullOptions, RunOptions};

use crate::commands::pull::{IndexTrust, Mode};
use crate::options::GlobalArgs;
use crate::shared::{PullReport, engine};

/// Options of `run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The image: HOST[:PORT]/NAME[:TAG|@DIGEST] or oci:DIR[:TAG].
    #[arg(value_name = "IMAGE")]
    pub image: String,

    /// The command and its arguments (default: the image's Entrypoint and Cmd).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,

    /// How lazy layers are served.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,

    /// Platform to pick from a multi-platform image (default: this machine's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,

    /// Which of the registry's lazy indexes to use lazily (see `pull --help`).
    #[arg(long, value_enum, default_value_t = IndexTrust::Bound)]
    pub index_trust: IndexTrust,

    /// Keep the container's writable layer (under --root/run) afterwards.
    #[arg(long)]
    pub keep: bool,

    /// Host name inside the container.
    #[arg(long, default_value = "lazylayer")]
    pub hostname: String,

    /// Record the files the workload waited for, in order, as the image's prefetch profile
    /// (--root/profiles/<manifest>.json): later pulls fill them first. Files recorded before
    /// are kept, and the new ones added after them. Record on a cold image.
    #[arg(long)]
    pub record: bool,

    /// With --record: afterwards, push the image's prefetch profile to its registry and bind it
    /// to the image, as `index --push` binds lazy indexes (the tag is re-pointed at an OCI
    /// image index listing the unchanged manifest and the profile). Pulls elsewhere that have
    /// no profile of their own then fetch it and fill its files first. The image must be named
    /// by tag, and you need push access to its repository.
    #[arg(long, requires = "record")]
    pub push: bool,
}

/// Runs `run`; returns the workload's exit code.
pub async fn run(global: &GlobalArgs, args: RunArgs) -> anyhow::Result<i32> {
    let report = PullReport::default();
    let options = RunOptions {
        image: args.image.clone(),
        command: args.command.clone(),
        pull: PullOptions {
            platform: args.platform.clone(),
            mode: args.mode.into(),
            index_trust: args.index_trust.into(),
            lazy_only: false,
            background_takeup: false,
        },
        keep: args.keep,
        hostname: args.hostname.clone(),
        record: args.record,
        push_profile: args.push,
    };
    let outcome = engine(global)?
        .run(&options, &|event| report.show(event))
        .await?;
    if let Some(upper) = &outcome.kept {
        eprintln!("kept the container's writable layer in {}", upper.display());
    }
    if outcome.nothing_to_record {
        eprintln!(
            "not recording a profile: every layer of {} is already local",
            args.image
        );
    }
    if let Some(recorded) = &outcome.recorded {
        eprintln!(
            "recorded {} files the workload waited for in {} ({} files listed)",
            recorded.waited,
            recorded.path.display(),
            recorded.listed
        );
    }
    if let Some(pushed) = &outcome.pushed {
        eprintln!(
            "pushed the prefetch profile ({} files) as artifact {}; the tag now names image \
             index {}, which binds it to the image",
            pushed.files, pushed.artifact, pushed.image_index
        );
    }
    Ok(outcome.exit_code)
}

//! `lazylayer detach IMAGE [--wait]`: populate an image's layers now, and (with `--wait`)
//! return once each is complete, verified and detached.

use clap::Args;
use lazylayer_daemon::{Request, client};
use lazylayer_store::{Phase, Store};

use crate::commands::{images, pull};
use crate::options::GlobalArgs;

/// Options of `detach`.
#[derive(Args, Debug)]
pub struct DetachArgs {
    /// A pulled image.
    #[arg(value_name = "IMAGE")]
    pub image: String,
    /// Wait until every layer is detached.
    #[arg(long)]
    pub wait: bool,
}

/// Runs `detach`.
pub async fn run(global: &GlobalArgs, args: DetachArgs) -> anyhow::Result<()> {
    let store = Store::new(&global.root);
    let image = images::find(&store, &args.image)?;
    let lazy: Vec<_> = image
        .layers
        .iter()
        .filter(|l| store.phase(&l.digest).ok().flatten() == Some(Phase::Lazy))
        .map(|l| l.digest.clone())
        .collect();
    if !lazy.is_empty() {
        pull::start_daemon(global).await?;
        let response = client::request(
            &store.socket(),
            &Request::Detach {
                layers: lazy,
                wait: args.wait,
            },
        )
        .await?;
        if !response.ok {
            anyhow::bail!("detach failed: {}", response.error.unwrap_or_default());
        }
    }
    let still: Vec<_> = image
        .layers
        .iter()
        .filter(|l| store.phase(&l.digest).ok().flatten() != Some(Phase::Detached))
        .collect();
    let text = if still.is_empty() {
        format!("{}: every layer is detached\n", image.reference)
    } else {
        format!(
            "{}: {} layer(s) still populating in the background\n",
            image.reference,
            still.len()
        )
    };
    crate::output::print(&text)
}

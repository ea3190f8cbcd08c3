//! One module per command.

pub mod index;
pub mod inspect;
mod layer_indexes;

use lazylayer_source::{ClientOptions, RegistryClient};

use crate::options::{Cli, Command, GlobalArgs};

/// Runs the chosen command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(args) => inspect::run(&cli.global, args).await,
        Command::Index(args) => index::run(&cli.global, args).await,
    }
}

/// The registry client every command uses, configured from the global options.
pub fn registry_client(global: &GlobalArgs) -> anyhow::Result<RegistryClient> {
    Ok(RegistryClient::new(ClientOptions {
        insecure_registries: global.insecure_registries.clone(),
        ..ClientOptions::default()
    })?)
}

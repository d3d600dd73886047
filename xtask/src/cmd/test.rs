//! `test`: fetch what the tests read, then `cargo test --workspace`.
use anyhow::Result;
use clap::Args;

/// Arguments of `test`.
#[derive(Args)]
pub struct Test {
    /// Extra arguments for `cargo test` (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

impl Test {
    /// Fetches every model and the data, then runs the whole test suite.
    pub fn run(self) -> Result<()> {
        for m in crate::fetch::MODELS {
            crate::fetch::model(m.name, None)?;
        }
        crate::fetch::data(None)?;
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["test", "--workspace"])
            .args(&self.args)
            .status()?;
        anyhow::ensure!(status.success(), "cargo test failed ({status})");
        Ok(())
    }
}

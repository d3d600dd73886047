//! `longgen`: the long-generation task — α's λ tuned on a development split and confirmed on
//! the held-out one, then full, streaming, trig, α(trig) and hetero with decode-time
//! compression at fixed token budgets over a long teacher-forced continuation.
use crate::progress::Bars;
use anyhow::Result;
use clap::Args;
use eval::longgen::{LongGenOptions, TokenBudget};
use std::path::PathBuf;

/// Arguments of `longgen`.
#[derive(Args)]
pub struct LongGen {
    /// Prompt tokens.
    #[arg(long, default_value_t = 256)]
    prompt: usize,
    /// Teacher-forced continuation tokens.
    #[arg(long, default_value_t = 1024)]
    continuation: usize,
    /// Token budgets per KV head (a share of the final length as `1/8`).
    #[arg(long, value_delimiter = ',', default_values_t = ["64".to_string(), "128".into(), "256".into(), "1/8".into()])]
    budgets: Vec<String>,
    /// Budgets α's λ is tuned at (the paper's b ∈ {64, 128}).
    #[arg(long, value_delimiter = ',', default_values_t = ["64".to_string(), "128".into()])]
    tune_budgets: Vec<String>,
    /// Held-out samples.
    #[arg(long, default_value_t = 4)]
    samples: usize,
    /// Development samples α's λ is tuned on.
    #[arg(long, default_value_t = 2)]
    dev_samples: usize,
    /// Output directory (default: $KVND_HOME/longgen).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    model: crate::session::ModelArg,
}

fn budget(s: &str) -> Result<TokenBudget> {
    Ok(s.parse()?)
}

impl LongGen {
    /// Runs the task and writes longgen.md and longgen.json.
    pub fn run(self) -> Result<()> {
        let s = crate::session::open(&self.model)?;
        let opts = LongGenOptions {
            prompt: self.prompt,
            continuation: self.continuation,
            budgets: self
                .budgets
                .iter()
                .map(|b| budget(b))
                .collect::<Result<_>>()?,
            tune_budgets: self
                .tune_budgets
                .iter()
                .map(|b| budget(b))
                .collect::<Result<_>>()?,
            samples: self.samples,
            dev_samples: self.dev_samples,
            ..Default::default()
        };
        let t0 = std::time::Instant::now();
        let report = eval::longgen::run(&s, &opts, &Bars::default())?;
        let md = eval::longgen::markdown(&report, &opts);
        let out = match self.out {
            Some(o) => o,
            None => crate::paths::home()?.join("longgen"),
        };
        std::fs::create_dir_all(&out)?;
        std::fs::write(out.join("longgen.md"), &md)?;
        std::fs::write(
            out.join("longgen.json"),
            serde_json::to_string_pretty(&report)?,
        )?;
        print!("{md}");
        println!(
            "\n{:.0} s; written to {}",
            t0.elapsed().as_secs_f64(),
            out.display()
        );
        Ok(())
    }
}

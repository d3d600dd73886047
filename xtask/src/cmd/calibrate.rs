//! `calibrate`: the per-layer loss of every expert of the menu (cached).
use crate::progress::Bars;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Arguments of `calibrate`.
#[derive(Args)]
pub struct Calibrate {
    /// Context tokens of the calibration passages.
    #[arg(long, default_value_t = eval::CalibrationSpec::DEFAULT_CONTEXT)]
    context: usize,
    /// Prose passages.
    #[arg(long, default_value_t = 1)]
    prose: usize,
    /// Synthetic retrieval passages (needles and variable tracking over the calibration split).
    #[arg(long, default_value_t = 2)]
    retrieval: usize,
    /// The loss measured: attention (the attention-output proxy), kl or answer-logp (end to
    /// end, one forward per layer and expert).
    #[arg(long, default_value = "attention")]
    loss: solver::CalibrationLoss,
    /// Where to write the table (default: the cache, keyed by the model's sha256).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    model: crate::session::ModelArg,
}

impl Calibrate {
    /// Measures (or reuses) the table and prints its size and mean loss.
    pub fn run(self) -> Result<()> {
        let s = crate::session::open(&self.model)?;
        let spec = eval::CalibrationSpec {
            context: self.context,
            prose: self.prose,
            retrieval: self.retrieval,
            loss: self.loss,
        };
        let t = s.table(&spec, self.out, &Bars::default())?;
        let cells = (t.loss.len() * t.menu.len()).max(1);
        let mean: f64 = t.loss.iter().flatten().sum::<f64>() / cells as f64;
        println!(
            "{} layers × {} experts ({spec}), mean loss {mean:.4}",
            t.loss.len(),
            t.menu.len()
        );
        Ok(())
    }
}

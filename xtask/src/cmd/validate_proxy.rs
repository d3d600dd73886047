//! `validate-proxy`: which calibration (passages × loss) ranks (layer, expert) pairs like the
//! answer log-probability held-out retrieval samples lose (see `eval::calibration::validate`).
use anyhow::{Context, Result};
use clap::Args;
use eval::calibration::{ValidateOptions, validate};

/// Arguments of `validate-proxy`.
#[derive(Args)]
pub struct ValidateProxy {
    /// Context tokens of the calibration passages and the held-out samples.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Layers measured (comma-separated) [default: six spread evenly from the first to the
    /// last].
    #[arg(long)]
    layers: Option<String>,
    /// Experts measured, spread evenly over the menu.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Held-out retrieval samples (evaluation split, every non-QA RULER task in turn).
    #[arg(long, default_value_t = 6)]
    held_out: usize,
    /// Calibration retrieval passages compared [default: 4, the default table's].
    #[arg(long)]
    retrieval: Option<usize>,
    /// Print every pair's measurements too.
    #[arg(long)]
    pairs: bool,
    #[command(flatten)]
    model: crate::session::ModelArg,
}

impl ValidateProxy {
    /// Measures every candidate and prints the ranking.
    pub fn run(self) -> Result<()> {
        let s = crate::session::open(&self.model)?;
        let layers = s.model.model.config.layers;
        let mut o = ValidateOptions::spread(layers, self.context);
        if let Some(l) = &self.layers {
            o.layers = l
                .split(',')
                .map(|s| s.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .context("--layers: comma-separated layer indices")?;
        }
        o.experts = self.experts;
        o.held_out = self.held_out;
        o.retrieval = self.retrieval.unwrap_or(o.retrieval);
        let t0 = std::time::Instant::now();
        let r = validate(&s, &o, &crate::progress::Bars::default())?;
        if self.pairs {
            print_pairs(&r);
        }
        print!("{}", r.markdown());
        println!(
            "\n{} pairs ({} layers × {} experts), {} held-out samples of ≤ {} tokens ({:.0} s), {:.0} s in all",
            r.pairs.len(),
            o.layers.len(),
            r.pairs.len() / o.layers.len().max(1),
            o.held_out,
            o.context,
            r.held_out_seconds,
            t0.elapsed().as_secs_f64()
        );
        if let Some(b) = r.best() {
            println!(
                "best by the held-out answers: {} prose + {} retrieval, {} loss (Spearman {:+.3})",
                b.spec.prose,
                b.spec.retrieval,
                b.spec.loss,
                b.answer.unwrap_or(f64::NAN)
            );
        }
        Ok(())
    }
}

/// Every pair's held-out measurements beside the attention proxy on prose and on retrieval.
fn print_pairs(r: &eval::calibration::ProxyReport) {
    let shown: Vec<&eval::calibration::Candidate> = r
        .candidates
        .iter()
        .filter(|c| {
            c.spec.loss == solver::CalibrationLoss::Attention
                && c.spec.prose * c.spec.retrieval == 0
        })
        .collect();
    let heads: String = shown
        .iter()
        .map(|c| {
            format!(
                " attention, {} prose + {} retrieval |",
                c.spec.prose, c.spec.retrieval
            )
        })
        .collect();
    println!("| layer | expert | held-out answer log-p drop | held-out prose KL |{heads}");
    println!("|---:|---|---:|---:|{}", "---:|".repeat(shown.len()));
    for (i, (l, e)) in r.pairs.iter().enumerate() {
        let cells: String = shown
            .iter()
            .map(|c| format!(" {:.4} |", c.values[i]))
            .collect();
        println!(
            "| {l} | {e} | {:+.4} | {:.5} |{cells}",
            r.answer_drop[i], r.prose_kl[i]
        );
    }
    println!();
}

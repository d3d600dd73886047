//! `solve`: every layer's expert under a byte budget, written as a TOML plan.
use anyhow::{Context, Result};
use clap::Args;
use solver::{Budget, Method, SensitivityTable};
use std::path::{Path, PathBuf};

/// Arguments of `solve`.
#[derive(Args)]
pub struct Solve {
    /// Budget: a fraction of the fp16 cache (1/14, 0.25) or bytes (3MiB).
    #[arg(long)]
    budget: String,
    /// hetero, hetero+rank, 2d, 1d, 2d_uniform, a scorer's uniform keep (snapkv, h2o,
    /// expected_attention, …), adakv(<scorer>) or pyramid(<scorer>).
    #[arg(long, default_value = "hetero")]
    method: Method,
    /// greedy or exact.
    #[arg(long, default_value = "exact")]
    solver: String,
    /// A calibration table (default: the cached one, calibrating if needed).
    #[arg(long)]
    table: Option<PathBuf>,
    /// Where to write the plan.
    #[arg(long, default_value = "plan.toml")]
    out: PathBuf,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

impl Solve {
    /// Solves and writes the plan.
    pub fn run(self) -> Result<()> {
        let exact = match self.solver.as_str() {
            "exact" => true,
            "greedy" => false,
            other => anyhow::bail!("unknown solver {other:?}: greedy or exact"),
        };
        solve(
            self.table.as_deref(),
            &self.budget,
            self.method,
            exact,
            &self.out,
            self.json,
        )
    }
}

/// Solves a plan under a budget and writes it as TOML.
pub fn solve(
    table: Option<&Path>,
    budget: &str,
    method: Method,
    exact: bool,
    out: &Path,
    json: bool,
) -> Result<()> {
    let table: SensitivityTable = match table {
        Some(p) => serde_json::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("{} is not a calibration table", p.display()))?,
        None => crate::session::open()?.table(2048, 1, None, &crate::progress::Bars::default())?,
    };
    let layers = table.loss.len();
    // SmolLM2-135M geometry (3 KV heads × 64); the table's token count is the planning length.
    let layout = kv_tensor::KvLayout::new(layers, 3, 9, 64)?;
    let geo = eval::methods::geometry(layout, table.tokens);
    let fp16 = layout.fp16_bytes(1, table.tokens);
    let budget_bytes = budget.parse::<Budget>()?.bytes(fp16).get();
    let loss = |l: usize, e: usize| table.loss[l][e];
    let solver::Planned {
        plan,
        bytes,
        predicted_loss,
    } = method.plan(&table.menu, &loss, &geo, budget_bytes, exact)?;
    std::fs::write(out, plan.to_toml()?).with_context(|| format!("writing {}", out.display()))?;
    let loss_at = |l: usize, e: &router::Expert| {
        let i = table.menu.iter().position(|m| m == e)?;
        Some(table.loss[l][i])
    };
    let show = |x: Option<f64>| x.map_or_else(|| "-".into(), |x| format!("{x:.4}"));
    if json {
        let layers: Vec<_> = plan
            .layers
            .iter()
            .map(|e| serde_json::to_value(e).unwrap_or_default())
            .collect();
        println!(
            "{}",
            serde_json::json!({"method": method.name(), "budget_bytes": budget_bytes, "plan_bytes": bytes.get(), "full_bytes": fp16.get(), "predicted_loss": predicted_loss, "layers": layers})
        );
    } else {
        println!("layer | expert                              | bytes      | predicted loss");
        for (l, e) in plan.layers.iter().enumerate() {
            println!(
                "{l:5} | {:35} | {:>10} | {}",
                e.to_string(),
                kv_tensor::Bytes(e.footprint(&geo.shape, geo.tokens).total().get()).to_string(),
                show(loss_at(l, e))
            );
        }
        println!(
            "{} plan {} of budget {} (fp16 cache {}: {:.1}x), predicted loss {}; written to {}",
            method.name(),
            bytes,
            kv_tensor::Bytes(budget_bytes),
            fp16,
            fp16.get() as f64 / bytes.get().max(1) as f64,
            show(predicted_loss),
            out.display()
        );
    }
    Ok(())
}

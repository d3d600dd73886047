//! `solve`: every layer's expert under a byte budget, written as a TOML plan.
use anyhow::{Context, Result};
use clap::Args;
use solver::{Budget, Method, SensitivityTable};
use std::path::PathBuf;

/// Arguments of `solve`.
#[derive(Args)]
pub struct Solve {
    /// Budget: a fraction of the fp16 cache (1/14, 0.25) or bytes (3MiB).
    #[arg(long)]
    pub budget: String,
    /// hetero (a scorer per layer), hetero(<scorer>) (one scorer), hetero+rank, hetero+share,
    /// 2d, 1d, 2d_uniform, a scorer's uniform keep (snapkv, h2o, kvzip, expected_attention, …),
    /// adakv(<scorer>), chunkkv(<scorer>) or pyramid(<scorer>).
    #[arg(long, default_value = "hetero")]
    pub method: Method,
    /// greedy or exact.
    #[arg(long, default_value = "exact")]
    pub solver: String,
    /// A calibration table (default: the model's cached one, calibrating if needed).
    #[arg(long)]
    pub table: Option<PathBuf>,
    /// The prompt length (tokens) the plan is sized for [default: the table's calibration
    /// length]. Budgets are fractions of this length's fp16 cache; the residual window and
    /// whole quantization groups make a plan's ratio drift at other lengths.
    #[arg(long)]
    pub context: Option<usize>,
    /// Tokens to be generated after the prompt: the plan is solved for prompt + generated
    /// tokens, and every evicting layer gets a decode budget that holds it there while
    /// generating (re-evicting every 32 generated tokens with its scorer).
    #[arg(long)]
    pub generate: Option<usize>,
    /// Where to write the plan.
    #[arg(long, default_value = "plan.toml")]
    pub out: PathBuf,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub model: crate::session::ModelArg,
}

impl Solve {
    /// Solves and writes the plan.
    pub fn run(self) -> Result<()> {
        solve(&self)
    }
}

/// The table and the model's KV layout: the given table checked against the model (its sha256
/// and layer count), or the model's cached table.
fn table_and_layout(a: &Solve) -> Result<(SensitivityTable, kv_tensor::KvLayout)> {
    match &a.table {
        Some(p) => {
            let table: SensitivityTable = serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("{} is not a calibration table", p.display()))?;
            let model = a.model.path()?;
            let sha = eval::sha256_file(&model)?;
            anyhow::ensure!(
                table.model_sha256 == sha,
                "{} was calibrated on another model (sha256 {}…), not {} ({}…): pass that model's --model",
                p.display(),
                &table.model_sha256[..12.min(table.model_sha256.len())],
                model.display(),
                &sha[..12]
            );
            // The layout is in the header's metadata: no need to build the model.
            let gguf = models::gguf::Gguf::open(&model)?;
            let layout = models::LlamaConfig::from_gguf(&gguf)?.kv_layout();
            Ok((table, layout))
        }
        None => {
            let s = crate::session::open(&a.model)?;
            let spec = eval::CalibrationSpec::default();
            let table = s.table(&spec, None, &crate::progress::Bars::default())?;
            Ok((table, s.model.model.config.kv_layout()))
        }
    }
}

/// Solves a plan under a budget and writes it as TOML.
pub fn solve(a: &Solve) -> Result<()> {
    let exact = match a.solver.as_str() {
        "exact" => true,
        "greedy" => false,
        other => anyhow::bail!("unknown solver {other:?}: greedy or exact"),
    };
    let (method, json, out) = (a.method, a.json, &a.out);
    let (table, layout) = table_and_layout(a)?;
    anyhow::ensure!(
        table.loss.len() == layout.layers,
        "the table has {} layers but the model has {}",
        table.loss.len(),
        layout.layers
    );
    let tokens = a.context.unwrap_or(table.tokens) + a.generate.unwrap_or(0);
    anyhow::ensure!(tokens > 0, "--context must be at least one token");
    let geo = solver::Geometry::new(layout, tokens);
    let fp16 = layout.fp16_bytes(1, tokens);
    let budget_bytes = a.budget.parse::<Budget>()?.bytes(fp16).get();
    let credited = table.solver_loss();
    let loss = |l: usize, e: usize| credited[l][e];
    let solver::Planned {
        mut plan,
        bytes,
        predicted_loss,
    } = method.plan(&table.menu, &loss, &geo, budget_bytes, exact)?;
    if a.generate.is_some() {
        plan = plan.with_decode(tokens, router::DecodeBudget::DEFAULT_INTERVAL);
    }
    plan.sized_for = Some(router::SizedFor {
        tokens,
        bytes: bytes.get(),
        fp16_bytes: fp16.get(),
    });
    std::fs::write(out, plan.to_toml()?).with_context(|| format!("writing {}", out.display()))?;
    let loss_at = |l: usize, e: &router::Expert| {
        // A decode budget is added after solving: the menu's expert is the one without it.
        let plain = router::Expert {
            decode: None,
            ..e.clone()
        };
        let i = table.menu.iter().position(|m| *m == plain)?;
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

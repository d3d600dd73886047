//! `validate-proxy`: the calibration proxy against end-to-end KL with one layer compressed.
use anyhow::{Context, Result};
use clap::Args;

/// Arguments of `validate-proxy`.
#[derive(Args)]
pub struct ValidateProxy {
    /// Context tokens (the proxy table at this length is reused or measured).
    #[arg(long, default_value_t = 2048)]
    context: usize,
    /// Layers measured (comma-separated) [default: six spread evenly from the first to the
    /// last].
    #[arg(long)]
    layers: Option<String>,
    /// Experts measured, spread evenly over the menu.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Continuation tokens the KL is averaged over.
    #[arg(long, default_value_t = 64)]
    continuation: usize,
    #[command(flatten)]
    model: crate::session::ModelArg,
}

impl ValidateProxy {
    /// Measures and prints the table and the Spearman correlation.
    pub fn run(self) -> Result<()> {
        validate_proxy(&self)
    }
}

/// Proxy vs measured end-to-end KL on a subset of layers × experts (see the CLI help).
fn validate_proxy(a: &ValidateProxy) -> Result<()> {
    let (context, experts, continuation) = (a.context, a.experts, a.continuation);
    let s = crate::session::open(&a.model)?;
    let n_layers = s.model.model.config.layers;
    let spread: Vec<String> = (0..6)
        .map(|i| (i * (n_layers - 1) / 5).to_string())
        .collect();
    let layers = a.layers.clone().unwrap_or_else(|| spread.join(","));
    let table = s.table(context, 1, None, &crate::progress::Bars::default())?;
    let (m, axes) = (&s.model, &s.axes);
    let layers: Vec<usize> = layers
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .context("--layers: comma-separated layer indices")?;
    if let Some(bad) = layers.iter().find(|&&l| l >= table.loss.len()) {
        anyhow::bail!(
            "layer {bad} does not exist (the model has {})",
            table.loss.len()
        );
    }
    let n = table.menu.len();
    let picks: Vec<usize> = (0..experts.clamp(2, n))
        .map(|i| i * (n - 1) / (experts.clamp(2, n) - 1))
        .collect();
    let pairs: Vec<(usize, router::Expert)> = layers
        .iter()
        .flat_map(|&l| picks.iter().map(move |&e| (l, e)))
        .map(|(l, e)| (l, table.menu[e].clone()))
        .collect();
    // A passage disjoint from the calibration passages.
    let ids = s.passage(900_000, context + continuation)?;
    let pb = crate::progress::bar(pairs.len() as u64, "measure KL");
    let t0 = std::time::Instant::now();
    let measured = solver::MeasuredKl::measure(
        &m.model,
        &ids[..context],
        &ids[context..],
        &pairs,
        axes,
        |done, _| pb.set_position(done as u64),
    )?;
    pb.finish_and_clear();
    println!("| layer | expert | proxy (attention error) | measured KL |\n|---:|---|---:|---:|");
    let (mut proxy, mut kl) = (Vec::new(), Vec::new());
    for (l, e, k) in &measured.entries {
        let p = solver::LossPredictor::loss(&table, *l, e).unwrap_or(f64::NAN);
        println!("| {l} | {e} | {p:.4} | {k:.5} |");
        proxy.push(p);
        kl.push(*k);
    }
    match solver::spearman(&proxy, &kl) {
        Some(r) => println!(
            "Spearman(proxy, KL) = {r:.3} over {} pairs ({} layers × {} experts), {:.0} s",
            kl.len(),
            layers.len(),
            picks.len(),
            t0.elapsed().as_secs_f64()
        ),
        None => println!("Spearman undefined (constant values)"),
    }
    Ok(())
}

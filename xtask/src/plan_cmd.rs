//! `calibrate`, `solve` and `bench`.
use anyhow::{Context, Result};
use solver::{Budget, Method, SensitivityTable};
use std::path::{Path, PathBuf};

/// Measures (or reuses) the calibration table and writes it to `out` (or the cache).
pub fn calibrate(context: usize, passages: usize, out: Option<PathBuf>) -> Result<()> {
    let t = crate::eval::Calibrated::default_model()?.table(context, passages, out)?;
    let mean: f64 = t.loss.iter().flatten().sum::<f64>() / (t.loss.len() * t.menu.len()) as f64;
    println!(
        "{} layers × {} experts, mean proxy loss {mean:.4}",
        t.loss.len(),
        t.menu.len()
    );
    Ok(())
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
        None => crate::eval::Calibrated::default_model()?.table(2048, 1, None)?,
    };
    let layers = table.loss.len();
    // SmolLM2-135M geometry (3 KV heads × 64); the table's token count is the planning length.
    let layout = kv_tensor::KvLayout::new(layers, 3, 9, 64)?;
    let geo = crate::eval::geometry(layout, table.tokens);
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

/// Runs the criterion benches in the release profile: speed is what a user's release build gets
/// (the dev profile keeps debug assertions and overflow checks, which cost decode ~2×). The
/// first run builds the release profile once (a few minutes). Before the decode bench, hetero
/// plans at 1/4, 1/8 and 1/14 are solved from the calibration table (calibrating if needed);
/// after the benches, `generate` runs on an 8k-token prose prompt with the full cache and the
/// 1/8 plan (chunked and compress-at-end prefill) to show peak memory next to the plan's bytes.
pub fn bench() -> Result<()> {
    crate::fetch::model(crate::fetch::DEFAULT_MODEL, None)?;
    let plans = std::env::current_dir()?
        .join("target")
        .join("kvnd-bench-plans");
    std::fs::create_dir_all(&plans)?;
    for (budget, name) in [("1/4", "1_4"), ("1/8", "1_8"), ("1/14", "1_14")] {
        let out = plans.join(format!("hetero-{name}.toml"));
        solve(None, budget, Method::Hetero, false, &out, true)?;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for (pkg, bench) in [
        ("models", "forward"),
        ("kv-tensor", "attention"),
        ("kvnd-tests", "decode"),
        ("axis-quant", "kivi"),
        ("axis-evict", "evict"),
    ] {
        let status = std::process::Command::new(&cargo)
            .args(["bench", "-p", pkg, "--bench", bench, "--"])
            .args(["--warm-up-time", "1", "--measurement-time", "5"])
            .env("KVND_BENCH_PLANS", &plans)
            .status()?;
        anyhow::ensure!(status.success(), "bench {pkg}/{bench} failed ({status})");
    }
    peak_memory(&plans.join("hetero-1_8.toml"))
}

/// `generate` on an 8k-token prose prompt, each run in its own process so that its peak RSS
/// is its own: the full fp16 cache, and the 1/8 plan prefilled chunk by chunk and at the end.
fn peak_memory(plan: &Path) -> Result<()> {
    let c = crate::eval::Calibrated::default_model()?;
    let ids = crate::eval::passage(&c.m, &c.text, 1_500_000, 7600)?;
    let prompt = format!(
        "{}\n\nSummarize the text above in three sentences.",
        c.m.tokenizer.decode(&ids)?
    );
    let exe = std::env::current_exe()?;
    let plan = plan.to_string_lossy().into_owned();
    for (what, extra) in [
        ("full fp16 cache", vec![]),
        ("hetero 1/8, chunked prefill", vec!["--plan", plan.as_str()]),
        (
            "hetero 1/8, compress at end",
            vec!["--plan", plan.as_str(), "--compress-at-end"],
        ),
    ] {
        println!("\n== generate, ~7.6k-token prompt, {what}");
        let out = std::process::Command::new(&exe)
            .args(["generate", "--max-new", "16", "--prompt", &prompt])
            .args(extra)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "generate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            if ["prompt ", "KV cache", "peak RSS"]
                .iter()
                .any(|p| line.starts_with(p))
            {
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// Proxy vs measured end-to-end KL on a subset of layers × experts (see the CLI help).
pub fn validate_proxy(
    context: usize,
    layers: &str,
    experts: usize,
    continuation: usize,
) -> Result<()> {
    let c = crate::eval::Calibrated::default_model()?;
    let table = c.table(context, 1, None)?;
    let (m, text, axes) = (&c.m, &c.text, &c.axes);
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
        .map(|(l, e)| (l, table.menu[e]))
        .collect();
    // A passage disjoint from the calibration passages.
    let ids = crate::eval::passage(m, text, 900_000, context + continuation)?;
    let pb = crate::eval::bar(pairs.len() as u64, "measure KL");
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

//! `bench`: the criterion benches in the release profile, then peak memory of `generate`.
use anyhow::Result;
use solver::Method;
use std::path::Path;

/// Arguments of `bench`.
#[derive(clap::Args)]
pub struct Bench {
    #[command(flatten)]
    pub model: crate::session::ModelArg,
}

/// Runs the criterion benches in the release profile: speed is what a user's release build gets
/// (the dev profile keeps debug assertions and overflow checks, which cost decode ~2×). The
/// first run builds the release profile once (a few minutes). Before the decode bench, hetero
/// plans at 1/4, 1/8 and 1/14 are solved from the calibration table (calibrating if needed);
/// after the benches, `generate` runs on an 8k-token prose prompt with the full cache and the
/// 1/8 plan (chunked and compress-at-end prefill) to show peak memory next to the plan's bytes.
pub fn bench(model: &crate::session::ModelArg) -> Result<()> {
    let model_file = model.path()?;
    let plans = std::env::current_dir()?
        .join("target")
        .join("kvnd-bench-plans");
    std::fs::create_dir_all(&plans)?;
    for (budget, name) in [("1/4", "1_4"), ("1/8", "1_8"), ("1/14", "1_14")] {
        let out = plans.join(format!("hetero-{name}.toml"));
        super::solve::solve(&super::solve::Solve {
            budget: budget.into(),
            method: Method::Hetero,
            solver: "greedy".into(),
            table: None,
            context: None,
            out,
            json: true,
            model: model.clone(),
        })?;
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
            .env("KVND_MODEL", &model_file)
            .status()?;
        anyhow::ensure!(status.success(), "bench {pkg}/{bench} failed ({status})");
    }
    peak_memory(model, &plans.join("hetero-1_8.toml"))
}

/// `generate` on an 8k-token prose prompt, each run in its own process so that its peak RSS
/// is its own: the full fp16 cache, and the 1/8 plan prefilled chunk by chunk and at the end.
fn peak_memory(model: &crate::session::ModelArg, plan: &Path) -> Result<()> {
    let s = crate::session::open(model)?;
    let ids = s.passage(1_500_000, 7600)?;
    let prompt = format!(
        "{}\n\nSummarize the text above in three sentences.",
        s.model.tokenizer.decode(&ids)?
    );
    let exe = std::env::current_exe()?;
    let model_file = model.path()?.to_string_lossy().into_owned();
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
            .args(["--model", &model_file])
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

//! `bench`: the criterion benches in the release profile, then peak memory of `generate`.
use anyhow::Result;
use solver::Method;
use std::path::Path;

/// Arguments of `bench`.
#[derive(clap::Args)]
pub struct Bench {
    #[command(flatten)]
    pub model: crate::session::ModelArg,
    /// Only the speed table (prefill and decode with the full cache, llama.cpp beside it when
    /// a Python with llama-cpp-python is found): minutes instead of the criterion suite's half
    /// hour.
    #[arg(long)]
    pub speed_only: bool,
}

/// Runs the criterion benches in the release profile: speed is what a user's release build gets
/// (the speed table before them runs in whatever profile xtask was built in, the dev profile
/// for `cargo xtask`, whose kernel crates are built like release). The first run builds the
/// release profile once (a few minutes). Before the decode bench, hetero
/// plans at 1/4, 1/8 and 1/14 are solved from the calibration table (calibrating if needed);
/// after the benches, `generate` runs on an 8k-token prose prompt with the full cache and the
/// 1/8 plan (chunked and compress-at-end prefill) to show peak memory next to the plan's bytes.
pub fn bench(args: &Bench) -> Result<()> {
    let model = &args.model;
    speed_table(model)?;
    if args.speed_only {
        return Ok(());
    }
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
            generate: None,
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

/// The speed table: kvnd's prefill and decode with the full fp16 cache (this binary's profile,
/// so what `cargo xtask` users get), the memory read bandwidth as the decode ceiling, and
/// llama.cpp on the same file and token ids when `KVND_LLAMA_CPP_PYTHON` (or `python3`) can
/// import `llama_cpp`.
fn speed_table(model: &crate::session::ModelArg) -> Result<()> {
    let file = model.path()?;
    let s = crate::session::open(model)?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let threads = rayon::current_num_threads();
    eprintln!(
        "== speed table: {} ({cpu}, {threads} threads)",
        file.display()
    );
    let bandwidth = models::speed::read_bandwidth();
    let report = models::speed::measure(&s.model.model, &mut |what| eprintln!("  {what}…"))?;
    let reference = llama_cpp(&file, threads);
    println!(
        "\nSpeed, {} ({cpu}, {threads} threads, profile {}); memory read bandwidth {:.1} GB/s; reference: {}\n",
        file.file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned()),
        profile(),
        bandwidth / 1e9,
        if reference.is_empty() {
            "none (llama-cpp-python not found)"
        } else {
            "llama.cpp via scripts/llama_cpp_bench.py"
        },
    );
    println!("{}", report.markdown(bandwidth, &reference));
    Ok(())
}

/// llama.cpp's figures from `scripts/llama_cpp_bench.py`, empty when no Python can run it.
fn llama_cpp(file: &Path, threads: usize) -> std::collections::BTreeMap<String, f64> {
    let python = std::env::var("KVND_LLAMA_CPP_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/llama_cpp_bench.py");
    eprintln!("  llama.cpp ({python} {})…", script.display());
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(file)
        .args(["--threads", &threads.to_string(), "--reps", "1"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            models::speed::parse_reference(&String::from_utf8_lossy(&o.stdout))
        }
        _ => Default::default(),
    }
}

/// The cargo profile this binary was built in, from its path (`target/<profile>/xtask`).
fn profile() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.file_name()?.to_string_lossy().into_owned()))
        .map_or_else(
            || "unknown".into(),
            |p| if p == "debug" { "dev".into() } else { p },
        )
}

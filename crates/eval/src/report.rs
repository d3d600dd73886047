//! Writing results: markdown, JSON and the Pareto plots.
use crate::error::{IoContext, Result};
use crate::measure::Record;
use crate::methods::PlanRecord;
use crate::options::EvalOptions;
use crate::paired::{Comparison, Metric};
use crate::plot;
use crate::stats::Summary;
use std::path::PathBuf;

fn fmt(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// Everything a run found, as [`write`] reports it.
#[derive(Debug, Clone, Copy)]
pub struct Findings<'a> {
    /// One summary per shown row.
    pub summary: &'a [Summary],
    /// Every record.
    pub records: &'a [Record],
    /// Paired comparisons of every row with full and with the best other method.
    pub comparisons: &'a [Comparison],
    /// Every distinct per-layer plan.
    pub plans: &'a [PlanRecord],
    /// Methods not planned for some samples.
    pub skipped: &'a [String],
    /// Wall seconds of the measurement.
    pub seconds: f64,
    /// MoQAE's λ sweep on prose (empty when it did not run).
    pub moqae: &'a [crate::moqae::SweepRow],
    /// The long-generation task and its options, when it ran.
    pub long_generation: Option<(
        &'a crate::longgen::LongGenReport,
        &'a crate::longgen::LongGenOptions,
    )>,
}

/// The results as markdown: the run's settings, one row per method and budget, the paired
/// differences, where hetero stands, what was not planned, and the per-length table.
pub fn markdown(f: &Findings<'_>, opts: &EvalOptions) -> String {
    let (summary, skipped, seconds) = (f.summary, f.skipped, f.seconds);
    let lengths: Vec<String> = opts.lengths.iter().map(|l| l.to_string()).collect();
    let mut s = format!(
        "Task contexts {} tokens, samples per task at its length: {}; tasks: {}; prose: {} sample(s) of {} tokens + {} scored. Seed {}, {:.0} s.\n\n\
         Ratio = fp16 K+V bytes / measured cache bytes (codes, fp16 scales and minimums, kept indices, dense parts at their stored width), mean over samples. \
         Score: RULER string match of the greedy answer, 0–100. TF: teacher-forced gold answer (mean token log-prob, share of argmax tokens). Build / probe s: mean seconds per sample building the caches from the shared prefill and running the probes, on one of the workers (the shared prefill, with KVzip's pass, is not in them).\n\n",
        lengths.join(", "),
        opts.samples,
        opts.tasks
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", "),
        opts.prose_samples,
        opts.prose_context,
        opts.continuation,
        opts.seed,
        seconds,
    );
    if let Some(d) = &opts.dataset {
        s.push_str(&format!(
            "User data: `{}` (RULER jsonl), scored by RULER's {}; its rows are the task named after the file.\n\n",
            d.path.display(),
            d.metric.name()
        ));
    }
    s.push_str(if opts.chunked_prefill {
        "Prefill: every method prefills each context itself and compresses after every 512-token chunk, with what it has observed so far (`--chunked-prefill`).\n\n"
    } else {
        "Prefill: one full-attention prefill per context, shared by every method, compressed once at its end (question-agnostic, as kvpress).\n\n"
    });
    let tasks: Vec<&'static str> = summary
        .first()
        .map(|x| x.per_task.iter().map(|(t, _)| *t).collect())
        .unwrap_or_default();
    s.push_str(
        "| method | budget | ratio | n | score ↑ | TF log-p ↑ | TF acc ↑ | prose NLL ↓ | KL ↓ | build / probe s |",
    );
    for t in &tasks {
        s.push_str(&format!(" {t} |"));
    }
    s.push_str("\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    s.push_str(&"---:|".repeat(tasks.len()));
    s.push('\n');
    for r in summary {
        s.push_str(&format!(
            "| {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {:.2} / {:.2} |",
            label(r),
            r.budget,
            r.ratio,
            r.n,
            fmt(r.score, 1),
            fmt(r.tf_logp, 3),
            fmt(r.tf_acc, 2),
            fmt(r.nll, 4),
            fmt(r.kl, 4),
            r.seconds[0],
            r.seconds[1],
        ));
        for t in &tasks {
            let v = r.per_task.iter().find(|(x, _)| x == t).map(|(_, v)| *v);
            s.push_str(&format!(" {} |", fmt(v, 0)));
        }
        s.push('\n');
    }
    s.push_str(&paired_table(f.comparisons));
    s.push_str(&crate::stats::versus(f.comparisons));
    if !skipped.is_empty() {
        s.push_str("\nNot planned (no plan of the method fits the budget):\n\n");
        for line in skipped {
            s.push_str(&format!("- {line}\n"));
        }
    }
    if let Some((r, o)) = f.long_generation {
        s.push('\n');
        s.push_str(&crate::longgen::markdown(r, o));
    }
    if !f.moqae.is_empty() {
        s.push_str(&format!(
            "\nMoQAE λ sweep on the prose samples (learned router: argmax and majority vote per {}-token chunk, trained at each λ; heuristic: attention-mass ranking fitted to the bytes the learned row reached):\n\n",
            axis_quant::moqae::DEFAULT_CHUNK
        ));
        s.push_str(&crate::moqae::markdown(f.moqae));
    }
    s.push_str("\nBy context length (score / TF acc / cache bytes):\n\n| method | budget |");
    for l in &opts.lengths {
        s.push_str(&format!(" {l} |"));
    }
    s.push_str("\n|---|---|");
    s.push_str(&"---:|".repeat(opts.lengths.len()));
    s.push('\n');
    for r in summary {
        s.push_str(&format!("| {} | {} |", label(r), r.budget));
        for &l in &opts.lengths {
            let cell = match (
                r.per_length.iter().find(|x| x.0 == l),
                r.bytes.iter().find(|x| x.0 == l),
            ) {
                (Some((_, sc, acc)), Some((_, b))) => {
                    format!("{sc:.1} / {acc:.2} / {}", kv_tensor::Bytes(*b as u64))
                }
                _ => "-".into(),
            };
            s.push_str(&format!(" {cell} |"));
        }
        s.push('\n');
    }
    s
}

fn label(r: &Summary) -> String {
    crate::stats::label(&r.method, &r.aliases)
}

/// The paired differences, one line per row and opponent; resolved intervals in bold.
fn paired_table(comparisons: &[Comparison]) -> String {
    if comparisons.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\nPaired differences (row − opponent) on the samples both measured: mean and 95 % bootstrap interval (resampling samples within each task × length cell, seeded; results.json also holds the pooled half-widths); **bold** = resolved (the interval excludes 0).\n\n| method | budget | vs |",
    );
    for m in Metric::ALL {
        s.push_str(&format!(" Δ {} |", m.name()));
    }
    s.push_str("\n|---|---|---|");
    s.push_str(&"---:|".repeat(Metric::ALL.len()));
    s.push('\n');
    for c in comparisons {
        s.push_str(&format!("| {} | {} | {} |", c.method, c.budget, c.against));
        for m in Metric::ALL {
            let cell = c.get(m).map_or("-".to_string(), |i| {
                let t = crate::stats::interval_text(i, if m == Metric::Score { 1 } else { 3 });
                if i.resolved() { format!("**{t}**") } else { t }
            });
            s.push_str(&format!(" {cell} |"));
        }
        s.push('\n');
    }
    s
}

/// What a run produced, as written by [`write`].
#[derive(Debug, Clone)]
pub struct Report {
    /// The markdown (also `results.md`).
    pub markdown: String,
    /// The summary as JSON (`results.json` adds every record).
    pub summary: serde_json::Value,
    /// Files written.
    pub files: Vec<PathBuf>,
}

/// Writes results.md, results.json (settings, summary, paired comparisons, every per-layer
/// plan, every record), the Pareto plot and one per-layer plan plot per budget to `opts.out`.
pub fn write(opts: &EvalOptions, f: &Findings<'_>) -> Result<Report> {
    let md = markdown(f, opts);
    let out = &opts.out;
    std::fs::create_dir_all(out).at(out)?;
    let md_path = out.join("results.md");
    std::fs::write(&md_path, &md).at(&md_path)?;
    let head = serde_json::json!({
        "lengths": opts.lengths, "tasks": opts.tasks.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "methods": opts.methods.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "samples_per_task": opts.samples.by_name(&opts.tasks), "prose_samples": opts.prose_samples,
        "prose_context": opts.prose_context, "continuation": opts.continuation,
        "calibration": opts.calibration.to_string(), "seed": opts.seed,
        "chunked_prefill": opts.chunked_prefill,
        "budgets": opts.budgets, "seconds": f.seconds, "summary": f.summary,
        "comparisons": f.comparisons, "skipped": f.skipped, "moqae_sweep": f.moqae,
        "long_generation": f.long_generation.map(|(r, _)| r),
    });
    let mut full = head.clone();
    full["plans"] = serde_json::to_value(f.plans)?;
    full["records"] = serde_json::to_value(f.records)?;
    let json_path = out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&full)?).at(&json_path)?;
    let mut files = vec![md_path, json_path];
    files.extend(plot::pareto(&pareto_points(f), out)?);
    for budget in &opts.budgets {
        files.extend(plot::layers(f.plans, budget, out)?);
    }
    Ok(Report {
        markdown: md,
        summary: head,
        files,
    })
}

/// One point per shown row, its error bars the paired interval against full; hetero and the
/// method most often best-other to it are highlighted.
fn pareto_points(f: &Findings<'_>) -> Vec<plot::Point> {
    let against_full = |s: &Summary, m: Metric| {
        f.comparisons
            .iter()
            .find(|c| c.method == s.method && c.budget == s.budget && c.against == "full")
            .and_then(|c| c.get(m))
            .map(|i| (i.lo - i.mean, i.hi - i.mean))
    };
    let mut rivals: Vec<(&str, usize)> = Vec::new();
    for c in f
        .comparisons
        .iter()
        .filter(|c| c.method == "hetero" && c.against != "full")
    {
        match rivals.iter_mut().find(|(m, _)| *m == c.against) {
            Some((_, n)) => *n += 1,
            None => rivals.push((&c.against, 1)),
        }
    }
    let rival = rivals.iter().max_by_key(|(_, n)| *n).map(|(m, _)| *m);
    let metrics = [Metric::Score, Metric::TfLogp, Metric::Kl];
    f.summary
        .iter()
        .map(|s| plot::Point {
            method: label(s),
            ratio: s.ratio,
            values: [
                s.score.unwrap_or(f64::NAN),
                s.tf_logp.unwrap_or(f64::NAN),
                s.kl.unwrap_or(f64::NAN),
            ],
            bars: metrics.map(|m| against_full(s, m)),
            highlight: s.method == "hetero" || Some(s.method.as_str()) == rival,
        })
        .collect()
}

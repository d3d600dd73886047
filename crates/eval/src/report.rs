//! Writing results: markdown, JSON and the Pareto plots.
use crate::error::{IoContext, Result};
use crate::measure::Record;
use crate::options::EvalOptions;
use crate::plot;
use crate::stats::Summary;
use std::path::PathBuf;

fn fmt(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The results as markdown: the run's settings, one row per method and budget, where hetero
/// stands, what was not planned, and the per-length table.
pub fn markdown(
    summary: &[Summary],
    versus: &str,
    skipped: &[String],
    opts: &EvalOptions,
    seconds: f64,
) -> String {
    let lengths: Vec<String> = opts.lengths.iter().map(|l| l.to_string()).collect();
    let mut s = format!(
        "Task contexts {} tokens, {} sample(s) per task and length, tasks: {}; prose: {} sample(s) of {} tokens + {} scored. Seed {}, {:.0} s.\n\n\
         Ratio = fp16 K+V bytes / measured cache bytes (codes, fp16 scales and minimums, kept indices, dense parts at their stored width), mean over samples. \
         Score: RULER string match of the greedy answer, 0–100. TF: teacher-forced gold answer (mean token log-prob, share of argmax tokens).\n\n",
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
        "| method | budget | ratio | n | score ↑ | TF log-p ↑ | TF acc ↑ | prose NLL ↓ | KL ↓ |",
    );
    for t in &tasks {
        s.push_str(&format!(" {t} |"));
    }
    s.push_str("\n|---|---|---:|---:|---:|---:|---:|---:|---:|");
    s.push_str(&"---:|".repeat(tasks.len()));
    s.push('\n');
    for r in summary {
        s.push_str(&format!(
            "| {} | {} | {:.2} | {} | {} | {} | {} | {} | {} |",
            r.method,
            r.budget,
            r.ratio,
            r.n,
            fmt(r.score, 1),
            fmt(r.tf_logp, 3),
            fmt(r.tf_acc, 2),
            fmt(r.nll, 4),
            fmt(r.kl, 4),
        ));
        for t in &tasks {
            let v = r.per_task.iter().find(|(x, _)| x == t).map(|(_, v)| *v);
            s.push_str(&format!(" {} |", fmt(v, 0)));
        }
        s.push('\n');
    }
    s.push_str(versus);
    if !skipped.is_empty() {
        s.push_str("\nNot planned (no plan of the method fits the budget):\n\n");
        for line in skipped {
            s.push_str(&format!("- {line}\n"));
        }
    }
    s.push_str("\nBy context length (score / TF acc / cache bytes):\n\n| method | budget |");
    for l in &opts.lengths {
        s.push_str(&format!(" {l} |"));
    }
    s.push_str("\n|---|---|");
    s.push_str(&"---:|".repeat(opts.lengths.len()));
    s.push('\n');
    for r in summary {
        s.push_str(&format!("| {} | {} |", r.method, r.budget));
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

/// Writes results.md, results.json and the Pareto plots to `opts.out`.
pub fn write(
    opts: &EvalOptions,
    summary: &[Summary],
    records: &[Record],
    skipped: &[String],
    seconds: f64,
) -> Result<Report> {
    let md = markdown(
        summary,
        &crate::stats::versus(records),
        skipped,
        opts,
        seconds,
    );
    let out = &opts.out;
    std::fs::create_dir_all(out).at(out)?;
    let md_path = out.join("results.md");
    std::fs::write(&md_path, &md).at(&md_path)?;
    let head = serde_json::json!({
        "lengths": opts.lengths, "tasks": opts.tasks.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "methods": opts.methods.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "samples_per_task": opts.samples, "prose_samples": opts.prose_samples,
        "prose_context": opts.prose_context, "continuation": opts.continuation,
        "calibration_context": opts.calibration_context, "seed": opts.seed,
        "chunked_prefill": opts.chunked_prefill,
        "budgets": opts.budgets, "seconds": seconds, "summary": summary, "skipped": skipped,
    });
    let mut full = head.clone();
    full["records"] = serde_json::to_value(records)?;
    let json_path = out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&full)?).at(&json_path)?;
    let points: Vec<plot::Point> = summary
        .iter()
        .map(|s| plot::Point {
            method: s.method.clone(),
            ratio: s.ratio,
            values: [
                s.score.unwrap_or(f64::NAN),
                s.tf_logp.unwrap_or(f64::NAN),
                s.kl.unwrap_or(f64::NAN),
            ],
        })
        .collect();
    let mut files = vec![md_path, json_path];
    files.extend(plot::pareto(&points, out)?);
    Ok(Report {
        markdown: md,
        summary: head,
        files,
    })
}

//! `cargo xtask eval`: every method on identical inputs at matched bytes.
//!
//! Protocol (kvpress-style, question-agnostic): each sample's context is prefilled once with
//! full attention (shared by every method); each method's caches then receive that prefill's
//! K/V and observations and compress at the end of prefill; the probe (a prose continuation or
//! a question) is appended afterwards and scored through the compressed cache.
mod data;
mod methods;
mod plot;

use crate::backend::B;
use anyhow::{Context, Result};
use axis_evict::{Evict, ScorerKind, TrigStats};
use axis_lowrank::{LowRank, PcaBases};
use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;
use indicatif::{ProgressBar, ProgressStyle};
use kv_tensor::{LayerCache, RecordingCache};
use models::{LoadedModel, Logits, PrefillOptions};
use router::Axes;
use serde::Serialize;
use solver::{Budget, CalibrationOptions, SensitivityTable};
use std::path::PathBuf;
use std::sync::Arc;

/// What `eval` runs.
pub struct EvalOptions {
    /// CI-sized run: one short context, one budget, few methods.
    pub quick: bool,
    /// Budgets (fractions of fp16 bytes).
    pub budgets: Vec<String>,
    /// Context tokens.
    pub context: usize,
    /// Samples per task.
    pub samples: usize,
    /// Seed of the task generator.
    pub seed: u64,
    /// Output directory (default: `$KVND_HOME/eval`).
    pub out: Option<PathBuf>,
    /// Print the summary as one JSON object.
    pub json: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Score {
    method: String,
    budget: String,
    bytes: u64,
    ratio: f64,
    prose_nll: f64,
    prose_kl: f64,
    passkey_logp: f64,
    passkey_acc: f64,
    passkey_gen: f64,
    n_prose: usize,
    n_passkey: usize,
    /// Per sample: the task, the gold answer and the prediction (passkey) or the NLL (prose).
    samples: Vec<serde_json::Value>,
}

/// `n` tokens of the corpus starting near character `offset`.
pub fn passage(m: &LoadedModel<B>, text: &str, offset: usize, n: usize) -> Result<Vec<u32>> {
    data::tokens_at(&m.tokenizer, text, offset, n)
}

/// A progress bar with ETA.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b.set_message(what.to_string());
    b
}

/// Passages (of `AXES_CONTEXT` tokens) the calibrated axes are fitted on.
const AXES_PASSAGES: usize = 2;
const AXES_CONTEXT: usize = 2048;

/// The calibrated axes of this model: trig statistics and low-rank bases, loaded from the cache
/// (validated against the model's sha256) or fitted on calibration prose and cached.
pub fn axes(m: &LoadedModel<B>, sha: &str, text: &str) -> Result<Axes<B>> {
    let layers = m.model.config.layers;
    let dir = crate::paths::home()?.join("calibration");
    let trig_path = dir.join(format!("{}-trig.json", &sha[..12]));
    let pca_path = dir.join(format!("{}-pca.json", &sha[..12]));
    let cached = (|| -> Option<(TrigStats, PcaBases)> {
        let t = std::fs::read_to_string(&trig_path).ok()?;
        let p = std::fs::read_to_string(&pca_path).ok()?;
        let trig = TrigStats::from_json(&t, sha, layers)
            .map_err(|e| eprintln!("{}: {e}: refitting", trig_path.display()))
            .ok()?;
        let pca = PcaBases::from_json(&p, sha)
            .map_err(|e| eprintln!("{}: {e}: refitting", pca_path.display()))
            .ok()?;
        Some((trig, pca))
    })();
    let (trig, pca) = match cached {
        Some(c) => c,
        None => {
            let ids: Vec<Vec<u32>> = (0..AXES_PASSAGES)
                .map(|i| data::tokens_at(&m.tokenizer, text, 100_000 + i * 200_000, AXES_CONTEXT))
                .collect::<Result<_>>()?;
            let pb = bar(AXES_PASSAGES as u64, "fit axes");
            let t0 = std::time::Instant::now();
            let (trig, pca) =
                solver::fit_axes(&m.model, &ids, sha, |done, _| pb.set_position(done as u64))?;
            pb.finish_and_clear();
            eprintln!(
                "fitted trig statistics and PCA bases on {AXES_PASSAGES} × {AXES_CONTEXT} tokens in {:.0} s",
                t0.elapsed().as_secs_f64()
            );
            std::fs::create_dir_all(&dir)?;
            std::fs::write(&trig_path, trig.to_json())?;
            std::fs::write(&pca_path, pca.to_json())?;
            (trig, pca)
        }
    };
    let device = Default::default();
    Ok(Axes {
        evict: Evict::with_trig(Arc::new(trig)),
        lowrank: Some(Arc::new(LowRank::new(&pca, &device)?)),
    })
}

/// The calibration menu: the default menu plus the low-rank extension.
pub fn menu() -> Vec<router::Expert> {
    let mut menu = solver::default_menu(MENU_SCORER);
    menu.extend(solver::rank_menu(MENU_SCORER));
    menu
}

/// The scorer of every evicting expert in the calibrated menu.
pub const MENU_SCORER: ScorerKind = ScorerKind::ExpectedAttention;

/// Loads the cached calibration table for this model and context, or measures it.
pub fn calibration(
    m: &LoadedModel<B>,
    sha: &str,
    text: &str,
    axes: &Axes<B>,
    context: usize,
    passages: usize,
    out: Option<PathBuf>,
) -> Result<SensitivityTable> {
    let menu = menu();
    let path = match out {
        Some(p) => p,
        None => crate::paths::home()?
            .join("calibration")
            .join(format!("{}-ctx{context}-p{passages}.json", &sha[..12])),
    };
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(t) = serde_json::from_str::<SensitivityTable>(&text)
            && t.model_sha256 == sha
            && t.tokens == context
            && t.loss.len() == m.model.config.layers
            && t.menu == menu
        {
            eprintln!("calibration table: {}", path.display());
            return Ok(t);
        }
        eprintln!("{} is stale or invalid: recalibrating", path.display());
    }
    let opts = CalibrationOptions {
        context,
        ..Default::default()
    };
    let ids: Vec<Vec<u32>> = (0..passages)
        .map(|i| data::tokens_at(&m.tokenizer, text, i * 200_000, context + opts.future))
        .collect::<Result<_>>()?;
    let pb = bar((passages * m.model.config.layers) as u64, "calibrate");
    let t0 = std::time::Instant::now();
    let loss = solver::calibrate(&m.model, &ids, &menu, axes, &opts, |done, _| {
        pb.set_position(done as u64)
    })?;
    pb.finish_and_clear();
    eprintln!(
        "calibrated {} experts × {} layers in {:.0} s",
        menu.len(),
        m.model.config.layers,
        t0.elapsed().as_secs_f64()
    );
    let table = SensitivityTable {
        model_sha256: sha.to_string(),
        tokens: context,
        menu,
        loss,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, serde_json::to_string(&table)?)?;
    eprintln!("calibration table written to {}", path.display());
    Ok(table)
}

/// The prose corpus (fetched if needed).
pub fn corpus_text() -> Result<String> {
    data::corpus(&crate::fetch::data(None)?)
}

/// The layer geometry of a model after `tokens` tokens.
pub fn geometry(layout: kv_tensor::KvLayout, tokens: usize) -> solver::Geometry {
    methods::geometry(layout, tokens)
}

/// The embedded default model with its prose data and calibrated axes: what `calibrate`,
/// `solve`, `validate-proxy` and `eval` share (the model file is hashed once).
pub struct Calibrated {
    /// The model.
    pub m: LoadedModel<B>,
    /// sha256 of the model file.
    pub sha: String,
    /// The prose corpus.
    pub text: String,
    /// Trig statistics and low-rank bases.
    pub axes: Axes<B>,
}

impl Calibrated {
    /// Fetches (if needed) and loads the default model and data, and loads or fits the axes.
    pub fn default_model() -> Result<Self> {
        let model_path = crate::fetch::model(crate::fetch::DEFAULT_MODEL, None)?;
        let text = corpus_text()?;
        let m = crate::run::load(Some(&model_path))?;
        let sha = crate::fetch::sha256_file(&model_path)?;
        let axes = axes(&m, &sha, &text)?;
        Ok(Self { m, sha, text, axes })
    }

    /// The sensitivity table at `context` tokens (cached, or measured); see [`calibration`].
    pub fn table(
        &self,
        context: usize,
        passages: usize,
        out: Option<PathBuf>,
    ) -> Result<SensitivityTable> {
        calibration(
            &self.m, &self.sha, &self.text, &self.axes, context, passages, out,
        )
    }
}

/// Every layer's cache for `entry`, given the recorded full prefill: appended and compressed at
/// the end of prefill, as at inference.
fn compressed(
    entry: &methods::Entry,
    rec: &[RecordingCache<B>],
    axes: &Axes<B>,
) -> Result<Vec<Box<dyn LayerCache<B>>>> {
    let mut caches = entry.caches(rec.len(), axes);
    for (c, r) in caches.iter_mut().zip(rec) {
        let (k, v) = r.keys_values()?;
        c.append(k, v)?;
        let obs = r
            .observed()
            .cloned()
            .context("prefill recorded no observations")?;
        c.finish_prefill(&obs)?;
    }
    Ok(caches)
}

/// Runs the comparison.
pub fn run(opts: &EvalOptions) -> Result<()> {
    let Calibrated { m, sha, text, axes } = Calibrated::default_model()?;
    let layers = m.model.config.layers;
    let layout = m.model.config.kv_layout();
    let table = calibration(&m, &sha, &text, &axes, opts.context, 1, None)?;
    let geo = methods::geometry(layout, opts.context);
    let fp16 = layout.fp16_bytes(1, opts.context);
    let budgets: Vec<(String, u64)> = opts
        .budgets
        .iter()
        .map(|b| Ok((b.clone(), b.parse::<Budget>()?.bytes(fp16).get())))
        .collect::<Result<_, solver::SolverError>>()?;
    let scorers: Vec<ScorerKind> = if opts.quick {
        vec![ScorerKind::Streaming, ScorerKind::Snapkv]
    } else {
        vec![
            ScorerKind::Streaming,
            ScorerKind::Snapkv,
            ScorerKind::Knorm,
            ScorerKind::Tova,
            ScorerKind::H2o,
            ScorerKind::ExpectedAttention,
            ScorerKind::Trig,
        ]
    };
    let entries = methods::entries(&table, &geo, &budgets, opts.quick, &scorers)?;
    let continuation = if opts.quick { 32 } else { 128 };
    let samples = data::samples(
        &m.tokenizer,
        &text,
        opts.samples,
        opts.context,
        continuation,
        opts.seed,
    )?;
    let mut scores: Vec<Score> = entries
        .iter()
        .map(|e| Score {
            method: e.name.clone(),
            budget: e.budget.clone(),
            ..Default::default()
        })
        .collect();
    let pb = bar((samples.len() * entries.len()) as u64, "evaluate");
    let needs_mass = scorers.contains(&ScorerKind::H2o);
    for sample in &samples {
        // One full prefill per sample, shared by every method.
        let mut rec: Vec<RecordingCache<B>> = (0..layers).map(|_| RecordingCache::new()).collect();
        let popts = PrefillOptions {
            attention_mass: needs_mass,
            ..Default::default()
        };
        let first = m.model.prefill(sample.context(), &mut rec, &popts)?;
        let mut full_logp: Option<Tensor<B, 2>> = None;
        for (entry, score) in entries.iter().zip(scores.iter_mut()) {
            let mut caches = compressed(entry, &rec, &axes)?;
            let bytes: u64 = caches.iter().map(|c| c.footprint().total().get()).sum();
            score.bytes = bytes;
            score.ratio = fp16.get() as f64 / bytes.max(1) as f64;
            match sample {
                data::Sample::Prose { continuation, .. } => {
                    let n = continuation.len();
                    let logits =
                        m.model
                            .forward(&continuation[..n - 1], &mut caches, Logits::All)?;
                    let logp = log_softmax(logits, 1);
                    score.prose_nll += nll(&logp, &continuation[1..]);
                    let kl = match &full_logp {
                        None => {
                            full_logp = Some(logp);
                            0.0
                        }
                        Some(reference) => solver::measured::kl(reference, &logp),
                    };
                    score.prose_kl += kl;
                    score.n_prose += 1;
                    score
                        .samples
                        .push(serde_json::json!({"task": "prose", "kl": kl}));
                }
                data::Sample::Passkey {
                    question,
                    answer,
                    key,
                    ..
                } => {
                    // Teacher forcing appends the answer: generation needs its own caches.
                    let mut gen_caches = compressed(entry, &rec, &axes)?;
                    let mut probe = question.clone();
                    probe.extend(&answer[..answer.len() - 1]);
                    let logp = log_softmax(m.model.forward(&probe, &mut caches, Logits::All)?, 1);
                    let rows = logp.slice_dim(0, question.len() - 1..probe.len());
                    score.passkey_logp += -nll(&rows, answer);
                    score.passkey_acc += argmax_acc(&rows, answer);
                    let mut logits = m.model.forward(question, &mut gen_caches, Logits::Last)?;
                    let mut out = Vec::new();
                    for _ in 0..answer.len() + 1 {
                        let mut st = 0;
                        let id = models::pick(logits, models::Sampling::Greedy, &mut st)?;
                        out.push(id);
                        logits = m.model.forward(&[id], &mut gen_caches, Logits::Last)?;
                    }
                    let text = m.tokenizer.decode(&out)?;
                    let hit = text.contains(key.as_str());
                    score.passkey_gen += if hit { 1.0 } else { 0.0 };
                    score.samples.push(serde_json::json!({"task": "passkey", "gold": key, "prediction": text, "correct": hit}));
                    score.n_passkey += 1;
                }
            }
            pb.inc(1);
        }
        let _ = first;
    }
    pb.finish_and_clear();
    for s in &mut scores {
        let (np, nk) = (s.n_prose.max(1) as f64, s.n_passkey.max(1) as f64);
        s.prose_nll /= np;
        s.prose_kl /= np;
        s.passkey_logp /= nk;
        s.passkey_acc /= nk;
        s.passkey_gen /= nk;
    }
    let md = markdown(&scores, opts);
    let out = match &opts.out {
        Some(o) => o.clone(),
        None => crate::paths::home()?.join("eval"),
    };
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("results.md"), &md)?;
    let summary = serde_json::json!({
        "context": opts.context, "samples_per_task": opts.samples, "seed": opts.seed,
        "fp16_bytes": fp16.get(), "results": scores,
    });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    let points: Vec<plot::Point> = scores
        .iter()
        .map(|s| plot::Point {
            method: s.method.clone(),
            ratio: s.ratio,
            values: [s.passkey_acc, s.passkey_logp, s.prose_kl],
        })
        .collect();
    let plots = plot::pareto(&points, &out)?;
    if opts.json {
        println!("{summary}");
    } else {
        println!("{md}");
    }
    eprintln!(
        "wrote {}, results.json and {}",
        out.join("results.md").display(),
        plots
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    anyhow::ensure!(
        scores
            .iter()
            .all(|s| s.prose_nll.is_finite() && s.passkey_logp.is_finite()),
        "a method produced a non-finite score"
    );
    Ok(())
}

fn nll(logp: &Tensor<B, 2>, targets: &[u32]) -> f64 {
    let v: Vec<f32> = logp.clone().into_data().iter::<f32>().collect();
    let vocab = logp.dims()[1];
    targets
        .iter()
        .enumerate()
        .map(|(i, &t)| -(v[i * vocab + t as usize] as f64))
        .sum::<f64>()
        / targets.len() as f64
}

fn argmax_acc(logp: &Tensor<B, 2>, targets: &[u32]) -> f64 {
    let idx: Vec<i64> = logp.clone().argmax(1).into_data().iter::<i64>().collect();
    targets
        .iter()
        .zip(&idx)
        .filter(|(t, i)| **t as i64 == **i)
        .count() as f64
        / targets.len() as f64
}

fn markdown(scores: &[Score], opts: &EvalOptions) -> String {
    let mut s = format!(
        "Context {} tokens, {} samples per task, seed {}. Ratio = fp16 K+V bytes / measured cache bytes (codes, fp16 scales and minimums, kept indices, fp16 or f32 dense parts).\n\n",
        opts.context, opts.samples, opts.seed
    );
    s.push_str("| method | budget | ratio | cache bytes | prose NLL ↓ | KL to full ↓ | passkey log-p ↑ | passkey TF acc ↑ | passkey gen ↑ |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in scores {
        s.push_str(&format!(
            "| {} | {} | {:.2} | {} | {:.4} | {:.4} | {:.4} | {:.2} | {:.2} |\n",
            r.method,
            r.budget,
            r.ratio,
            kv_tensor::Bytes(r.bytes),
            r.prose_nll,
            r.prose_kl,
            r.passkey_logp,
            r.passkey_acc,
            r.passkey_gen
        ));
    }
    s
}

//! `cargo xtask eval`: every method on identical inputs at matched bytes.
//!
//! Protocol (kvpress-style, question-agnostic): each sample's context is prefilled once with
//! full attention (shared by every method); each method's caches then receive that prefill's
//! K/V and observations and compress at the end of prefill; the probe (a prose continuation or
//! a question) is appended afterwards and scored through the compressed cache.
mod data;
mod methods;
mod plot;
mod tasks;

pub use tasks::Task;

use crate::backend::B;
use anyhow::{Context, Result};
use axis_evict::{Evict, ScorerKind, TrigStats};
use axis_lowrank::{LowRank, PcaBases};
use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;
use indicatif::{ProgressBar, ProgressStyle};
use kv_tensor::{LayerCache, RecordingCache};
use models::{LoadedModel, Logits, PrefillOptions};
use rayon::prelude::*;
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
    /// Context lengths (tokens) of the task samples.
    pub lengths: Vec<usize>,
    /// The RULER tasks.
    pub tasks: Vec<Task>,
    /// Every task at every length; otherwise task i runs at length i mod the number of
    /// lengths (every task and every length appear, at a third of the cost with three lengths).
    pub grid: bool,
    /// Samples per task and length.
    pub samples: usize,
    /// Prose-continuation samples.
    pub prose_samples: usize,
    /// Context tokens of the prose samples.
    pub prose_context: usize,
    /// Continuation tokens scored after the prose context.
    pub continuation: usize,
    /// Context length of the calibration table (one table serves every length: budgets are
    /// fractions, and the solver sizes each plan for the sample's length).
    pub calibration_context: usize,
    /// Plain-text prompts instead of the model's chat template.
    pub raw: bool,
    /// Seed of the task generator.
    pub seed: u64,
    /// Output directory (default: `$KVND_HOME/eval`).
    pub out: Option<PathBuf>,
    /// Print the summary as one JSON object.
    pub json: bool,
    /// Each method prefills every sample itself, compressing chunk by chunk, instead of
    /// compressing one shared full prefill at its end.
    pub chunked_prefill: bool,
}

/// One method on one sample.
#[derive(Debug, Clone, Serialize)]
struct Record {
    method: String,
    budget: String,
    length: usize,
    task: &'static str,
    /// Index of the sample among its length's samples.
    sample: usize,
    /// Context tokens of the sample (at most `length`).
    tokens: usize,
    /// Measured cache bytes after the context.
    bytes: u64,
    /// fp16 K+V bytes of the context / `bytes`.
    ratio: f64,
    /// RULER score of the free-generation answer, 0–100.
    score: Option<f64>,
    /// Mean log-probability of the gold answer's tokens (teacher forcing).
    tf_logp: Option<f64>,
    /// Share of the gold answer's tokens that are the argmax (teacher forcing).
    tf_acc: Option<f64>,
    /// Prose: NLL of the continuation.
    nll: Option<f64>,
    /// Prose: KL of next-token distributions to the full cache.
    kl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prediction: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    refs: Vec<String>,
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

/// One sample's full prefill, recorded layer by layer.
type Recording = Vec<RecordingCache<B>>;

/// The full prefill of every sample (in `groups` order), recorded for every method to share.
/// Runs one sample per core, longest first; each prefill's matmuls may still use every core.
fn prefill_all(
    m: &LoadedModel<B>,
    groups: &[(usize, Vec<data::Sample>)],
    layers: usize,
    popts: &PrefillOptions,
) -> Result<Vec<Recording>> {
    let samples: Vec<&data::Sample> = groups.iter().flat_map(|(_, s)| s).collect();
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(samples[i].context().len()));
    let pb = bar(samples.len() as u64, "prefill");
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<Result<Recording>>>> = samples
        .iter()
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    rayon::scope(|s| {
        for _ in 0..rayon::current_num_threads() {
            s.spawn(|_| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&j) = order.get(i) else { break };
                    let mut rec: Vec<RecordingCache<B>> =
                        (0..layers).map(|_| RecordingCache::new()).collect();
                    let r = m
                        .model
                        .prefill(samples[j].context(), &mut rec, popts)
                        .map(|_| rec)
                        .map_err(anyhow::Error::from);
                    let failed = r.is_err();
                    if let Ok(mut slot) = slots[j].lock() {
                        *slot = Some(r);
                    }
                    pb.inc(1);
                    if failed {
                        // Stop the other workers early: the run fails with this error.
                        next.store(order.len(), std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    pb.finish_and_clear();
    // A failure is reported as such (slots left empty only follow one).
    let mut out = Vec::with_capacity(slots.len());
    let mut missing = false;
    for slot in slots {
        match slot.into_inner().ok().flatten() {
            Some(r) => out.push(r?),
            None => missing = true,
        }
    }
    anyhow::ensure!(!missing, "a sample's prefill did not run");
    Ok(out)
}

/// Runs the comparison.
pub fn run(opts: &EvalOptions) -> Result<()> {
    let Calibrated { m, sha, text, axes } = Calibrated::default_model()?;
    let layers = m.model.config.layers;
    let layout = m.model.config.kv_layout();
    let max_ctx = m.model.config.context;
    for &l in opts.lengths.iter().chain([&opts.prose_context]) {
        anyhow::ensure!(
            l + 512 <= max_ctx,
            "context {l} leaves no room for the question and answer in the model's {max_ctx} positions"
        );
    }
    let table = calibration(&m, &sha, &text, &axes, opts.calibration_context, 1, None)?;
    let methods = methods::default_methods(opts.quick);

    // Inputs: every task at every length, and the prose samples.
    let (squad, hotpot) = qa_sets(&opts.tasks)?;
    let src = tasks::Sources::new(
        data::evaluation_text(&text),
        squad.as_ref(),
        hotpot.as_ref(),
    );
    let mut groups: Vec<(usize, Vec<data::Sample>)> = Vec::new();
    let pb = bar((opts.lengths.len() * opts.tasks.len()) as u64, "generate");
    for (li, &length) in opts.lengths.iter().enumerate() {
        let mut samples = Vec::new();
        for (i, &task) in opts.tasks.iter().enumerate() {
            // Without `grid`, task i runs at length i mod (number of lengths) only.
            if !opts.grid && i % opts.lengths.len() != li {
                continue;
            }
            let ti = Task::ALL.iter().position(|t| *t == task).unwrap_or(0);
            for i in 0..opts.samples {
                let seed = data::sample_seed(opts.seed, ti, length, i);
                samples.push(data::Sample::Task(tasks::fit(
                    task,
                    &src,
                    &m.tokenizer,
                    if opts.raw { None } else { m.chat.as_ref() },
                    length,
                    seed,
                )?));
            }
            pb.inc(1);
        }
        groups.push((length, samples));
    }
    pb.finish_and_clear();
    if opts.prose_samples > 0 {
        let prose = data::prose_samples(
            &m.tokenizer,
            &text,
            opts.prose_samples,
            opts.prose_context,
            opts.continuation,
            opts.seed,
        )?;
        match groups.iter_mut().find(|(l, _)| *l == opts.prose_context) {
            Some((_, g)) => g.extend(prose),
            None => groups.push((opts.prose_context, prose)),
        }
    }

    // Methods for every sample, planned for its exact context length (budgets are fractions of
    // its fp16 bytes; a plan made for a longer context can overshoot on a shorter one, because
    // the quantized/dense split of a residual window moves in whole groups).
    let mut plans: Vec<Vec<Vec<methods::Entry>>> = Vec::new();
    let mut skips = methods::Skips::default();
    for (_, samples) in &groups {
        let mut per = Vec::new();
        for sample in samples {
            let tokens = sample.context().len();
            let geo = methods::geometry(layout, tokens);
            let fp16 = layout.fp16_bytes(1, tokens);
            let budgets: Vec<(String, u64)> = opts
                .budgets
                .iter()
                .map(|b| Ok((b.clone(), b.parse::<Budget>()?.bytes(fp16).get())))
                .collect::<Result<_, solver::SolverError>>()?;
            per.push(methods::entries(
                &table, &geo, &budgets, opts.quick, &methods, &mut skips,
            )?);
        }
        plans.push(per);
    }
    let skipped = skips.lines(groups.iter().map(|(_, s)| s.len()).sum());
    for line in &skipped {
        eprintln!("{line}");
    }
    let t0 = std::time::Instant::now();
    let needs_mass = router::Needs::of(plans.iter().flatten().flatten().flat_map(
        |e| match &e.build {
            methods::Build::Plan(p) => p.layers.as_slice(),
            _ => &[],
        },
    ))
    .attention_mass;
    // One full prefill per sample, shared by every method: all of them first, on every core
    // (longest first, so no core is left with a long one at the end).
    let popts = PrefillOptions {
        attention_mass: needs_mass,
        ..Default::default()
    };
    let chunked = PrefillOptions {
        compress_chunks: true,
        ..popts
    };
    let mut recordings = prefill_all(&m, &groups, layers, &popts)?.into_iter();
    // Seconds in prefill (wall), compression, probes (teacher forcing, prose, generation set-up)
    // and batched generation; compression and probes run on every core and are summed over them.
    let mut phase = [t0.elapsed().as_secs_f64(), 0.0, 0.0, 0.0];
    let total: usize = plans.iter().flatten().map(Vec::len).sum();
    let pb = bar(total as u64, "evaluate");
    let mut records: Vec<Record> = Vec::new();
    for ((length, samples), per) in groups.iter().zip(&plans) {
        for (si, (sample, entries)) in samples.iter().zip(per).enumerate() {
            let tokens = sample.context().len();
            let fp16 = layout.fp16_bytes(1, tokens).get();
            pb.set_message(format!("{}@{length}", sample.task()));
            let rec = recordings.next().context("a sample's prefill is missing")?;
            let first_record = records.len();
            let ctx = EntryCtx {
                m: &m,
                axes: &axes,
                rec: &rec,
                own_prefill: opts.chunked_prefill.then_some(&chunked),
                sample,
                length: *length,
                index: si,
                fp16,
            };
            let mut results: Vec<Option<Measured>> = (0..entries.len()).map(|_| None).collect();
            let unique: Vec<usize> = (0..entries.len())
                .filter(|&ei| methods::Entry::same_as(entries, ei).is_none())
                .collect();
            // On prose, the full cache first: its next-token distributions are the KL
            // reference. Tasks need no reference, so every method runs in parallel.
            let (reference, rest) = match sample {
                data::Sample::Prose { .. } => {
                    let (first, rest) = unique.split_first().context("no methods to evaluate")?;
                    let head = ctx.measure(&entries[*first], None)?;
                    let reference = head.logp.clone();
                    pb.inc(1);
                    results[*first] = Some(head);
                    (reference, rest)
                }
                data::Sample::Task(_) => (None, &unique[..]),
            };
            // The other methods on both cores: each owns its caches; the model, the recorded
            // prefill and the calibrated axes are shared read-only.
            let measured: Vec<(usize, Measured)> = rest
                .par_iter()
                .map(|&ei| {
                    let r = ctx.measure(&entries[ei], reference.as_ref());
                    pb.inc(1);
                    r.map(|r| (ei, r))
                })
                .collect::<Result<_>>()?;
            for (ei, r) in measured {
                results[ei] = Some(r);
            }
            let mut pending: Vec<Generation> = Vec::new();
            for (ei, entry) in entries.iter().enumerate() {
                let r = match methods::Entry::same_as(entries, ei) {
                    Some(j) => {
                        let mut r = records[first_record + j].clone();
                        r.method = entry.name.clone();
                        r.budget = entry.budget.clone();
                        pb.inc(1);
                        r
                    }
                    None => {
                        let got = results[ei].take().context("an entry was not measured")?;
                        phase[1] += got.seconds[0];
                        phase[2] += got.seconds[1];
                        if let Some((caches, out)) = got.generation {
                            pending.push(Generation {
                                record: records.len(),
                                caches,
                                out,
                            });
                        }
                        got.record
                    }
                };
                records.push(r);
            }
            if let data::Sample::Task(t) = sample {
                let tg = std::time::Instant::now();
                // One lockstep batch per core (a batch's attention runs on one thread).
                let half = pending.len().div_ceil(rayon::current_num_threads()).max(1);
                pending
                    .par_chunks_mut(half)
                    .try_for_each(|batch| generate(&m, t, batch))?;
                phase[3] += tg.elapsed().as_secs_f64();
                for g in pending.drain(..) {
                    records[g.record].prediction = Some(m.tokenizer.decode(&g.out)?);
                }
                // Entries measured once share their twin's prediction.
                for ei in 0..entries.len() {
                    if let Some(j) = methods::Entry::same_as(entries, ei) {
                        records[first_record + ei].prediction =
                            records[first_record + j].prediction.clone();
                    }
                }
                for r in &mut records[first_record..] {
                    if let Some(p) = &r.prediction {
                        r.score = Some(t.task.metric().score(p, &t.refs));
                    }
                }
            }
        }
    }
    pb.finish_and_clear();
    let elapsed = t0.elapsed().as_secs_f64();
    eprintln!(
        "time: {elapsed:.0} s; prefill {:.0} s, compression {:.0} s and probes {:.0} s (summed over {} workers), batched generation {:.0} s",
        phase[0],
        phase[1],
        phase[2],
        rayon::current_num_threads(),
        phase[3]
    );
    let summary = summarize(&records, &opts.lengths);
    let md = markdown(&summary, &versus(&records), &skipped, opts, elapsed);
    let out = match &opts.out {
        Some(o) => o.clone(),
        // A quick run never overwrites the main job's results.
        None => crate::paths::home()?.join(if opts.quick { "eval-quick" } else { "eval" }),
    };
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("results.md"), &md)?;
    let head = serde_json::json!({
        "lengths": opts.lengths, "tasks": opts.tasks.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "samples_per_task": opts.samples, "prose_samples": opts.prose_samples,
        "prose_context": opts.prose_context, "continuation": opts.continuation,
        "calibration_context": opts.calibration_context, "seed": opts.seed,
        "budgets": opts.budgets, "seconds": elapsed, "summary": summary, "skipped": skipped,
    });
    let mut full = head.clone();
    full["records"] = serde_json::to_value(&records)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&full)?,
    )?;
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
    let plots = plot::pareto(&points, &out)?;
    if opts.json {
        println!("{head}");
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
    // Matched memory: no method at a budget holds more than the budget after the context.
    for r in records.iter().filter(|r| r.budget != "-") {
        let cap = r
            .budget
            .parse::<Budget>()?
            .bytes(layout.fp16_bytes(1, r.tokens))
            .get();
        anyhow::ensure!(
            r.bytes <= cap,
            "{} at {} holds {} bytes after {} tokens, over its budget of {cap}",
            r.method,
            r.budget,
            r.bytes,
            r.tokens
        );
    }
    anyhow::ensure!(
        records.iter().all(|r| [r.tf_logp, r.nll, r.kl, r.score]
            .iter()
            .flatten()
            .all(|x| x.is_finite())),
        "a method produced a non-finite score"
    );
    Ok(())
}

/// The QA data sets the selected tasks need (fetched if needed).
fn qa_sets(tasks: &[Task]) -> Result<(Option<tasks::QaSet>, Option<tasks::QaSet>)> {
    if !tasks.iter().any(|t| t.needs_qa()) {
        return Ok((None, None));
    }
    let dir = crate::fetch::qa_data(None)?;
    let squad = tasks
        .contains(&Task::Qa1)
        .then(|| tasks::QaSet::squad(&dir.join("squad.json")))
        .transpose()?;
    let hotpot = tasks
        .contains(&Task::Qa2)
        .then(|| tasks::QaSet::hotpot(&dir.join("hotpotqa.json")))
        .transpose()?;
    Ok((squad, hotpot))
}

/// One method's caches, one per layer.
type Caches = Vec<Box<dyn LayerCache<B>>>;

/// Teacher-forced scores of a task's gold answer.
struct TeacherForced {
    logp: f64,
    acc: f64,
    /// The first gold token that is not the argmax, with the argmax there.
    first_miss: Option<(usize, u32)>,
}

/// What every method of one sample shares: the model, the calibrated axes, the recorded full
/// prefill and the sample.
struct EntryCtx<'a> {
    m: &'a LoadedModel<B>,
    axes: &'a Axes<B>,
    rec: &'a [RecordingCache<B>],
    /// `Some`: every method prefills the context itself with these options (chunk by chunk).
    own_prefill: Option<&'a PrefillOptions>,
    sample: &'a data::Sample,
    length: usize,
    index: usize,
    fp16: u64,
}

/// One method measured on one sample.
struct Measured {
    record: Record,
    /// Log-probabilities of the prose continuation (the full cache's are the KL reference).
    logp: Option<Tensor<B, 2>>,
    /// Caches and tokens so far of a greedy answer still to finish.
    generation: Option<(Caches, Vec<u32>)>,
    /// Seconds compressing and probing.
    seconds: [f64; 2],
}

impl EntryCtx<'_> {
    /// Compresses the recorded prefill with `entry` and runs its probes: prose NLL and KL to
    /// `reference`, or teacher forcing, and the start of free generation when greedy decoding
    /// leaves the gold answer.
    /// `entry`'s caches holding the sample's context, compressed: from the shared recorded
    /// prefill, or by a prefill of the method's own that compresses chunk by chunk.
    fn caches(&self, entry: &methods::Entry) -> Result<Caches> {
        match self.own_prefill {
            None => compressed(entry, self.rec, self.axes),
            Some(opts) => {
                let mut caches = entry.caches(self.rec.len(), self.axes);
                self.m
                    .model
                    .prefill(self.sample.context(), &mut caches, opts)?;
                Ok(caches)
            }
        }
    }

    fn measure(
        &self,
        entry: &methods::Entry,
        reference: Option<&Tensor<B, 2>>,
    ) -> Result<Measured> {
        let m = self.m;
        let tc = std::time::Instant::now();
        let mut caches = self.caches(entry)?;
        let compress = tc.elapsed().as_secs_f64();
        let tt = std::time::Instant::now();
        let bytes: u64 = caches.iter().map(|c| c.footprint().total().get()).sum();
        let tokens = self.sample.context().len();
        let mut r = Record {
            method: entry.name.clone(),
            budget: entry.budget.clone(),
            length: self.length,
            task: self.sample.task(),
            sample: self.index,
            tokens,
            bytes,
            ratio: self.fp16 as f64 / bytes.max(1) as f64,
            score: None,
            tf_logp: None,
            tf_acc: None,
            nll: None,
            kl: None,
            prediction: None,
            refs: Vec::new(),
        };
        let mut logp_out = None;
        let mut generation = None;
        match self.sample {
            data::Sample::Prose { continuation, .. } => {
                let n = continuation.len();
                let logits = m
                    .model
                    .forward(&continuation[..n - 1], &mut caches, Logits::All)?;
                let logp = log_softmax(logits, 1);
                r.nll = Some(nll(&logp, &continuation[1..]));
                r.kl = Some(match reference {
                    None => 0.0,
                    Some(reference) => solver::measured::kl(reference, &logp),
                });
                logp_out = Some(logp);
            }
            data::Sample::Task(t) => {
                let (tf, fork) = teacher_forced(m, t, &mut caches)?;
                r.tf_logp = Some(tf.logp);
                r.tf_acc = Some(tf.acc);
                r.refs = t.refs.clone();
                match tf.first_miss {
                    // Greedy decoding reproduces the whole gold answer.
                    None => r.prediction = Some(m.tokenizer.decode(&t.target)?),
                    Some((i, token)) => {
                        // Caches holding the context and the question: forked after the
                        // question, or compressed and fed again.
                        let mut caches = match fork {
                            Some(c) => c,
                            None => {
                                let mut c = self.caches(entry)?;
                                m.model.forward(&t.question, &mut c, Logits::Last)?;
                                c
                            }
                        };
                        if i > 0 {
                            m.model.forward(&t.target[..i], &mut caches, Logits::Last)?;
                        }
                        let mut out = t.target[..i].to_vec();
                        out.push(token);
                        generation = Some((caches, out));
                    }
                }
            }
        }
        Ok(Measured {
            record: r,
            logp: logp_out,
            generation,
            seconds: [compress, tt.elapsed().as_secs_f64()],
        })
    }
}

/// Appends the question and the gold answer to `caches` and scores the answer's tokens.
///
/// Greedy decoding reproduces the gold tokens for as long as each is the argmax, which this
/// pass computes: generation only has to start at the first gold token that is not (and when
/// there is none, the greedy answer starts with the whole gold answer, which holds every
/// reference).
fn teacher_forced(
    m: &LoadedModel<B>,
    t: &tasks::TaskSample,
    caches: &mut [Box<dyn LayerCache<B>>],
) -> Result<(TeacherForced, Option<Caches>)> {
    let n = t.target.len();
    // The question first, then a fork of the caches (free generation resumes from there),
    // then the gold answer but its last token.
    let first = m.model.forward(&t.question, caches, Logits::Last)?;
    let fork: Option<Caches> = caches.iter().map(|c| c.fork()).collect();
    let logits = if n > 1 {
        let rest = m.model.forward(&t.target[..n - 1], caches, Logits::All)?;
        Tensor::cat(vec![first, rest], 0)
    } else {
        first
    };
    let rows = log_softmax(logits, 1);
    let best: Vec<i64> = rows.clone().argmax(1).into_data().iter::<i64>().collect();
    let hits = t
        .target
        .iter()
        .zip(&best)
        .filter(|(g, b)| **g as i64 == **b)
        .count();
    let first_miss = t
        .target
        .iter()
        .zip(&best)
        .position(|(g, b)| *g as i64 != *b)
        .map(|i| (i, best[i] as u32));
    Ok((
        TeacherForced {
            logp: -nll(&rows, &t.target),
            acc: hits as f64 / n as f64,
            first_miss,
        },
        fork,
    ))
}

/// A greedy answer under way: caches holding the question and the answer but its last token.
struct Generation {
    record: usize,
    caches: Vec<Box<dyn LayerCache<B>>>,
    out: Vec<u32>,
}

/// Greedy decoding of every pending answer in lockstep (one batched step for all methods),
/// each until the end of the turn, a line break after a non-empty answer, or `max_new` tokens.
fn generate(m: &LoadedModel<B>, t: &tasks::TaskSample, pending: &mut [Generation]) -> Result<()> {
    let done = |out: &[u32]| -> Result<bool> {
        let last = out[out.len() - 1];
        Ok(out.len() >= t.max_new
            || m.tokenizer.eos.contains(&last)
            || (m.tokenizer.decode(&[last])?.contains('\n')
                && !m.tokenizer.decode(out)?.trim().is_empty()))
    };
    loop {
        let mut active: Vec<&mut Generation> = Vec::new();
        for g in pending.iter_mut() {
            if !done(&g.out)? {
                active.push(g);
            }
        }
        if active.is_empty() {
            return Ok(());
        }
        let ids: Vec<u32> = active.iter().map(|g| g.out[g.out.len() - 1]).collect();
        let mut sets: Vec<&mut [Box<dyn LayerCache<B>>]> =
            active.iter_mut().map(|g| g.caches.as_mut_slice()).collect();
        let logits = m.model.decode_batch(&ids, &mut sets)?;
        let next: Vec<i64> = logits.argmax(1).into_data().iter::<i64>().collect();
        for (g, id) in active.into_iter().zip(next) {
            g.out.push(id as u32);
        }
    }
}

/// One method at one budget, averaged.
#[derive(Debug, Clone, Serialize)]
struct Summary {
    method: String,
    budget: String,
    /// Mean compression ratio over samples.
    ratio: f64,
    /// Mean cache bytes at each length.
    bytes: Vec<(usize, f64)>,
    /// Task samples measured.
    n: usize,
    /// Mean RULER score over every task sample.
    score: Option<f64>,
    tf_logp: Option<f64>,
    tf_acc: Option<f64>,
    nll: Option<f64>,
    kl: Option<f64>,
    /// Mean score per task.
    per_task: Vec<(&'static str, f64)>,
    /// Mean score and teacher-forced accuracy per length.
    per_length: Vec<(usize, f64, f64)>,
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

fn summarize(records: &[Record], lengths: &[usize]) -> Vec<Summary> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in records {
        let k = (r.method.clone(), r.budget.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut tasks: Vec<&'static str> = Vec::new();
    for r in records.iter().filter(|r| r.score.is_some()) {
        if !tasks.contains(&r.task) {
            tasks.push(r.task);
        }
    }
    let mut all_lengths: Vec<usize> = records.iter().map(|r| r.length).collect();
    all_lengths.sort_unstable();
    all_lengths.dedup();
    keys.into_iter()
        .map(|(method, budget)| {
            let rs: Vec<&Record> = records
                .iter()
                .filter(|r| r.method == method && r.budget == budget)
                .collect();
            Summary {
                ratio: mean(rs.iter().map(|r| r.ratio)).unwrap_or(f64::NAN),
                bytes: all_lengths
                    .iter()
                    .filter_map(|&l| {
                        mean(rs.iter().filter(|r| r.length == l).map(|r| r.bytes as f64))
                            .map(|b| (l, b))
                    })
                    .collect(),
                n: rs.iter().filter(|r| r.score.is_some()).count(),
                score: mean(rs.iter().filter_map(|r| r.score)),
                tf_logp: mean(rs.iter().filter_map(|r| r.tf_logp)),
                tf_acc: mean(rs.iter().filter_map(|r| r.tf_acc)),
                nll: mean(rs.iter().filter_map(|r| r.nll)),
                kl: mean(rs.iter().filter_map(|r| r.kl)),
                per_task: tasks
                    .iter()
                    .filter_map(|&t| {
                        mean(rs.iter().filter(|r| r.task == t).filter_map(|r| r.score))
                            .map(|s| (t, s))
                    })
                    .collect(),
                per_length: lengths
                    .iter()
                    .filter_map(|&l| {
                        let at = || rs.iter().filter(move |r| r.length == l);
                        Some((
                            l,
                            mean(at().filter_map(|r| r.score))?,
                            mean(at().filter_map(|r| r.tf_acc))?,
                        ))
                    })
                    .collect(),
                method,
                budget,
            }
        })
        .collect()
}

/// Where hetero stands at each budget against the best other method, each pair compared on
/// the samples both measured (a plan can be infeasible at some lengths: at 1024 tokens the
/// 64-token residual window alone exceeds 1/14 of the cache). Best = highest mean score, then
/// teacher-forced log-prob.
fn versus(records: &[Record]) -> String {
    let key = |r: &Record| (r.length, r.task, r.sample);
    let mut budgets: Vec<&str> = Vec::new();
    for r in records.iter().filter(|r| r.budget != "-") {
        if !budgets.contains(&r.budget.as_str()) {
            budgets.push(&r.budget);
        }
    }
    let mut out = String::new();
    for b in budgets {
        let hetero: Vec<&Record> = records
            .iter()
            .filter(|r| r.budget == b && r.method == "hetero")
            .collect();
        let mut others: Vec<&str> = Vec::new();
        for r in records
            .iter()
            .filter(|r| r.budget == b && !r.method.starts_with("hetero"))
        {
            if !others.contains(&r.method.as_str()) {
                others.push(&r.method);
            }
        }
        // (method, n, hetero score, its score, hetero TF log-p, its TF log-p)
        let mut best: Option<(&str, usize, f64, f64, f64, f64)> = None;
        for o in others {
            let theirs: Vec<&Record> = records
                .iter()
                .filter(|r| r.budget == b && r.method == o && r.score.is_some())
                .filter(|r| hetero.iter().any(|h| key(h) == key(r)))
                .collect();
            let ours: Vec<&Record> = hetero
                .iter()
                .copied()
                .filter(|h| h.score.is_some() && theirs.iter().any(|r| key(r) == key(h)))
                .collect();
            let (Some(hs), Some(os), Some(hl), Some(ol)) = (
                mean(ours.iter().filter_map(|r| r.score)),
                mean(theirs.iter().filter_map(|r| r.score)),
                mean(ours.iter().filter_map(|r| r.tf_logp)),
                mean(theirs.iter().filter_map(|r| r.tf_logp)),
            ) else {
                continue;
            };
            if best.is_none_or(|(_, _, _, bs, _, bl)| (os, ol) > (bs, bl)) {
                best = Some((o, theirs.len(), hs, os, hl, ol));
            }
        }
        if let Some((o, n, hs, os, hl, ol)) = best {
            out.push_str(&format!(
                "At {b}, on the {n} task samples both measured: hetero scores {hs:.1} (TF log-p {hl:.3}); the best other method, {o}, scores {os:.1} (TF log-p {ol:.3}).\n"
            ));
        }
    }
    if !out.is_empty() {
        out.insert(0, '\n');
    }
    out
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

fn fmt(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn markdown(
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

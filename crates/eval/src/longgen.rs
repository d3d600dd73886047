//! The long-generation task: where decode-time compression matters. A short prose prompt is
//! followed by a long teacher-forced continuation of held-out prose, fed in blocks of the
//! re-eviction interval as a generation would grow the cache; every method holds a fixed
//! token budget per KV head (64, 128, 256, or a share of the final length) all the way. NLL
//! and KL to the full cache are measured at every continuation position.
//!
//! Methods at each budget: `streaming`, `trig`, `α(trig)` (facility-location retention with λ
//! tuned on a development split of the calibration prose and confirmed on the held-out split),
//! `h2o` (the prompt's attention mass plus what every generated token's query pays, as H2O
//! accumulates it), and `hetero` solved for the final length at the bytes of the budget in
//! fp16, each evicting layer given a decode budget of what it keeps at that length.
use crate::data;
use crate::error::{EvalError, Result};
use crate::paired::{Interval, bootstrap};
use crate::progress::{Event, Progress};
use crate::session::Session;
use axis_evict::{EvictSetting, Lambda, ScorerKind, Selection};
use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;
use kv_tensor::{FullCache, KvBackend, LayerCache, Ratio};
use models::Logits;
use router::{DecodeBudget, Expert};

use serde::Serialize;
use solver::Method;

/// A decode-time budget: tokens per KV head, or a share of the final length.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum TokenBudget {
    /// A fixed number of tokens.
    Tokens(usize),
    /// A share of prompt + continuation.
    Share(Ratio),
}

impl TokenBudget {
    /// Tokens per head for a sequence of `total` tokens.
    pub fn tokens(self, total: usize) -> usize {
        match self {
            TokenBudget::Tokens(n) => n,
            TokenBudget::Share(r) => r.of(total),
        }
    }

    /// `64` or `1/8`.
    pub fn label(self) -> String {
        match self {
            TokenBudget::Tokens(n) => n.to_string(),
            TokenBudget::Share(r) => format!("1/{:.0}", 1.0 / r.get()),
        }
    }
}

impl std::str::FromStr for TokenBudget {
    type Err = EvalError;

    /// A token count (`64`) or a share of the final length (`1/8`), as [`label`](Self::label)
    /// writes them.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || EvalError::Options(format!("budget {s:?}: a token count or 1/N"));
        if let Some(d) = s.strip_prefix("1/") {
            let d: f64 = d.parse().map_err(|_| bad())?;
            let r = Ratio::new(1.0 / d).map_err(|_| bad())?;
            return Ok(TokenBudget::Share(r));
        }
        s.parse().map(TokenBudget::Tokens).map_err(|_| bad())
    }
}

/// What the task runs.
#[derive(Debug, Clone)]
pub struct LongGenOptions {
    /// Prompt tokens (prefilled, compressed at its end like any prompt).
    pub prompt: usize,
    /// Teacher-forced continuation tokens.
    pub continuation: usize,
    /// Budgets compared.
    pub budgets: Vec<TokenBudget>,
    /// Tokens per block (the re-eviction interval).
    pub interval: usize,
    /// Held-out samples (evaluation prose).
    pub samples: usize,
    /// Development samples (calibration prose) α's λ is tuned on.
    pub dev_samples: usize,
    /// λ values tried for α.
    pub lambdas: Vec<f64>,
    /// Budgets α's λ is tuned at.
    pub tune_budgets: Vec<TokenBudget>,
    /// Seed of the held-out samples and of the bootstrap.
    pub seed: u64,
}

impl Default for LongGenOptions {
    fn default() -> Self {
        Self {
            prompt: 256,
            continuation: 1024,
            budgets: vec![
                TokenBudget::Tokens(64),
                TokenBudget::Tokens(128),
                TokenBudget::Tokens(256),
                TokenBudget::Share(Ratio::new(0.125).unwrap_or(Ratio::ONE)),
            ],
            interval: 32,
            samples: 4,
            dev_samples: 2,
            lambdas: vec![0.0, 0.5, 1.0],
            tune_budgets: vec![TokenBudget::Tokens(64), TokenBudget::Tokens(128)],
            seed: 1,
        }
    }
}

/// One method on one sample.
#[derive(Debug, Clone, Serialize)]
pub struct LongRecord {
    /// Method name.
    pub method: String,
    /// Budget label.
    pub budget: String,
    /// Sample index.
    pub sample: usize,
    /// Mean NLL over the scored continuation positions.
    pub nll: f64,
    /// Mean KL of next-token distributions to the full cache.
    pub kl: f64,
    /// Most cache bytes measured after any block.
    pub peak_bytes: u64,
    /// Mean NLL per 128 positions (the curve over the generation).
    pub nll_curve: Vec<f64>,
}

/// A sample's prompt and continuation.
struct Text {
    prompt: Vec<u32>,
    continuation: Vec<u32>,
}

/// One method's caches on one text, fed as a generation: the prompt prefilled (compressed at
/// its end), then the continuation in blocks of `interval`. Returns the per-position
/// log-probabilities of each block and the peak bytes.
fn feed<B: KvBackend>(
    session: &Session<B>,
    caches: &mut [Box<dyn LayerCache<B>>],
    text: &Text,
    interval: usize,
    needs: router::Needs,
) -> Result<(Vec<Tensor<B, 2>>, u64)> {
    let m = &session.model.model;
    m.prefill(&text.prompt, caches, &solver::observing(needs))?;
    let mut peak = 0u64;
    let mut blocks = Vec::new();
    let n = text.continuation.len();
    for start in (0..n - 1).step_by(interval.max(1)) {
        let end = (start + interval).min(n - 1);
        let logits = m.forward(&text.continuation[start..end], caches, Logits::All)?;
        blocks.push(log_softmax(logits, 1));
        let bytes: u64 = caches.iter().map(|c| c.footprint().total().get()).sum();
        peak = peak.max(bytes);
    }
    Ok((blocks, peak))
}

/// Scores `blocks` against the continuation (and the full cache's blocks).
fn score<B: KvBackend>(
    blocks: &[Tensor<B, 2>],
    reference: &[Tensor<B, 2>],
    text: &Text,
) -> (f64, f64, Vec<f64>) {
    let mut nlls = Vec::new();
    let mut kl = 0.0;
    let mut at = 1;
    for (b, r) in blocks.iter().zip(reference) {
        let rows = b.dims()[0];
        let v: Vec<f32> = b.clone().into_data().iter::<f32>().collect();
        let vocab = b.dims()[1];
        for i in 0..rows {
            let t = text.continuation[at + i] as usize;
            nlls.push(-(v[i * vocab + t] as f64));
        }
        kl += solver::measured::kl(r, b) * rows as f64;
        at += rows;
    }
    let n = nlls.len().max(1) as f64;
    let curve = nlls
        .chunks(128)
        .map(|c| c.iter().sum::<f64>() / c.len() as f64)
        .collect();
    (nlls.iter().sum::<f64>() / n, kl / n, curve)
}

/// An evicting expert with `scorer` and `selection` that holds `tokens` tokens from the end of
/// the prompt on.
fn single(
    scorer: ScorerKind,
    selection: Selection,
    prompt: usize,
    tokens: usize,
    interval: usize,
) -> Result<Expert> {
    let keep = Ratio::new((tokens as f64 / prompt as f64).min(1.0))?;
    let mut evict = EvictSetting::new(scorer, keep).with_selection(selection);
    evict.window = evict.window.min(tokens.saturating_sub(evict.sinks));
    Ok(Expert {
        evict: Some(evict),
        decode: Some(DecodeBudget { tokens, interval }),
        ..Expert::FULL
    })
}

/// `hetero` solved for the final length at the fp16 bytes of `tokens` tokens, each evicting
/// layer held during decoding at what it keeps at that length.
fn hetero<B: KvBackend>(
    session: &Session<B>,
    table: &solver::SensitivityTable,
    total: usize,
    tokens: usize,
    interval: usize,
) -> Result<Vec<Expert>> {
    let geo = session.geometry(total);
    let bytes = session
        .model
        .model
        .config
        .kv_layout()
        .fp16_bytes(1, tokens)
        .get();
    // An evicting layer whose scorer cannot run while decoding (KVzip) would grow past
    // the budget: solve over the experts that either keep everything or re-evict.
    let usable: Vec<usize> = (0..table.menu.len())
        .filter(|&i| table.menu[i].evict.is_none() || table.menu[i].compresses_while_decoding())
        .collect();
    let menu: Vec<Expert> = usable.iter().map(|&i| table.menu[i].clone()).collect();
    let credited = table.solver_loss();
    let loss = |l: usize, e: usize| credited[l][usable[e]];
    let planned = Method::Hetero.plan(&menu, &loss, &geo, bytes, true)?;
    Ok(planned.plan.with_decode(total, interval).layers)
}

/// Caches of a plan (one expert per layer) or, for `None`, the full cache.
fn caches<B: KvBackend>(
    session: &Session<B>,
    plan: Option<&[Expert]>,
) -> Vec<Box<dyn LayerCache<B>>> {
    let layers = session.model.model.config.layers;
    match plan {
        None => (0..layers)
            .map(|_| Box::new(FullCache::<B>::new()) as Box<dyn LayerCache<B>>)
            .collect(),
        Some(p) => p
            .iter()
            .map(|e| Box::new(session.axes.cache(e.clone())) as Box<dyn LayerCache<B>>)
            .collect(),
    }
}

fn texts<B: KvBackend>(
    session: &Session<B>,
    opts: &LongGenOptions,
    dev: bool,
) -> Result<Vec<Text>> {
    let n = opts.prompt + opts.continuation;
    let split = |ids: Vec<u32>| Text {
        prompt: ids[..opts.prompt].to_vec(),
        continuation: ids[opts.prompt..].to_vec(),
    };
    if dev {
        // Calibration prose, away from the passages the axes and routers are fitted on.
        return (0..opts.dev_samples)
            .map(|i| Ok(split(session.passage(1_000_000 + i * 150_000, n)?)))
            .collect();
    }
    let samples = data::prose_samples(
        &session.model.tokenizer,
        &session.text,
        opts.samples,
        opts.prompt,
        opts.continuation,
        opts.seed ^ 0x10_6e,
    )?;
    Ok(samples
        .into_iter()
        .map(|s| match s {
            data::Sample::Prose {
                context,
                continuation,
            } => Text {
                prompt: context,
                continuation,
            },
            data::Sample::Task(t) => Text {
                prompt: t.context,
                continuation: t.target,
            },
        })
        .collect())
}

/// A method's name, budget label and plan (`None`: the full cache).
type Method3 = (String, String, Option<Vec<Expert>>);

/// Every (method, budget) of `methods` on `texts`, text by text in `methods` order; a plan
/// equal to an earlier one is measured once.
fn measure<B: KvBackend>(
    session: &Session<B>,
    texts: &[Text],
    methods: &[Method3],
    interval: usize,
    progress: &dyn Progress,
) -> Result<Vec<LongRecord>> {
    let mut out: Vec<LongRecord> = Vec::new();
    for (si, text) in texts.iter().enumerate() {
        let (reference, _) = feed(
            session,
            &mut caches(session, None),
            text,
            interval,
            Default::default(),
        )?;
        let first = out.len();
        for (mi, (name, budget, plan)) in methods.iter().enumerate() {
            // A plan measured already on this text (α at the chosen λ is also a tuning row):
            // its record, under this name.
            if let Some(j) = methods[..mi].iter().position(|m| m.2 == *plan) {
                let twin = LongRecord {
                    method: name.clone(),
                    budget: budget.clone(),
                    ..out[first + j].clone()
                };
                out.push(twin);
                progress.event(Event::Step);
                continue;
            }
            progress.event(Event::Message(&format!("{name}@{budget}")));
            let needs = router::Needs::of(plan.iter().flatten());
            let (blocks, peak) = feed(
                session,
                &mut caches(session, plan.as_deref()),
                text,
                interval,
                needs,
            )?;
            let (nll, kl, nll_curve) = score(&blocks, &reference, text);
            out.push(LongRecord {
                method: name.clone(),
                budget: budget.clone(),
                sample: si,
                nll,
                kl,
                peak_bytes: peak,
                nll_curve,
            });
            progress.event(Event::Step);
        }
    }
    Ok(out)
}

/// α's tuning: every λ at every tuning budget, on the development and the held-out split.
#[derive(Debug, Clone, Serialize)]
pub struct AlphaTuning {
    /// `(λ, budget, development NLL, held-out NLL)`.
    pub rows: Vec<(f64, String, f64, f64)>,
    /// The λ with the lowest development NLL summed over the tuning budgets.
    pub chosen: f64,
}

/// α's methods: every λ at every tuning budget.
fn alpha_methods(opts: &LongGenOptions, layers: usize) -> Result<Vec<Method3>> {
    let total = opts.prompt + opts.continuation;
    let mut methods = Vec::new();
    for &l in &opts.lambdas {
        for b in &opts.tune_budgets {
            let sel = Selection::FacilityLocation {
                lambda: Lambda::new(l)?,
            };
            let e = single(
                ScorerKind::Trig,
                sel,
                opts.prompt,
                b.tokens(total),
                opts.interval,
            )?;
            methods.push((alpha_name(l), b.label(), Some(vec![e; layers])));
        }
    }
    Ok(methods)
}

fn alpha_name(lambda: f64) -> String {
    format!("α λ={lambda}")
}

/// Mean NLL of `method` at `budget` in `records`.
fn mean_nll(records: &[LongRecord], method: &str, budget: &str) -> f64 {
    let v: Vec<f64> = records
        .iter()
        .filter(|r| r.method == method && r.budget == budget)
        .map(|r| r.nll)
        .collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The λ with the lowest development NLL summed over the tuning budgets.
fn choose_lambda(opts: &LongGenOptions, dev: &[LongRecord]) -> Result<f64> {
    let total = |l: f64| -> f64 {
        opts.tune_budgets
            .iter()
            .map(|b| mean_nll(dev, &alpha_name(l), &b.label()))
            .sum()
    };
    opts.lambdas
        .iter()
        .copied()
        .min_by(|a, b| total(*a).total_cmp(&total(*b)))
        .ok_or_else(|| EvalError::Options("α needs at least one λ".into()))
}

/// What the task found.
#[derive(Debug, Clone, Serialize)]
pub struct LongGenReport {
    /// α's tuning.
    pub alpha: AlphaTuning,
    /// Every method, budget and held-out sample.
    pub records: Vec<LongRecord>,
    /// Per method and budget: mean NLL, mean KL, mean peak bytes, the paired NLL difference
    /// to `trig` at the same budget.
    pub rows: Vec<LongRow>,
}

/// One method at one budget, over the held-out samples.
#[derive(Debug, Clone, Serialize)]
pub struct LongRow {
    /// Method.
    pub method: String,
    /// Budget label.
    pub budget: String,
    /// Mean NLL.
    pub nll: f64,
    /// Mean KL to the full cache.
    pub kl: f64,
    /// Mean peak bytes.
    pub peak_bytes: f64,
    /// Paired NLL difference (row − trig) with its 95 % bootstrap interval.
    pub vs_trig: Option<Interval>,
}

/// Tunes α, then measures every method at every budget on the held-out samples.
pub fn run<B: KvBackend>(
    session: &Session<B>,
    opts: &LongGenOptions,
    progress: &dyn Progress,
) -> Result<LongGenReport> {
    let layers = session.model.model.config.layers;
    // α's λ is chosen on the development split alone; the held-out split then measures every
    // λ and every method in one pass (one full-cache reference per text).
    let tuning = alpha_methods(opts, layers)?;
    progress.event(Event::Start {
        what: "tune α",
        total: (opts.dev_samples * tuning.len()) as u64,
    });
    let dev = measure(
        session,
        &texts(session, opts, true)?,
        &tuning,
        opts.interval,
        progress,
    )?;
    progress.event(Event::Finish);
    let chosen = choose_lambda(opts, &dev)?;
    let table = session.table(&crate::CalibrationSpec::default(), None, progress)?;
    let total = opts.prompt + opts.continuation;
    let mut methods = Vec::new();
    for b in &opts.budgets {
        let n = b.tokens(total);
        let label = b.label();
        let fl = Selection::FacilityLocation {
            lambda: Lambda::new(chosen)?,
        };
        for (name, scorer, sel) in [
            ("streaming", ScorerKind::Streaming, Selection::TopK),
            ("trig", ScorerKind::Trig, Selection::TopK),
            ("α(trig)", ScorerKind::Trig, fl),
            ("h2o", ScorerKind::H2o, Selection::TopK),
        ] {
            let e = single(scorer, sel, opts.prompt, n, opts.interval)?;
            methods.push((name.to_string(), label.clone(), Some(vec![e; layers])));
        }
        match hetero(session, &table, total, n, opts.interval) {
            Ok(p) => methods.push(("hetero".into(), label.clone(), Some(p))),
            Err(e) => progress.event(Event::Note(&format!("hetero at {label}: {e}"))),
        }
    }
    let compared = methods.len();
    methods.extend(tuning);
    progress.event(Event::Start {
        what: "long generation",
        total: (opts.samples * methods.len()) as u64,
    });
    let measured = measure(
        session,
        &texts(session, opts, false)?,
        &methods,
        opts.interval,
        progress,
    )?;
    progress.event(Event::Finish);
    // Per text, the compared methods first, then α's tuning rows.
    let (mut records, mut held) = (Vec::new(), Vec::new());
    for (i, r) in measured.into_iter().enumerate() {
        if i % methods.len() < compared {
            records.push(r);
        } else {
            held.push(r);
        }
    }
    let mut tuned = Vec::new();
    for &l in &opts.lambdas {
        for b in &opts.tune_budgets {
            let (m, b) = (alpha_name(l), b.label());
            tuned.push((
                l,
                b.clone(),
                mean_nll(&dev, &m, &b),
                mean_nll(&held, &m, &b),
            ));
        }
    }
    let alpha = AlphaTuning {
        rows: tuned,
        chosen,
    };
    let rows = rows(&records, opts.seed);
    Ok(LongGenReport {
        alpha,
        records,
        rows,
    })
}

fn rows(records: &[LongRecord], seed: u64) -> Vec<LongRow> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in records {
        let k = (r.method.clone(), r.budget.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(m, b)| {
            let of = |name: &str| -> Vec<&LongRecord> {
                records
                    .iter()
                    .filter(|r| r.method == name && r.budget == b)
                    .collect()
            };
            let mine = of(&m);
            let n = mine.len().max(1) as f64;
            let trig = of("trig");
            let diffs: Vec<f64> = mine
                .iter()
                .filter_map(|r| {
                    trig.iter()
                        .find(|t| t.sample == r.sample)
                        .map(|t| r.nll - t.nll)
                })
                .collect();
            LongRow {
                nll: mine.iter().map(|r| r.nll).sum::<f64>() / n,
                kl: mine.iter().map(|r| r.kl).sum::<f64>() / n,
                peak_bytes: mine.iter().map(|r| r.peak_bytes as f64).sum::<f64>() / n,
                vs_trig: if m == "trig" {
                    None
                } else {
                    bootstrap(&diffs, seed)
                },
                method: m,
                budget: b,
            }
        })
        .collect()
}

/// The report as markdown: α's tuning, then the comparison.
pub fn markdown(r: &LongGenReport, opts: &LongGenOptions) -> String {
    let mut s = format!(
        "Long generation: {} prompt tokens, {} teacher-forced continuation tokens fed in blocks of {} (the re-eviction interval); {} held-out sample(s), {} development sample(s).\n\n",
        opts.prompt, opts.continuation, opts.interval, opts.samples, opts.dev_samples
    );
    s.push_str("α(trig) λ, tuned on the development split (calibration prose) and measured on the held-out split:\n\n| λ | budget | dev NLL | held-out NLL |\n|---:|---|---:|---:|\n");
    for (l, b, d, h) in &r.alpha.rows {
        s.push_str(&format!("| {l} | {b} | {d:.4} | {h:.4} |\n"));
    }
    s.push_str(&format!(
        "\nChosen λ = {} (lowest development NLL over the tuning budgets).\n\n",
        r.alpha.chosen
    ));
    s.push_str("| method | budget | peak bytes | NLL ↓ | KL ↓ | Δ NLL vs trig [95 % CI] |\n|---|---|---:|---:|---:|---|\n");
    for row in &r.rows {
        let vs = row.vs_trig.map_or("-".into(), |i| {
            let t = crate::stats::interval_text(&i, 3);
            if i.lo.abs().max(i.hi.abs()) < 1e-9 {
                // Same kept tokens up to float rounding (α at λ = 0 is top-k).
                "0 (the same selection)".into()
            } else if i.resolved() {
                format!("**{t}**")
            } else {
                t
            }
        });
        s.push_str(&format!(
            "| {} | {} | {} | {:.4} | {:.4} | {vs} |\n",
            row.method,
            row.budget,
            kv_tensor::Bytes(row.peak_bytes as u64),
            row.nll,
            row.kl
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(method: &str, sample: usize, nll: f64) -> LongRecord {
        LongRecord {
            method: method.into(),
            budget: "64".into(),
            sample,
            nll,
            kl: 0.0,
            peak_bytes: 100,
            nll_curve: vec![nll],
        }
    }

    #[test]
    fn budgets_read_as_tokens_or_shares() {
        assert_eq!(TokenBudget::Tokens(64).tokens(1280), 64);
        let eighth = TokenBudget::Share(Ratio::new(0.125).expect("ratio"));
        assert_eq!(eighth.tokens(1280), 160);
        assert_eq!(eighth.label(), "1/8");
        for b in [TokenBudget::Tokens(64), eighth] {
            assert_eq!(b.label().parse::<TokenBudget>().expect("parses"), b);
        }
        for bad in ["", "1/0", "1/x", "-3", "sixty"] {
            assert!(bad.parse::<TokenBudget>().is_err(), "{bad:?}");
        }
    }

    /// Rows pair each method with trig on the same samples; a method better on every sample
    /// resolves below zero, trig itself has no interval.
    #[test]
    fn rows_pair_with_trig_per_sample() {
        let mut rs = Vec::new();
        for s in 0..4 {
            rs.push(record("trig", s, 3.0 + s as f64 * 0.1));
            rs.push(record(
                "hetero",
                s,
                2.8 + s as f64 * 0.1 + (s % 2) as f64 * 0.01,
            ));
        }
        let rows = rows(&rs, 1);
        let trig = rows.iter().find(|r| r.method == "trig").expect("trig row");
        assert!(trig.vs_trig.is_none());
        let h = rows
            .iter()
            .find(|r| r.method == "hetero")
            .expect("hetero row");
        let i = h.vs_trig.expect("interval");
        assert!(i.resolved() && i.hi < 0.0, "{i:?}");
        assert!((h.nll - 2.955).abs() < 1e-9);
    }
}

//! Which calibration predicts the tasks: every choice of passages and loss, ranked by Spearman
//! correlation against the teacher-forced answer log-probability that held-out retrieval
//! samples lose with one layer compressed (and, as before, against end-to-end KL on held-out
//! prose).
//!
//! Each calibration passage is measured once per loss on a spread of (layer, expert) pairs; a
//! candidate is a set of those passages and one loss, its value for a pair the mean over its
//! passages. So nine candidates cost three passages' measurements.
use super::{CalibrationSpec, RETRIEVAL_TASKS, prose_passages, retrieval_passages};
use crate::data;
use crate::error::Result;
use crate::progress::{Event, Progress};
use crate::session::{Session, menu};
use crate::tasks::Task;
use kv_tensor::KvBackend;
use router::Expert;
use solver::{
    CalibrationLoss, CalibrationOptions, EndToEnd, EndToEndLoss, OBSERVE_WINDOW, Passage, spearman,
};
use std::time::Instant;

/// Seed of the held-out retrieval samples: drawn from the evaluation split, like the
/// evaluation's samples, but not the default run's seed.
pub const VALIDATION_SEED: u64 = 0x6b76_6e64_7661_6c31;

/// What [`validate`] measures.
#[derive(Debug, Clone)]
pub struct ValidateOptions {
    /// Context tokens of the calibration passages and of the held-out samples.
    pub context: usize,
    /// Layers measured.
    pub layers: Vec<usize>,
    /// Experts measured, spread evenly over the calibration menu.
    pub experts: usize,
    /// Calibration prose passages.
    pub prose: usize,
    /// Calibration retrieval passages.
    pub retrieval: usize,
    /// Held-out retrieval samples (every non-QA RULER task in turn).
    pub held_out: usize,
}

impl ValidateOptions {
    /// Six layers from the first to the last, eight experts, one prose and four retrieval
    /// passages (the default table's), six held-out samples.
    pub fn spread(layers: usize, context: usize) -> Self {
        Self {
            context,
            layers: (0..6).map(|i| i * layers.saturating_sub(1) / 5).collect(),
            experts: 8,
            prose: 1,
            retrieval: crate::calibration::RETRIEVAL_TASKS.len(),
            held_out: 6,
        }
    }
}

/// One calibration choice and how well it ranks the pairs.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Passages and loss.
    pub spec: CalibrationSpec,
    /// Spearman against the held-out answers' log-probability drop.
    pub answer: Option<f64>,
    /// Spearman against held-out prose KL.
    pub prose_kl: Option<f64>,
    /// Its Spearman against the held-out answers minus the prose-only attention proxy's (the
    /// first slice's table), with a 95 % paired bootstrap interval over the pairs.
    pub gain: Option<(f64, f64, f64)>,
    /// Its loss on each pair.
    pub values: Vec<f64>,
    /// Seconds its passages took here (on the pairs measured).
    pub seconds: f64,
    /// Projected seconds to calibrate the whole menu at every layer (attention: the captures
    /// plus the measured per-expert cost, an upper bound because a pick's own prefill pass,
    /// such as KVzip's reconstruction, counts as per-expert cost; end to end: the measured
    /// per-pair cost).
    pub full_menu_seconds: f64,
}

/// What [`validate`] found.
#[derive(Debug, Clone)]
pub struct ProxyReport {
    /// The (layer, expert) pairs measured.
    pub pairs: Vec<(usize, Expert)>,
    /// Per pair: the held-out answers' mean teacher-forced log-probability drop.
    pub answer_drop: Vec<f64>,
    /// Per pair: end-to-end KL on a held-out prose passage.
    pub prose_kl: Vec<f64>,
    /// Every candidate, in the order measured.
    pub candidates: Vec<Candidate>,
    /// Seconds the held-out measurements took.
    pub held_out_seconds: f64,
}

impl ProxyReport {
    /// The candidate that ranks the held-out answers best (the default's criterion).
    pub fn best(&self) -> Option<&Candidate> {
        self.candidates
            .iter()
            .filter(|c| c.answer.is_some())
            .max_by(|a, b| {
                a.answer
                    .unwrap_or(-1.0)
                    .total_cmp(&b.answer.unwrap_or(-1.0))
            })
    }

    /// The candidates as a markdown table.
    pub fn markdown(&self) -> String {
        let r = |x: Option<f64>| x.map_or("—".to_string(), |v| format!("{v:+.3}"));
        let gain = |g: Option<(f64, f64, f64)>| {
            g.map_or("—".to_string(), |(g, lo, hi)| {
                format!("{g:+.3} [{lo:+.3}, {hi:+.3}]")
            })
        };
        let mut s = String::from(
            "| passages | loss | Spearman vs held-out answer log-p drop | gain over prose attention (95 % bootstrap) | vs held-out prose KL | seconds here | full menu (projected) |\n|---|---|---:|---:|---:|---:|---:|\n",
        );
        for c in &self.candidates {
            s.push_str(&format!(
                "| {} prose + {} retrieval | {} | {} | {} | {} | {:.0} | {:.0} min |\n",
                c.spec.prose,
                c.spec.retrieval,
                c.spec.loss,
                r(c.answer),
                gain(c.gain),
                r(c.prose_kl),
                c.seconds,
                c.full_menu_seconds / 60.0
            ));
        }
        s
    }
}

/// One calibration passage's losses on the pairs, and what they cost.
struct Measured {
    attention: Vec<f64>,
    /// Seconds of an attention calibration with one expert (the captures, mostly).
    capture_seconds: f64,
    end_to_end: Vec<EndToEndLoss>,
    attention_seconds: f64,
    end_to_end_seconds: f64,
}

impl Measured {
    /// Its `loss` on pair `i` (`get` is `None` for the attention loss alone).
    fn value(&self, loss: CalibrationLoss, i: usize) -> f64 {
        self.end_to_end[i].get(loss).unwrap_or(self.attention[i])
    }
}

/// Measures every candidate of `opts` (see the module doc).
pub fn validate<B: KvBackend>(
    s: &Session<B>,
    opts: &ValidateOptions,
    progress: &dyn Progress,
) -> Result<ProxyReport> {
    let m = &s.model.model;
    let full_menu = menu(m.config.layers);
    if let Some(bad) = opts.layers.iter().find(|&&l| l >= m.config.layers) {
        return Err(crate::EvalError::Options(format!(
            "layer {bad} does not exist (the model has {})",
            m.config.layers
        )));
    }
    let n = full_menu.len();
    if n < 2 {
        return Err(crate::EvalError::Options(
            "validation needs a menu of at least two experts".into(),
        ));
    }
    let k = opts.experts.clamp(2, n);
    let picks: Vec<Expert> = (0..k)
        .map(|i| full_menu[i * (n - 1) / (k - 1)].clone())
        .collect();
    let pairs: Vec<(usize, Expert)> = opts
        .layers
        .iter()
        .flat_map(|&l| picks.iter().map(move |e| (l, e.clone())))
        .collect();
    let refs: Vec<(usize, &Expert)> = pairs.iter().map(|(l, e)| (*l, e)).collect();
    let (held, held_prose) = held_out_passages(s, opts)?;
    let calib_prose = prose_passages(s, opts.prose, opts.context)?;
    let calib_retrieval = retrieval_passages(
        s,
        data::calibration_text(&s.text),
        &RETRIEVAL_TASKS,
        opts.retrieval,
        opts.context,
        super::CALIBRATION_SEED,
    )?;
    let steps = held.len() + 1 + calib_prose.len() + calib_retrieval.len();
    progress.event(Event::Start {
        what: "validate proxy",
        total: steps as u64,
    });
    let t0 = Instant::now();
    let mut answer_drop = vec![0.0; pairs.len()];
    for p in &held {
        let e2e = EndToEnd::new(m, p, &picks, &s.axes, OBSERVE_WINDOW)?;
        for (d, l) in answer_drop.iter_mut().zip(e2e.both(&refs, |_, _| {})?) {
            *d += l.answer_logp_drop / held.len() as f64;
        }
        progress.event(Event::Step);
    }
    let e2e = EndToEnd::new(m, &held_prose, &picks, &s.axes, OBSERVE_WINDOW)?;
    let prose_kl: Vec<f64> = e2e.both(&refs, |_, _| {})?.iter().map(|l| l.kl).collect();
    progress.event(Event::Step);
    let held_out_seconds = t0.elapsed().as_secs_f64();
    let mut measure = |p: &Passage| -> Result<Measured> {
        let r = measure_passage(s, p, &picks, &pairs, &refs);
        progress.event(Event::Step);
        r
    };
    let prose: Vec<Measured> = calib_prose
        .iter()
        .map(&mut measure)
        .collect::<Result<_>>()?;
    let retrieval: Vec<Measured> = calib_retrieval
        .iter()
        .map(&mut measure)
        .collect::<Result<_>>()?;
    progress.event(Event::Finish);
    let scale = Scale {
        menu: n,
        picks: k,
        layers: m.config.layers,
        pairs: pairs.len(),
    };
    let mut candidates = candidates(opts, &prose, &retrieval, &answer_drop, &prose_kl, &scale);
    add_gains(&mut candidates, &answer_drop);
    Ok(ProxyReport {
        pairs,
        answer_drop,
        prose_kl,
        candidates,
        held_out_seconds,
    })
}

/// The held-out retrieval samples (evaluation split, every non-QA task in turn, their own
/// seed) and the held-out prose passage.
fn held_out_passages<B: KvBackend>(
    s: &Session<B>,
    opts: &ValidateOptions,
) -> Result<(Vec<Passage>, Passage)> {
    let suite: Vec<Task> = Task::ALL.into_iter().filter(|t| !t.needs_qa()).collect();
    let held = retrieval_passages(
        s,
        data::evaluation_text(&s.text),
        &suite,
        opts.held_out,
        opts.context,
        VALIDATION_SEED,
    )?;
    let prose_ids = s.passage(
        data::CALIBRATION_CHARS + 900_000,
        opts.context + super::PROSE_PROBE,
    )?;
    Ok((held, Passage::prose(&prose_ids, opts.context)?))
}

/// How the measured subset relates to a full calibration (for the projected time).
struct Scale {
    menu: usize,
    picks: usize,
    layers: usize,
    pairs: usize,
}

/// Every loss of one calibration passage on the pairs.
fn measure_passage<B: KvBackend>(
    s: &Session<B>,
    passage: &Passage,
    picks: &[Expert],
    pairs: &[(usize, Expert)],
    refs: &[(usize, &Expert)],
) -> Result<Measured> {
    let m = &s.model.model;
    let timed = |menu: &[Expert]| -> Result<(Vec<Vec<f64>>, f64)> {
        let t0 = Instant::now();
        let one = std::slice::from_ref(passage);
        let opts = CalibrationOptions::default();
        let table = solver::calibrate(m, one, menu, &s.axes, &opts, |_, _| {})?;
        Ok((table, t0.elapsed().as_secs_f64()))
    };
    // The captures cost the same for any menu: timing one expert too separates them from the
    // per-expert cost, so the full menu's time can be projected.
    let (_, capture_seconds) = timed(&picks[..1])?;
    let (table, attention_seconds) = timed(picks)?;
    let attention = pairs
        .iter()
        .map(|(l, e)| {
            let i = picks.iter().position(|p| p == e).unwrap_or(0);
            table[*l][i]
        })
        .collect();
    let t1 = Instant::now();
    let e2e = EndToEnd::new(m, passage, picks, &s.axes, OBSERVE_WINDOW)?.both(refs, |_, _| {})?;
    let end_to_end_seconds = t1.elapsed().as_secs_f64();
    Ok(Measured {
        attention,
        capture_seconds,
        end_to_end: e2e,
        attention_seconds,
        end_to_end_seconds,
    })
}

/// Every (passages, loss) candidate over the measured passages.
fn candidates(
    opts: &ValidateOptions,
    prose: &[Measured],
    retrieval: &[Measured],
    answer_drop: &[f64],
    prose_kl: &[f64],
    scale: &Scale,
) -> Vec<Candidate> {
    // Prose alone, retrieval alone, and prose with one, two (the default before 2026-12-03)
    // and every retrieval passage (one more passage costs one more capture of the whole menu).
    let mut sets: Vec<(usize, usize)> = [
        (prose.len(), 0),
        (0, retrieval.len()),
        (prose.len(), retrieval.len().min(1)),
        (prose.len(), retrieval.len().min(2)),
        (prose.len(), retrieval.len()),
    ]
    .into_iter()
    .filter(|&(p, r)| p + r > 0)
    .collect();
    sets.sort_unstable();
    sets.dedup();
    let mut out = Vec::new();
    for (np, nr) in sets {
        let used: Vec<&Measured> = prose[..np].iter().chain(&retrieval[..nr]).collect();
        for loss in CalibrationLoss::ALL {
            let mean: Vec<f64> = (0..answer_drop.len())
                .map(|i| used.iter().map(|m| m.value(loss, i)).sum::<f64>() / used.len() as f64)
                .collect();
            let (seconds, full) = match loss {
                CalibrationLoss::Attention => {
                    let t: f64 = used.iter().map(|m| m.attention_seconds).sum();
                    let one: f64 = used.iter().map(|m| m.capture_seconds).sum();
                    let per_expert = (t - one).max(0.0) / (scale.picks - 1).max(1) as f64;
                    (t, one + per_expert * (scale.menu - 1) as f64)
                }
                _ => {
                    let t: f64 = used.iter().map(|m| m.end_to_end_seconds).sum();
                    (
                        t,
                        t * (scale.menu * scale.layers) as f64 / scale.pairs as f64,
                    )
                }
            };
            out.push(Candidate {
                spec: CalibrationSpec {
                    context: opts.context,
                    prose: np,
                    retrieval: nr,
                    loss,
                },
                answer: spearman(&mean, answer_drop),
                prose_kl: spearman(&mean, prose_kl),
                gain: None,
                values: mean,
                seconds,
                full_menu_seconds: full,
            });
        }
    }
    out
}

/// Bootstrap resamples of the pairs behind each gain's interval.
const RESAMPLES: usize = 2000;

/// Each candidate's Spearman gain over the prose-only attention proxy, with a paired bootstrap
/// interval: the pairs are resampled with replacement and both correlations recomputed on the
/// same resample (seeded, so the report repeats).
fn add_gains(candidates: &mut [Candidate], target: &[f64]) {
    let baseline = candidates
        .iter()
        .find(|c| c.spec.retrieval == 0 && c.spec.loss == CalibrationLoss::Attention)
        .map(|c| c.values.clone());
    let Some(base) = baseline else { return };
    let n = target.len();
    let mut rng = crate::rng::Rng(VALIDATION_SEED);
    let draws: Vec<Vec<usize>> = (0..RESAMPLES)
        .map(|_| (0..n).map(|_| rng.below(n)).collect())
        .collect();
    let pick = |xs: &[f64], idx: &[usize]| -> Vec<f64> { idx.iter().map(|&i| xs[i]).collect() };
    for c in candidates.iter_mut() {
        let (Some(a), Some(b)) = (spearman(&c.values, target), spearman(&base, target)) else {
            continue;
        };
        let mut diffs: Vec<f64> = draws
            .iter()
            .filter_map(|idx| {
                let t = pick(target, idx);
                Some(spearman(&pick(&c.values, idx), &t)? - spearman(&pick(&base, idx), &t)?)
            })
            .collect();
        if diffs.len() < RESAMPLES / 2 {
            continue;
        }
        diffs.sort_by(f64::total_cmp);
        let q = |p: f64| diffs[((diffs.len() - 1) as f64 * p).round() as usize];
        c.gain = Some((a - b, q(0.025), q(0.975)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(values: Vec<f64>, retrieval: usize) -> Candidate {
        Candidate {
            spec: CalibrationSpec {
                context: 64,
                prose: 1 - retrieval.min(1),
                retrieval,
                loss: CalibrationLoss::Attention,
            },
            answer: None,
            prose_kl: None,
            gain: None,
            values,
            seconds: 0.0,
            full_menu_seconds: 0.0,
        }
    }

    /// A candidate that ranks the target exactly gains over a noisy baseline, with an interval
    /// that excludes 0; the baseline's gain over itself is 0 with a zero-width interval.
    #[test]
    fn gains_resolve_a_better_ranking() {
        let target: Vec<f64> = (0..40).map(|i| i as f64).collect();
        let noisy: Vec<f64> = (0..40)
            .map(|i| ((i * 17) % 40) as f64 + i as f64 * 0.5)
            .collect();
        let mut c = vec![candidate(noisy, 0), candidate(target.clone(), 2)];
        add_gains(&mut c, &target);
        let (g, lo, hi) = c[1].gain.expect("gain");
        assert!(g > 0.0 && lo > 0.0 && hi >= g, "{g} [{lo}, {hi}]");
        let (g0, lo0, hi0) = c[0].gain.expect("gain");
        assert!(g0 == 0.0 && lo0 == 0.0 && hi0 == 0.0);
    }
}

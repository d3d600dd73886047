//! Calibration: how much each layer loses under each expert of a menu.
//!
//! Each [`Passage`] is a context and a probe: the context is compressed exactly as at inference
//! (question-agnostic, end of prefill, with the same observations), and the probe — a prose
//! continuation, or a retrieval question with its gold answer — is read through it, so scorers
//! are judged on queries they never saw. The default signal is MoE-nD's proxy, the relative L2
//! error of one layer's attention output with only that layer compressed; the end-to-end
//! losses of [`CalibrationLoss`] read the whole model's output instead.
use axis_evict::trig::{RopePairing, TrigAccumulator, TrigStats};
use axis_lowrank::{PcaAccumulator, PcaBases};
use burn::tensor::Tensor;
use kv_tensor::KvBackend;
use kv_tensor::{LayerCache, RecordingCache, attention};
use models::RopeLayout;
use models::{Llama, ModelError, PrefillOptions};
use rayon::prelude::*;
use router::{Axes, Expert};
use serde::{Deserialize, Serialize};

/// What calibration measures for each (layer, expert): the loss the solver minimises.
///
/// All three compress one layer at a time and read the passage's probe through it; they differ
/// in what they compare and in cost. `validate-proxy` ranks them against the teacher-forced
/// answer log-probability of held-out retrieval samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CalibrationLoss {
    /// MoE-nD's proxy: relative L2 error of the layer's attention output for the probe's
    /// queries. One capture per passage serves every expert, so it is the cheapest.
    #[default]
    Attention,
    /// End-to-end KL(full ‖ compressed) of the next-token distributions over the probe's
    /// answer positions: one forward of the probe per (layer, expert).
    Kl,
    /// End-to-end drop of the answer's teacher-forced log-probability (≥ 0): one forward of
    /// the probe per (layer, expert).
    AnswerLogp,
}

impl CalibrationLoss {
    /// Every loss, cheapest first.
    pub const ALL: [CalibrationLoss; 3] = [Self::Attention, Self::Kl, Self::AnswerLogp];

    /// The name used on the command line and in cache file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Attention => "attention",
            Self::Kl => "kl",
            Self::AnswerLogp => "answer-logp",
        }
    }
}

impl std::fmt::Display for CalibrationLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CalibrationLoss {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|l| l.name()).collect();
                format!(
                    "unknown calibration loss {s:?}; one of {}",
                    names.join(", ")
                )
            })
    }
}

/// One calibration passage: a context, compressed question-agnostically as at inference, then
/// a probe read through the compressed cache that judges it. The probe's last `answer` tokens
/// are what the answer-based losses score: a prose passage's whole continuation but its first
/// token, a retrieval passage's gold answer after its question.
#[derive(Debug, Clone, PartialEq)]
pub struct Passage {
    context: Vec<u32>,
    probe: Vec<u32>,
    answer: usize,
}

impl Passage {
    /// A passage, or [`ModelError::EmptyPrompt`] when the context is empty or the probe leaves
    /// no token before its `answer` tokens (the first answer token needs a probe row before it).
    pub fn new(context: Vec<u32>, probe: Vec<u32>, answer: usize) -> Result<Self, ModelError> {
        if context.is_empty() || answer == 0 || answer >= probe.len() {
            return Err(ModelError::EmptyPrompt);
        }
        Ok(Self {
            context,
            probe,
            answer,
        })
    }

    /// `context` tokens of prose followed by the rest of `ids` as the probe (all scored).
    pub fn prose(ids: &[u32], context: usize) -> Result<Self, ModelError> {
        if ids.len() < context + 2 {
            return Err(ModelError::PromptTooLong {
                tokens: ids.len(),
                context: context + 2,
            });
        }
        let probe = ids[context..].to_vec();
        let answer = probe.len() - 1;
        Self::new(ids[..context].to_vec(), probe, answer)
    }

    /// A retrieval sample: its context, then its question followed by the gold answer.
    pub fn retrieval(
        context: Vec<u32>,
        question: &[u32],
        answer: &[u32],
    ) -> Result<Self, ModelError> {
        let probe = [question, answer].concat();
        Self::new(context, probe, answer.len())
    }

    /// The compressed tokens.
    pub fn context(&self) -> &[u32] {
        &self.context
    }

    /// The tokens read after compression.
    pub fn probe(&self) -> &[u32] {
        &self.probe
    }

    /// How many of the probe's last tokens are scored by the answer-based losses.
    pub fn answer(&self) -> usize {
        self.answer
    }

    /// Those tokens: the probe's last [`Passage::answer`].
    pub fn answer_tokens(&self) -> &[u32] {
        &self.probe[self.probe.len() - self.answer..]
    }
}

/// Observation window (tokens) handed to scorers when calibrating and measuring end to end.
pub const OBSERVE_WINDOW: usize = 32;

/// The prefill options that observe what caches with these needs read (H2O's attention mass,
/// KVzip's reconstruction pass), the rest at their defaults. The one place the mapping lives,
/// so no caller of a prefill forgets a need.
pub fn observing(needs: router::Needs) -> PrefillOptions {
    PrefillOptions {
        attention_mass: needs.attention_mass,
        reconstruction: needs.reconstruction,
        ..PrefillOptions::default()
    }
}

/// How calibration observes and what it measures.
#[derive(Debug, Clone, Copy)]
pub struct CalibrationOptions {
    /// Observation window handed to scorers.
    pub observe_window: usize,
    /// The loss measured.
    pub loss: CalibrationLoss,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        Self {
            observe_window: OBSERVE_WINDOW,
            loss: CalibrationLoss::Attention,
        }
    }
}

/// `loss[layer][expert]`, averaged over `passages`. `progress(done, total)` is called after
/// every (passage, layer).
pub fn calibrate<B: KvBackend>(
    model: &Llama<B>,
    passages: &[Passage],
    menu: &[Expert],
    axes: &Axes<B>,
    opts: &CalibrationOptions,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<f64>>, ModelError> {
    let each = calibrate_each(model, passages, menu, axes, opts, progress)?;
    Ok(mean_over_passages(&each, model.config.layers, menu.len()))
}

/// `loss[passage][layer][expert]`: [`calibrate`] before the mean over passages, so the solver
/// can tell a gain every passage shows from one a single passage carries
/// ([`crate::credited_losses`]).
pub fn calibrate_each<B: KvBackend>(
    model: &Llama<B>,
    passages: &[Passage],
    menu: &[Expert],
    axes: &Axes<B>,
    opts: &CalibrationOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<Vec<f64>>>, ModelError> {
    let layers = model.config.layers;
    let total = passages.len() * layers;
    let mut out = Vec::with_capacity(passages.len());
    for (pi, passage) in passages.iter().enumerate() {
        let mut loss = vec![Vec::new(); layers];
        let mut add = |l: usize, errors: Vec<f64>| {
            loss[l] = errors;
            progress(pi * layers + l + 1, total);
        };
        match opts.loss {
            CalibrationLoss::Attention => {
                attention_losses(model, passage, menu, axes, opts, &mut add)?
            }
            end_to_end => {
                let e2e = crate::measured::EndToEnd::new(
                    model,
                    passage,
                    menu,
                    axes,
                    opts.observe_window,
                )?;
                for l in 0..layers {
                    let pairs: Vec<(usize, &Expert)> = menu.iter().map(|e| (l, e)).collect();
                    add(l, e2e.measure(&pairs, end_to_end, |_, _| {})?);
                }
            }
        }
        out.push(loss);
    }
    Ok(out)
}

/// The mean over passages of `each[passage][layer][expert]` (zeros when there is no passage).
pub fn mean_over_passages(each: &[Vec<Vec<f64>>], layers: usize, experts: usize) -> Vec<Vec<f64>> {
    let mut loss = vec![vec![0f64; experts]; layers];
    let share = 1.0 / each.len().max(1) as f64;
    for passage in each {
        for (row, errors) in loss.iter_mut().zip(passage) {
            for (acc, e) in row.iter_mut().zip(errors) {
                *acc += e * share;
            }
        }
    }
    loss
}

/// The attention-output loss of every (layer, expert) on one passage, handed to `add` layer by
/// layer.
fn attention_losses<B: KvBackend>(
    model: &Llama<B>,
    passage: &Passage,
    menu: &[Expert],
    axes: &Axes<B>,
    opts: &CalibrationOptions,
    add: &mut dyn FnMut(usize, Vec<f64>),
) -> Result<(), ModelError> {
    let needs = router::Needs::of(menu);
    let (c, f) = (passage.context.len(), passage.probe.len());
    let all_ids = [passage.context.as_slice(), &passage.probe].concat();
    // The context alone (what the experts compress) and the context with its probe (the
    // reference), captured on two cores.
    let (ctx, all) = rayon::join(
        || {
            capture(
                model,
                &passage.context,
                PrefillOptions {
                    observe_window: opts.observe_window,
                    ..observing(needs)
                },
            )
        },
        || {
            capture(
                model,
                &all_ids,
                PrefillOptions {
                    observe_window: f,
                    ..Default::default()
                },
            )
        },
    );
    let (ctx, all) = (ctx?, all?);
    for l in 0..model.config.layers {
        let err = |e: kv_tensor::KvError| ModelError::Cache {
            layer: l,
            source: e,
        };
        let obs = ctx[l]
            .observed()
            .cloned()
            .unwrap_or_else(|| kv_tensor::ObservationCtx::bare(l));
        let (k, v) = ctx[l].keys_values().map_err(err)?;
        let (ka, va) = all[l].keys_values().map_err(err)?;
        let q = all[l]
            .observed()
            .and_then(|o| o.window_queries.clone())
            .ok_or(ModelError::EmptyPrompt)?;
        let kf = ka.clone().slice_dim(2, c..c + f);
        let vf = va.clone().slice_dim(2, c..c + f);
        let reference = attention(q.clone(), ka, va).map_err(err)?;
        // The experts of a layer are independent: measured on every core (each owns its
        // cache; the captured tensors are shared read-only).
        let errors: Vec<f64> = menu
            .par_iter()
            .map(|expert| {
                let mut cache = axes.cache(expert.clone());
                cache
                    .append(k.clone(), v.clone())
                    .map_err(|source| ModelError::Compress { layer: l, source })?;
                cache
                    .finish_prefill(&obs)
                    .map_err(|source| ModelError::Compress { layer: l, source })?;
                let (kc, vc) = cache.keys_values().map_err(err)?;
                let out = attention(
                    q.clone(),
                    Tensor::cat(vec![kc, kf.clone()], 2),
                    Tensor::cat(vec![vc, vf.clone()], 2),
                )
                .map_err(err)?;
                Ok(relative_error(out, reference.clone()))
            })
            .collect::<Result<_, ModelError>>()?;
        add(l, errors);
    }
    Ok(())
}

/// Queries per passage whose pre-RoPE values feed the trig statistics.
pub const TRIG_WINDOW: usize = 256;

/// Fits the calibrated axes on `passages` in one capture pass each: every layer's per-head PCA
/// bases of post-RoPE keys and of values (low-rank axis), and the pre-RoPE query centres of the
/// last [`TRIG_WINDOW`] tokens (trig scorer). Both record `model_sha256`.
pub fn fit_axes<B: KvBackend>(
    model: &Llama<B>,
    passages: &[Vec<u32>],
    model_sha256: &str,
    mut progress: impl FnMut(usize, usize),
) -> Result<(TrigStats, PcaBases), ModelError> {
    let c = &model.config;
    let pairing = match c.rope_layout {
        RopeLayout::Interleaved => RopePairing::Interleaved,
        RopeLayout::Halves => RopePairing::Halves,
    };
    let mut trig = TrigAccumulator::new(c.layers, c.q_heads, c.head_dim, pairing);
    let mut pca = PcaAccumulator::new(c.layers, c.kv_heads, c.head_dim);
    let bad = |layer: usize, e: String| ModelError::Compress {
        layer,
        source: kv_tensor::AxisError::Method {
            method: "calibration",
            source: e.into(),
        },
    };
    // Passages are captured one per core; their statistics are accumulated in order.
    let mut done = 0;
    for chunk in passages.chunks(rayon::current_num_threads().max(1)) {
        let captured: Vec<Vec<RecordingCache<B>>> = chunk
            .par_iter()
            .map(|ids| {
                capture(
                    model,
                    ids,
                    PrefillOptions {
                        observe_window: TRIG_WINDOW.min(ids.len()),
                        pre_rope: true,
                        ..Default::default()
                    },
                )
            })
            .collect::<Result<_, _>>()?;
        for caches in captured {
            accumulate(&caches, &mut pca, &mut trig, bad)?;
            done += 1;
            progress(done, passages.len());
        }
    }
    let trig = trig
        .finish(model_sha256, c.rope_theta, c.kv_heads)
        .map_err(|e| bad(0, e.to_string()))?;
    Ok((trig, pca.finish(model_sha256)))
}

/// Adds one captured passage to the PCA and trig accumulators.
fn accumulate<B: KvBackend>(
    caches: &[RecordingCache<B>],
    pca: &mut PcaAccumulator,
    trig: &mut TrigAccumulator,
    bad: impl Fn(usize, String) -> ModelError,
) -> Result<(), ModelError> {
    for (l, cache) in caches.iter().enumerate() {
        let (k, v) = cache
            .keys_values()
            .map_err(|source| ModelError::Cache { layer: l, source })?;
        pca.add(l, &k, &v).map_err(|e| bad(l, e.to_string()))?;
        let q = cache
            .observed()
            .and_then(|o| o.pre_rope_queries.clone())
            .ok_or_else(|| bad(l, "the model gave no pre-RoPE queries".into()))?;
        trig.add(l, &q).map_err(|e| bad(l, e.to_string()))?;
    }
    Ok(())
}

pub(crate) fn capture<B: KvBackend>(
    model: &Llama<B>,
    ids: &[u32],
    opts: PrefillOptions,
) -> Result<Vec<RecordingCache<B>>, ModelError> {
    let mut caches: Vec<RecordingCache<B>> = (0..model.config.layers)
        .map(|_| RecordingCache::new())
        .collect();
    model.prefill(ids, &mut caches, &opts)?;
    Ok(caches)
}

/// `‖a − b‖ / ‖b‖` (Frobenius).
pub fn relative_error<B: KvBackend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    let num: f64 = (a - b.clone())
        .square()
        .sum()
        .into_data()
        .iter::<f64>()
        .next()
        .unwrap_or(f64::NAN);
    let den: f64 = b
        .square()
        .sum()
        .into_data()
        .iter::<f64>()
        .next()
        .unwrap_or(f64::NAN);
    (num / den).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn losses_round_trip_through_their_names() {
        for l in CalibrationLoss::ALL {
            assert_eq!(l.name().parse::<CalibrationLoss>(), Ok(l));
            let json = serde_json::to_string(&l).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", l.name()));
            assert_eq!(serde_json::from_str::<CalibrationLoss>(&json).ok(), Some(l));
        }
        assert!("kl-divergence".parse::<CalibrationLoss>().is_err());
    }

    proptest! {
        /// A passage exists exactly when its context is not empty and its probe has a token
        /// before its answer; a prose passage scores all its continuation but the first token.
        #[test]
        fn passages_are_validated_once(c in 0usize..4, p in 0usize..6, a in 0usize..7) {
            let made = Passage::new(vec![1; c], vec![2; p], a);
            prop_assert_eq!(made.is_ok(), c > 0 && a > 0 && a < p);
            if let Ok(ps) = Passage::prose(&vec![3; c + p], c) {
                prop_assert!(c > 0 && p >= 2);
                prop_assert_eq!(ps.answer(), p - 1);
                prop_assert_eq!(ps.context().len() + ps.probe().len(), c + p);
            } else {
                prop_assert!(c == 0 || p < 2);
            }
            if let Ok(r) = Passage::retrieval(vec![1; c], &vec![4; p], &vec![5; a]) {
                prop_assert_eq!(r.answer(), a);
                prop_assert_eq!(&r.probe()[p..], &vec![5; a][..]);
            }
        }
    }
}

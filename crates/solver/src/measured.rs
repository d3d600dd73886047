//! The expensive, end-to-end losses: what the model's output loses with only one layer
//! compressed. They validate the cheap proxy ([`crate::calibrate`]) by rank correlation, and
//! calibration can measure them instead of it ([`crate::CalibrationLoss`]).
//!
//! One full prefill of a passage's context is recorded and shared; for each (layer, expert)
//! the layer's cache compresses that prefill (the other layers keep it whole) and the model
//! reads the passage's probe through the caches. The loss is taken over the probe's answer
//! positions: KL(full ‖ compressed) of the next-token distributions, or the drop of the
//! answer's teacher-forced log-probability.
use crate::LossPredictor;
use crate::calibrate::{CalibrationLoss, Passage};
use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;
use kv_tensor::KvBackend;
use kv_tensor::{FullCache, LayerCache, RecordingCache};
use models::{Llama, Logits, ModelError, PrefillOptions};
use rayon::prelude::*;
use router::{Axes, Expert};
use std::sync::Mutex;

/// Measured end-to-end losses for a set of (layer, expert) pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasuredLoss {
    /// `(layer, expert, loss)`.
    pub entries: Vec<(usize, Expert, f64)>,
}

impl LossPredictor for MeasuredLoss {
    fn loss(&self, layer: usize, expert: &Expert) -> Option<f64> {
        self.entries
            .iter()
            .find(|(l, e, _)| *l == layer && e == expert)
            .map(|(_, _, loss)| *loss)
    }
}

impl MeasuredLoss {
    /// Measures every pair with `loss` (an end-to-end one: [`CalibrationLoss::Attention`] is
    /// refused), averaged over `passages`. `progress(done, total)` after each pair.
    pub fn measure<B: KvBackend>(
        model: &Llama<B>,
        passages: &[Passage],
        pairs: &[(usize, Expert)],
        axes: &Axes<B>,
        loss: CalibrationLoss,
        mut progress: impl FnMut(usize, usize) + Send,
    ) -> Result<Self, ModelError> {
        let refs: Vec<(usize, &Expert)> = pairs.iter().map(|(l, e)| (*l, e)).collect();
        let mut sum = vec![0f64; pairs.len()];
        let total = pairs.len() * passages.len();
        for (pi, passage) in passages.iter().enumerate() {
            let e2e = EndToEnd::new(
                model,
                passage,
                refs.iter().map(|p| p.1),
                axes,
                crate::calibrate::OBSERVE_WINDOW,
            )?;
            let got = e2e.measure(&refs, loss, |done, _| {
                progress(pi * pairs.len() + done, total)
            })?;
            for (s, g) in sum.iter_mut().zip(got) {
                *s += g / passages.len() as f64;
            }
        }
        let entries = pairs
            .iter()
            .zip(sum)
            .map(|((l, e), s)| (*l, e.clone(), s))
            .collect();
        Ok(Self { entries })
    }
}

/// One passage prefilled once, its uncompressed caches and its reference answer: what every
/// (layer, expert) of an end-to-end loss is compared with.
pub struct EndToEnd<'a, B: KvBackend> {
    prefilled: Prefilled<'a, B>,
    reference: Tensor<B, 2>,
    reference_logp: f64,
}

/// Both end-to-end losses of one (layer, expert): one forward gives them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndToEndLoss {
    /// Mean KL(full ‖ compressed) over the answer's positions.
    pub kl: f64,
    /// Drop of the answer's mean teacher-forced log-probability (full minus compressed; a
    /// compression that happens to help gives a negative drop).
    pub answer_logp_drop: f64,
}

impl EndToEndLoss {
    /// The value of `loss`, or `None` for the attention-output loss.
    pub fn get(&self, loss: CalibrationLoss) -> Option<f64> {
        match loss {
            CalibrationLoss::Attention => None,
            CalibrationLoss::Kl => Some(self.kl),
            // A loss the solver adds over layers: gains count as no loss.
            CalibrationLoss::AnswerLogp => Some(self.answer_logp_drop.max(0.0)),
        }
    }
}

/// A passage's recorded prefill and its uncompressed caches.
struct Prefilled<'a, B: KvBackend> {
    model: &'a Llama<B>,
    axes: &'a Axes<B>,
    passage: &'a Passage,
    rec: Vec<RecordingCache<B>>,
    full: Vec<FullCache<B>>,
}

impl<'a, B: KvBackend> EndToEnd<'a, B> {
    /// Prefills `passage`'s context (with an `observe_window`-token observation window and the
    /// statistics `experts` need) and reads its probe through the full cache.
    pub fn new<'e>(
        model: &'a Llama<B>,
        passage: &'a Passage,
        experts: impl IntoIterator<Item = &'e Expert>,
        axes: &'a Axes<B>,
        observe_window: usize,
    ) -> Result<Self, ModelError> {
        let needs = router::Needs::of(experts);
        let layers = model.config.layers;
        let mut rec: Vec<RecordingCache<B>> = (0..layers).map(|_| RecordingCache::new()).collect();
        model.prefill(
            passage.context(),
            &mut rec,
            &PrefillOptions {
                observe_window,
                ..crate::observing(needs)
            },
        )?;
        // The uncompressed caches are built once; each pair clones them (copy-on-write) and
        // replaces its layer.
        let full: Vec<FullCache<B>> = rec
            .iter()
            .enumerate()
            .map(|(l, r)| fill(l, r, FullCache::<B>::new()))
            .collect::<Result<_, _>>()?;
        let prefilled = Prefilled {
            model,
            axes,
            passage,
            rec,
            full,
        };
        let reference = prefilled.read(None)?;
        let reference_logp = -nll(&reference, passage.answer_tokens());
        Ok(Self {
            prefilled,
            reference,
            reference_logp,
        })
    }

    /// The answer's mean teacher-forced log-probability through the uncompressed cache.
    pub fn reference_logp(&self) -> f64 {
        self.reference_logp
    }

    /// `loss` of every pair, in order ([`CalibrationLoss::Attention`] is refused: it is not
    /// end to end). `progress(done, total)` after each pair.
    pub fn measure(
        &self,
        pairs: &[(usize, &Expert)],
        loss: CalibrationLoss,
        progress: impl FnMut(usize, usize) + Send,
    ) -> Result<Vec<f64>, ModelError> {
        if loss == CalibrationLoss::Attention {
            return Err(ModelError::IncompatibleOptions(
                "the attention-output loss is not an end-to-end loss: use solver::calibrate",
            ));
        }
        Ok(self
            .both(pairs, progress)?
            .iter()
            .filter_map(|b| b.get(loss))
            .collect())
    }

    /// Both losses of every pair, in order, measured on every core. `progress(done, total)`
    /// after each pair.
    pub fn both(
        &self,
        pairs: &[(usize, &Expert)],
        progress: impl FnMut(usize, usize) + Send,
    ) -> Result<Vec<EndToEndLoss>, ModelError> {
        let progress = Mutex::new((0usize, progress));
        let p = &self.prefilled;
        pairs
            .par_iter()
            .map(|&(layer, expert)| {
                let logp = p.read(Some((layer, expert)))?;
                let value = EndToEndLoss {
                    kl: kl(&self.reference, &logp),
                    answer_logp_drop: self.reference_logp + nll(&logp, p.passage.answer_tokens()),
                };
                if let Ok(mut p) = progress.lock() {
                    p.0 += 1;
                    let done = p.0;
                    (p.1)(done, pairs.len());
                }
                Ok(value)
            })
            .collect()
    }
}

impl<B: KvBackend> Prefilled<'_, B> {
    /// Log-probabilities of the answer's rows with `routed`'s layer compressed (or none).
    fn read(&self, routed: Option<(usize, &Expert)>) -> Result<Tensor<B, 2>, ModelError> {
        let mut caches: Vec<Box<dyn LayerCache<B>>> = Vec::with_capacity(self.full.len());
        for (l, full) in self.full.iter().enumerate() {
            caches.push(match routed {
                Some((rl, e)) if rl == l => {
                    Box::new(fill(l, &self.rec[l], self.axes.cache(e.clone()))?)
                }
                _ => Box::new(full.clone()),
            });
        }
        let probe = self.passage.probe();
        let answer = self.passage.answer();
        // Row i of the probe's logits predicts probe[i + 1]: the answer's rows are the last.
        let logits = self
            .model
            .forward(&probe[..probe.len() - 1], &mut caches, Logits::All)?;
        let rows = logits.dims()[0];
        Ok(log_softmax(logits.slice_dim(0, rows - answer..rows), 1))
    }
}

/// `cache` holding the recorded prefill of layer `l`, compressed at its end as at inference.
fn fill<B: KvBackend, C: LayerCache<B>>(
    l: usize,
    rec: &RecordingCache<B>,
    mut cache: C,
) -> Result<C, ModelError> {
    let (k, v) = rec
        .keys_values()
        .map_err(|source| ModelError::Cache { layer: l, source })?;
    let compress_err = |source| ModelError::Compress { layer: l, source };
    cache.append(k, v).map_err(compress_err)?;
    let obs = rec
        .observed()
        .cloned()
        .unwrap_or_else(|| kv_tensor::ObservationCtx::bare(l));
    cache.finish_prefill(&obs).map_err(compress_err)?;
    Ok(cache)
}

/// Mean negative log-likelihood of `targets` under `logp` (one row per target).
pub fn nll<B: KvBackend>(logp: &Tensor<B, 2>, targets: &[u32]) -> f64 {
    let v: Vec<f32> = logp.clone().into_data().iter::<f32>().collect();
    let vocab = logp.dims()[1];
    targets
        .iter()
        .enumerate()
        .map(|(i, &t)| -(v[i * vocab + t as usize] as f64))
        .sum::<f64>()
        / targets.len().max(1) as f64
}

/// Mean over rows of KL(p ‖ q), both log-probabilities `[rows, vocab]`.
pub fn kl<B: KvBackend>(p: &Tensor<B, 2>, q: &Tensor<B, 2>) -> f64 {
    let rows = p.dims()[0].max(1) as f64;
    let s: f64 = (p.clone().exp() * (p.clone() - q.clone()))
        .sum()
        .into_data()
        .iter::<f64>()
        .next()
        .unwrap_or(f64::NAN);
    s / rows
}

/// Spearman rank correlation of paired samples (ties get their mean rank); `None` for fewer
/// than two pairs or a constant side.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let mean = (a.len() as f64 + 1.0) / 2.0;
    let (mut num, mut da, mut db) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        num += (x - mean) * (y - mean);
        da += (x - mean).powi(2);
        db += (y - mean).powi(2);
    }
    (da > 0.0 && db > 0.0).then(|| num / (da * db).sqrt())
}

fn ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = mean;
        }
        i = j + 1;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ties_get_mean_ranks() {
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
    }

    proptest! {
        /// Invariant under strictly increasing maps; negated by decreasing ones; within [-1, 1].
        #[test]
        fn spearman_is_a_rank_statistic(a in prop::collection::vec(-1e3f64..1e3, 3..40), b in prop::collection::vec(-1e3f64..1e3, 40)) {
            let b = &b[..a.len()];
            let mono: Vec<f64> = a.iter().map(|x| x.powi(3) + 2.0 * x).collect();
            if let Some(r) = spearman(&a, &mono) {
                prop_assert!((r - 1.0).abs() < 1e-9);
            }
            let neg: Vec<f64> = a.iter().map(|x| -x).collect();
            if let Some(r) = spearman(&a, &neg) {
                prop_assert!((r + 1.0).abs() < 1e-9);
            }
            if let Some(r) = spearman(&a, b) {
                prop_assert!((-1.0 - 1e-12..=1.0 + 1e-12).contains(&r));
                prop_assert!((spearman(b, &a).unwrap_or(f64::NAN) - r).abs() < 1e-12);
            }
        }
    }
}

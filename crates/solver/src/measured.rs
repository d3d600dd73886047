//! The expensive, exact loss: end-to-end KL of next-token distributions with only one layer
//! compressed, to validate the cheap proxy ([`crate::calibrate`]) by rank correlation.
//!
//! One full prefill of the context is recorded and shared; for each (layer, expert) the layer's
//! cache compresses that prefill (the other layers keep it whole) and the model reads a held-out
//! continuation through the caches. The loss is the mean over continuation positions of
//! KL(full ‖ compressed).
use crate::LossPredictor;
use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;
use kv_tensor::KvBackend;
use kv_tensor::{FullCache, LayerCache, RecordingCache};
use models::{Llama, Logits, ModelError, PrefillOptions};
use router::{Axes, Expert};

/// Measured end-to-end KL for a set of (layer, expert) pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasuredKl {
    /// `(layer, expert, KL)`.
    pub entries: Vec<(usize, Expert, f64)>,
}

impl LossPredictor for MeasuredKl {
    fn loss(&self, layer: usize, expert: &Expert) -> Option<f64> {
        self.entries
            .iter()
            .find(|(l, e, _)| *l == layer && e == expert)
            .map(|(_, _, kl)| *kl)
    }
}

impl MeasuredKl {
    /// Measures every pair on `context` (compressed) followed by `continuation` (read through
    /// the caches). `progress(done, total)` after each pair.
    pub fn measure<B: KvBackend>(
        model: &Llama<B>,
        context: &[u32],
        continuation: &[u32],
        pairs: &[(usize, Expert)],
        axes: &Axes<B>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let layers = model.config.layers;
        let needs = router::Needs::of(pairs.iter().map(|(_, e)| e));
        let mut rec: Vec<RecordingCache<B>> = (0..layers).map(|_| RecordingCache::new()).collect();
        model.prefill(
            context,
            &mut rec,
            &PrefillOptions {
                attention_mass: needs.attention_mass,
                reconstruction: needs.reconstruction,
                ..Default::default()
            },
        )?;
        let cache_err = |layer: usize| move |source| ModelError::Cache { layer, source };
        let compress_err = |layer: usize| move |source| ModelError::Compress { layer, source };
        // Every layer's caches built from the shared prefill; `routed` replaces one layer.
        let build =
            |routed: Option<(usize, &Expert)>| -> Result<Vec<Box<dyn LayerCache<B>>>, ModelError> {
                let mut caches: Vec<Box<dyn LayerCache<B>>> = Vec::with_capacity(layers);
                for (l, r) in rec.iter().enumerate() {
                    let mut c: Box<dyn LayerCache<B>> = match routed {
                        Some((rl, e)) if rl == l => Box::new(axes.cache(e.clone())),
                        _ => Box::new(FullCache::<B>::new()),
                    };
                    let (k, v) = r.keys_values().map_err(cache_err(l))?;
                    c.append(k, v).map_err(compress_err(l))?;
                    let obs = r
                        .observed()
                        .cloned()
                        .unwrap_or_else(|| kv_tensor::ObservationCtx::bare(l));
                    c.finish_prefill(&obs).map_err(compress_err(l))?;
                    caches.push(c);
                }
                Ok(caches)
            };
        let read = |caches: &mut Vec<Box<dyn LayerCache<B>>>| -> Result<Tensor<B, 2>, ModelError> {
            Ok(log_softmax(
                model.forward(continuation, caches, Logits::All)?,
                1,
            ))
        };
        let reference = read(&mut build(None)?)?;
        let mut entries = Vec::with_capacity(pairs.len());
        for (i, (layer, expert)) in pairs.iter().enumerate() {
            let logp = read(&mut build(Some((*layer, expert)))?)?;
            entries.push((*layer, expert.clone(), kl(&reference, &logp)));
            progress(i + 1, pairs.len());
        }
        Ok(Self { entries })
    }
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

//! Calibration: how much each layer loses under each expert of a menu.
//!
//! The signal is MoE-nD's proxy: the relative L2 error of one layer's attention output with
//! only that layer compressed. Each passage is `context + future` tokens of prose; the context
//! is compressed exactly as at inference (question-agnostic, end of prefill, with the same
//! observations), and the error is measured on the attention outputs of the `future` tokens'
//! queries — held out, so scorers are judged on queries they never saw.
use axis_evict::trig::{RopePairing, TrigAccumulator, TrigStats};
use axis_lowrank::{PcaAccumulator, PcaBases};
use burn::tensor::Tensor;
use kv_tensor::KvBackend;
use kv_tensor::{LayerCache, RecordingCache, attention};
use models::RopeLayout;
use models::{Llama, ModelError, PrefillOptions};
use rayon::prelude::*;
use router::{Axes, Expert};

/// Passage geometry.
#[derive(Debug, Clone, Copy)]
pub struct CalibrationOptions {
    /// Context tokens compressed.
    pub context: usize,
    /// Held-out tokens whose queries judge the compression.
    pub future: usize,
    /// Observation window handed to scorers.
    pub observe_window: usize,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        Self {
            context: 2048,
            future: 64,
            observe_window: 32,
        }
    }
}

/// `loss[layer][expert]`, averaged over `passages` (each at least `context + future` tokens).
/// `progress(done, total)` is called after every (passage, layer).
pub fn calibrate<B: KvBackend>(
    model: &Llama<B>,
    passages: &[Vec<u32>],
    menu: &[Expert],
    axes: &Axes<B>,
    opts: &CalibrationOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<f64>>, ModelError> {
    let layers = model.config.layers;
    let (c, f) = (opts.context, opts.future);
    let needs = router::Needs::of(menu);
    let mut loss = vec![vec![0f64; menu.len()]; layers];
    let total = passages.len() * layers;
    for (pi, ids) in passages.iter().enumerate() {
        if ids.len() < c + f {
            return Err(ModelError::PromptTooLong {
                tokens: ids.len(),
                context: c + f,
            });
        }
        // The context alone (what the experts compress) and the context with its future
        // (the reference), captured on two cores.
        let (ctx, all) = rayon::join(
            || {
                capture(
                    model,
                    &ids[..c],
                    PrefillOptions {
                        observe_window: opts.observe_window,
                        attention_mass: needs.attention_mass,
                        reconstruction: needs.reconstruction,
                        ..Default::default()
                    },
                )
            },
            || {
                capture(
                    model,
                    &ids[..c + f],
                    PrefillOptions {
                        observe_window: f,
                        ..Default::default()
                    },
                )
            },
        );
        let (ctx, all) = (ctx?, all?);
        for l in 0..layers {
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
            for (ei, e) in errors.into_iter().enumerate() {
                loss[l][ei] += e / passages.len() as f64;
            }
            progress(pi * layers + l + 1, total);
        }
    }
    Ok(loss)
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

//! What MoQAE's learned router ([`axis_quant::moqae::learned`]) is trained on, measured with
//! the frozen model: for every routed token of every layer (the first chunk is frozen at fp16
//! and left out), its keys and values (the router's input) and the share of attention the
//! held-out continuation pays it (the model term's weight, mean 1 per layer and passage).
use crate::calibrate::capture;
use axis_quant::moqae::learned::TrainingSet;
use kv_tensor::{KvBackend, LayerCache, window_attention};
use models::{Llama, ModelError, PrefillOptions};

/// `passages` each of at least `context + future` tokens; `chunk` tokens per routed chunk.
/// `progress(done, total)` after each passage.
pub fn training_set<B: KvBackend>(
    model: &Llama<B>,
    passages: &[Vec<u32>],
    context: usize,
    future: usize,
    chunk: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<TrainingSet, ModelError> {
    let mut set = TrainingSet::default();
    let routed = context / chunk.max(1) * chunk;
    for (pi, ids) in passages.iter().enumerate() {
        if ids.len() < context + future || routed <= chunk {
            return Err(ModelError::PromptTooLong {
                tokens: ids.len(),
                context: context + future,
            });
        }
        let opts = PrefillOptions {
            observe_window: future,
            ..Default::default()
        };
        let caches = capture(model, &ids[..context + future], opts)?;
        for (l, cache) in caches.iter().enumerate() {
            let err = |source| ModelError::Cache { layer: l, source };
            let (k, v) = cache.keys_values().map_err(err)?;
            let q = cache
                .observed()
                .and_then(|o| o.window_queries.clone())
                .ok_or(ModelError::EmptyPrompt)?;
            let mass = window_attention(q, k.clone()).map_err(err)?;
            let [_, h, _, d] = k.dims();
            let n = routed - chunk;
            let weight: Vec<f32> = mass
                .slice_dim(2, chunk..routed)
                .sum_dim(1)
                .reshape([n])
                .into_data()
                .iter::<f32>()
                .collect();
            let mean = weight.iter().map(|&w| w as f64).sum::<f64>() / n as f64;
            set.weight
                .extend(weight.iter().map(|&w| (w as f64 / mean.max(1e-30)) as f32));
            let tok = |x: burn::tensor::Tensor<B, 4>| {
                x.slice_dim(2, chunk..routed)
                    .swap_dims(1, 2)
                    .reshape([n, h * d])
            };
            let rows = burn::tensor::Tensor::cat(vec![tok(k), tok(v)], 1);
            set.rows.extend(rows.into_data().iter::<f32>());
            set.features = 2 * h * d;
            set.layer.extend(std::iter::repeat_n(l, n));
        }
        progress(pi + 1, passages.len());
    }
    Ok(set)
}

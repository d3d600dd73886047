//! Softmax attention with grouped KV heads and causal masking of the newest tokens.
use crate::KvError;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};

/// Queries are processed in chunks of this many tokens so that the score matrix of a long
/// prefill stays bounded (`[kv_heads, group × chunk, keys]` floats at a time).
pub const ATTENTION_QUERY_CHUNK: usize = 512;

/// Scaled dot-product attention of `q` over cached `k`, `v`.
///
/// The queries are the *last* `tq` tokens of the cached sequence: query `i` sees every cached
/// token up to and including its own (`j ≤ tk − tq + i`). This one convention covers prefill
/// (queries = the chunk just appended) and decode (`tq = 1`, no mask), and holds for compressed
/// caches because compression never touches the newest tokens.
///
/// Heads are folded into the batch dimension before the matmuls (3-D batched matmul is much
/// faster than 4-D on burn-ndarray), and query head `h` reads KV head `h / group`.
///
/// # Shapes
/// - `q`: `[b, q_heads, tq, d]`
/// - `k`, `v`: `[b, kv_heads, tk, d]`
/// - returns `[b, q_heads, tq, d]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Result<Tensor<B, 4>, KvError> {
    attention_padded(q, k, v, None)
}

/// [`attention`] over a cache whose decoded keys contain padding rows (`padding`
/// `[b, kv_heads, tk]`, true = not a token: heads of a ragged segment shorter than the longest).
/// Padding rows get zero weight. The newest `tq` rows must be real tokens.
pub fn attention_padded<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    padding: Option<Tensor<B, 3, Bool>>,
) -> Result<Tensor<B, 4>, KvError> {
    let [b, qh, tq, d] = q.dims();
    let [kb, kvh, tk, kd] = k.dims();
    if k.dims() != v.dims() || kb != b || kd != d || kvh == 0 || qh % kvh != 0 {
        return Err(KvError::Shape {
            context: "attention q/k/v",
            expected: vec![b, qh, tk, d],
            got: k.dims().to_vec(),
        });
    }
    if tk == 0 {
        return Err(KvError::Empty);
    }
    if tq > tk {
        return Err(KvError::QueriesExceedCache {
            queries: tq,
            cached: tk,
        });
    }
    if let Some(p) = &padding
        && p.dims() != [b, kvh, tk]
    {
        return Err(KvError::Shape {
            context: "attention padding mask",
            expected: vec![b, kvh, tk],
            got: p.dims().to_vec(),
        });
    }
    let g = qh / kvh;
    let padding = padding.map(|p| p.reshape([b * kvh, 1, tk]));
    let scale = 1.0 / (d as f64).sqrt();
    let device = q.device();
    let q5 = q.reshape([b * kvh, g, tq, d]);
    let k3 = k.reshape([b * kvh, tk, d]);
    let v3 = v.reshape([b * kvh, tk, d]);
    let mut outs = Vec::with_capacity(tq.div_ceil(ATTENTION_QUERY_CHUNK));
    let mut start = 0;
    while start < tq {
        let end = (start + ATTENTION_QUERY_CHUNK).min(tq);
        let c = end - start;
        // Keys visible to the last query of this chunk.
        let visible = tk - tq + end;
        let qc = q5
            .clone()
            .slice_dim(2, start..end)
            .reshape([b * kvh, g * c, d]);
        let kc = k3.clone().slice_dim(1, 0..visible);
        let vc = v3.clone().slice_dim(1, 0..visible);
        let mut scores = qc.matmul(kc.swap_dims(1, 2)).mul_scalar(scale);
        if c > 1 || visible > tk - tq + start + 1 {
            // Query i (absolute row tk − tq + start + i) may not see keys beyond itself.
            let first = (tk - tq + start) as i64;
            let rows = Tensor::<B, 1, Int>::arange(first..first + c as i64, &device)
                .reshape([c, 1])
                .expand([c, visible]);
            let cols = Tensor::<B, 1, Int>::arange(0..visible as i64, &device)
                .reshape([1, visible])
                .expand([c, visible]);
            let mask = cols
                .greater(rows)
                .reshape([1, 1, c, visible])
                .expand([b * kvh, g, c, visible])
                .reshape([b * kvh, g * c, visible]);
            scores = scores.mask_fill(mask, f32::NEG_INFINITY);
        }
        if let Some(p) = &padding {
            let mask = p
                .clone()
                .slice_dim(2, 0..visible)
                .expand([b * kvh, g * c, visible]);
            scores = scores.mask_fill(mask, f32::NEG_INFINITY);
        }
        let probs = softmax(scores, 2);
        outs.push(probs.matmul(vc).reshape([b * kvh, g, c, d]));
        start = end;
    }
    let out = if outs.len() == 1 {
        outs.remove(0)
    } else {
        Tensor::cat(outs, 2)
    };
    Ok(out.reshape([b, qh, tq, d]))
}

/// Attention that the observation-window queries pay to each cached key, averaged over the
/// window and over the query heads of each KV head: the signal of SnapKV-style scorers and of
/// MoQAE's chunk importance. The window queries are the last `w` tokens of the cache, so they
/// see keys causally.
///
/// # Shapes
/// - `window_queries`: `[b, q_heads, w, d]`
/// - `keys`: `[b, kv_heads, t, d]`
/// - returns `[b, kv_heads, t]` (each row sums to 1 over `t`)
pub fn window_attention<B: Backend>(
    window_queries: Tensor<B, 4>,
    keys: Tensor<B, 4>,
) -> Result<Tensor<B, 3>, KvError> {
    let [b, qh, w, d] = window_queries.dims();
    let [kb, kvh, t, kd] = keys.dims();
    if kb != b || kd != d || kvh == 0 || qh % kvh != 0 || w > t {
        return Err(KvError::Shape {
            context: "window attention q/k",
            expected: vec![b, qh, t, d],
            got: keys.dims().to_vec(),
        });
    }
    let g = qh / kvh;
    let device = keys.device();
    let q = window_queries.reshape([b * kvh, g * w, d]);
    let k = keys.reshape([b * kvh, t, d]);
    let scores = q
        .matmul(k.swap_dims(1, 2))
        .mul_scalar(1.0 / (d as f64).sqrt());
    // Window query i sits at row t − w + i and sees keys j ≤ t − w + i.
    let rows = Tensor::<B, 1, Int>::arange((t - w) as i64..t as i64, &device)
        .reshape([w, 1])
        .expand([w, t]);
    let cols = Tensor::<B, 1, Int>::arange(0..t as i64, &device)
        .reshape([1, t])
        .expand([w, t]);
    let mask = cols
        .greater(rows)
        .reshape([1, 1, w, t])
        .expand([b * kvh, g, w, t])
        .reshape([b * kvh, g * w, t]);
    let probs = softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 2);
    Ok(probs.mean_dim(1).reshape([b, kvh, t]))
}

//! Softmax attention with grouped KV heads and causal masking of the newest tokens.
use crate::KvBackend;
use crate::KvError;
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Tensor, TensorData};

/// Queries are processed in chunks of this many tokens so that the score matrix of a long
/// prefill stays bounded (`[kv_heads, group × chunk, keys]` floats at a time); smaller score
/// matrices stay in cache while the softmax walks them, so a prefill got faster down to about
/// this size and no faster below it.
pub const ATTENTION_QUERY_CHUNK: usize = 128;

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
pub fn attention<B: KvBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Result<Tensor<B, 4>, KvError> {
    attention_padded(q, k, v, None)
}

/// [`attention`] over a cache whose decoded keys contain padding rows (`padding`
/// `[b, kv_heads, tk]`, true = not a token: heads of a ragged segment shorter than the longest).
/// Padding rows get zero weight. The newest `tq` rows must be real tokens.
pub fn attention_padded<B: KvBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    padding: Option<Tensor<B, 3, Bool>>,
) -> Result<Tensor<B, 4>, KvError> {
    Ok(attention_inner(q, k, v, padding, None)?.0)
}

/// [`attention_padded`] that also returns the attention mass every cached key received:
/// `[b, kv_heads, tk]`, the softmax weights summed over the queries and over the query heads of
/// each KV head (H2O's statistic). It comes from the same softmax as the output, so a prefill
/// that needs it pays for one attention pass, not two.
pub fn attention_with_mass<B: KvBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    padding: Option<Tensor<B, 3, Bool>>,
) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
    let (out, mass) = attention_inner(q, k, v, padding, Some(Reduce::Sum))?;
    Ok((out, mass.ok_or(KvError::Empty)?))
}

/// Adds the mass `new` (`[b, h, stored]`, from [`attention_with_mass`]) that queries just paid
/// the rows to the mass `prev` accumulated so far. Rows appended since `prev` was recorded start
/// at 0; a `prev` longer than `new` belongs to rows that have since changed, so the sum restarts
/// from `new`. H2O's statistic, accumulated over prefill chunks and over decoding steps alike.
pub fn accumulate_mass<B: KvBackend>(
    prev: Option<Tensor<B, 3>>,
    new: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let [b, h, n] = new.dims();
    match prev {
        Some(p) if p.dims()[2] <= n => {
            let old = p.dims()[2];
            if old == n {
                return p + new;
            }
            let pad = Tensor::zeros([b, h, n - old], &p.device());
            Tensor::cat(vec![p, pad], 2) + new
        }
        _ => new,
    }
}

/// [`attention_padded`] that also returns the largest attention weight every cached key
/// received from any query and any query head of its KV head: `[b, kv_heads, tk]` (KVzip's
/// statistic over its reconstruction queries). Keys after a query's position count as weight 0
/// for it, so the newest keys' peaks come only from the queries that see them.
pub fn attention_with_peak<B: KvBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    padding: Option<Tensor<B, 3, Bool>>,
) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
    let (out, peak) = attention_inner(q, k, v, padding, Some(Reduce::Max))?;
    Ok((out, peak.ok_or(KvError::Empty)?))
}

/// How the softmax weights a key received are reduced over queries and grouped heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// Summed (H2O's attention mass).
    Sum,
    /// The largest (KVzip's peak).
    Max,
}

impl Reduce {
    /// `w` reduced along `dim` (kept as a dimension of size 1).
    pub(crate) fn along<B: KvBackend, const D: usize>(
        self,
        w: Tensor<B, D>,
        dim: usize,
    ) -> Tensor<B, D> {
        match self {
            Reduce::Sum => w.sum_dim(dim),
            Reduce::Max => w.max_dim(dim),
        }
    }

    /// `next` folded into what was reduced so far.
    pub(crate) fn fold<B: KvBackend, const D: usize>(
        self,
        acc: Option<Tensor<B, D>>,
        next: Tensor<B, D>,
    ) -> Tensor<B, D> {
        match (acc, self) {
            (None, _) => next,
            (Some(prev), Reduce::Sum) => prev + next,
            (Some(prev), Reduce::Max) => prev.max_pair(next),
        }
    }
}

/// Attention with the statistic `reduce` asks for: what [`attention_padded`],
/// [`attention_with_mass`] and [`attention_with_peak`] return.
pub(crate) fn attention_inner<B: KvBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    padding: Option<Tensor<B, 3, Bool>>,
    reduce: Option<Reduce>,
) -> Result<(Tensor<B, 4>, Option<Tensor<B, 3>>), KvError> {
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
    let mut mass: Option<Tensor<B, 2>> = None;
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
        // Only the chunk's own keys (the last c columns) can lie after a query.
        let mut scores = causal_tail(
            qc.mul_scalar(scale).matmul(kc.swap_dims(1, 2)),
            g,
            c,
            &device,
        );
        if let Some(p) = &padding {
            let mask = p
                .clone()
                .slice_dim(2, 0..visible)
                .expand([b * kvh, g * c, visible]);
            scores = scores.mask_fill(mask, f32::NEG_INFINITY);
        }
        let probs = softmax(scores, 2);
        if let Some(reduce) = reduce {
            let m = reduce.along(probs.clone(), 1).reshape([b * kvh, visible]);
            let m = if visible < tk {
                Tensor::cat(vec![m, Tensor::zeros([b * kvh, tk - visible], &device)], 1)
            } else {
                m
            };
            mass = Some(reduce.fold(mass.take(), m));
        }
        outs.push(probs.matmul(vc).reshape([b * kvh, g, c, d]));
        start = end;
    }
    let out = if outs.len() == 1 {
        outs.remove(0)
    } else {
        Tensor::cat(outs, 2)
    };
    Ok((
        out.reshape([b, qh, tq, d]),
        mass.map(|m| m.reshape([b, kvh, tk])),
    ))
}

/// Masks the causal future in the scores of the newest `c` queries: `scores` is
/// `[batch, g × c, keys]` with rows ordered (group member, query) and the queries being the last
/// `c` keys, so query `i` may not see key column `keys − c + j` for `j > i`. Only that trailing
/// `c × c` block is touched (an additive 0/−∞ bias, tiled over the group), not the whole
/// score matrix: at 4k tokens a full-width mask costs more than the matmul it guards.
fn causal_tail<B: KvBackend>(
    scores: Tensor<B, 3>,
    g: usize,
    c: usize,
    device: &B::Device,
) -> Tensor<B, 3> {
    let [bh, rows, keys] = scores.dims();
    debug_assert_eq!(rows, g * c);
    debug_assert!(c <= keys);
    if c <= 1 {
        return scores;
    }
    let mut bias = vec![0f32; g * c * c];
    for (r, row) in bias.chunks_mut(c).enumerate() {
        row[r % c + 1..].fill(f32::NEG_INFINITY);
    }
    let bias = Tensor::<B, 3>::from_data(TensorData::new(bias, [1, g * c, c]), device);
    let tail = scores.clone().slice_dim(2, keys - c..keys) + bias;
    scores.slice_assign([0..bh, 0..rows, keys - c..keys], tail)
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
pub fn window_attention<B: KvBackend>(
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
        .mul_scalar(1.0 / (d as f64).sqrt())
        .matmul(k.swap_dims(1, 2));
    // Window query i sits at row t − w + i and sees keys j ≤ t − w + i: only the last w
    // columns are ever masked.
    let probs = softmax(causal_tail(scores, g, w, &device), 2);
    Ok(probs.mean_dim(1).reshape([b, kvh, t]))
}

//! Attention over a layer one part at a time with burn tensors: the path every backend has
//! (GPUs, and host prefill chunks of many queries, where a matmul beats the row kernels).
//!
//! Each part (a segment, or the window) is decoded on its own, scored against every query
//! chunk, and folded into a running softmax per query row (flash-decoding's merge): the layer is
//! never dense as a whole, only one part at a time.
use crate::KvBackend;
use crate::{ATTENTION_QUERY_CHUNK, KvError, Reduce};
use burn::tensor::{Bool, Tensor, TensorData};

/// One decoded part: keys and values `[b, h, n, d]`, and the rows each of the `b·h` heads
/// really holds (fewer than `n` for the short heads of a ragged segment; the rest is padding).
pub(crate) struct TensorPart<B: KvBackend> {
    pub(crate) k: Tensor<B, 4>,
    pub(crate) v: Tensor<B, 4>,
    pub(crate) rows: Vec<usize>,
}

/// Running softmax of one query chunk: row maximum, sum of exponentials, unnormalised output.
type Running<B> = (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>);

/// Attention of the newest `tq` tokens' queries `q` (`[b, q_heads, tq, d]`) over `parts`
/// parts that `part(i)` decodes, oldest first. `lens[bh]` is head `bh`'s total rows; query `i`
/// sees rows `0 ..= len − tq + i`. With a reduction, also the attention mass (or peak) every
/// row received (`[b, kv_heads, Σ n]`, padding rows 0), from a second pass over the parts.
pub(crate) fn attend_parts<B: KvBackend>(
    q: Tensor<B, 4>,
    kv_heads: usize,
    lens: &[usize],
    parts: usize,
    part: &dyn Fn(usize) -> Result<TensorPart<B>, KvError>,
    reduce: Option<Reduce>,
) -> Result<(Tensor<B, 4>, Option<Tensor<B, 3>>), KvError> {
    let [b, qh, tq, d] = q.dims();
    let g = qh / kv_heads;
    let bh = b * kv_heads;
    let q5 = q
        .reshape([bh, g, tq, d])
        .mul_scalar(1.0 / (d as f64).sqrt());
    let chunks: Vec<(usize, usize)> = (0..tq)
        .step_by(ATTENTION_QUERY_CHUNK)
        .map(|s| (s, (s + ATTENTION_QUERY_CHUNK).min(tq)))
        .collect();
    let query =
        |(s, e): (usize, usize)| q5.clone().slice_dim(2, s..e).reshape([bh, g * (e - s), d]);
    let mut acc: Vec<Option<Running<B>>> = chunks.iter().map(|_| None).collect();
    let mut offsets = vec![0usize; bh];
    for i in 0..parts {
        let p = part(i)?;
        let n = p.k.dims()[2];
        if n == 0 {
            continue;
        }
        let (k3, v3) = (p.k.reshape([bh, n, d]), p.v.reshape([bh, n, d]));
        for (ci, &chunk) in chunks.iter().enumerate() {
            let scores = masked_scores(query(chunk), &k3, &p.rows, &offsets, lens, tq, chunk, g);
            let m = scores.clone().max_dim(2);
            let e = (scores - finite(m.clone())).exp();
            let next = (m, e.clone().sum_dim(2), e.matmul(v3.clone()));
            acc[ci] = Some(match acc[ci].take() {
                None => next,
                Some(prev) => merge(prev, next),
            });
        }
        for (o, r) in offsets.iter_mut().zip(&p.rows) {
            *o += r;
        }
    }
    let mut outs = Vec::with_capacity(chunks.len());
    let mut lse = Vec::with_capacity(chunks.len());
    for (a, &(s, e)) in acc.into_iter().zip(&chunks) {
        let (m, l, o) = a.ok_or(KvError::Empty)?;
        outs.push((o / l.clone()).reshape([bh, g, e - s, d]));
        lse.push(finite(m) + l.log());
    }
    let out = Tensor::cat(outs, 2).reshape([b, qh, tq, d]);
    let Some(reduce) = reduce else {
        return Ok((out, None));
    };
    let mut masses = Vec::with_capacity(parts);
    offsets.fill(0);
    for i in 0..parts {
        let p = part(i)?;
        let n = p.k.dims()[2];
        if n == 0 {
            continue;
        }
        let k3 = p.k.reshape([bh, n, d]);
        let mut mass: Option<Tensor<B, 3>> = None;
        for (ci, &chunk) in chunks.iter().enumerate() {
            let scores = masked_scores(query(chunk), &k3, &p.rows, &offsets, lens, tq, chunk, g);
            let w = reduce.along((scores - lse[ci].clone()).exp(), 1);
            mass = Some(reduce.fold(mass, w));
        }
        masses.extend(mass);
        for (o, r) in offsets.iter_mut().zip(&p.rows) {
            *o += r;
        }
    }
    let mass = Tensor::cat(masses, 2);
    let total = mass.dims()[2];
    Ok((out, Some(mass.reshape([b, kv_heads, total]))))
}

/// `x` with −∞ replaced by 0: the shift of rows that saw no key (their exponentials are 0
/// either way, and 0 keeps `−∞ − (−∞)` out of the arithmetic).
fn finite<B: KvBackend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let inf = x.clone().equal_elem(f32::NEG_INFINITY);
    x.mask_fill(inf, 0.0)
}

/// Two running softmaxes of the same rows over disjoint keys, combined exactly.
fn merge<B: KvBackend>(a: Running<B>, b: Running<B>) -> Running<B> {
    let m = a.0.clone().max_pair(b.0.clone());
    let shift = finite(m.clone());
    let wa = (a.0 - shift.clone()).exp();
    let wb = (b.0 - shift).exp();
    (m, a.1 * wa.clone() + b.1 * wb.clone(), a.2 * wa + b.2 * wb)
}

/// Scores `[bh, g·c, n]` of one query chunk against one part's keys, with −∞ where a query may
/// not look: padding rows of short heads, and keys after the query (causality).
#[allow(clippy::too_many_arguments)]
fn masked_scores<B: KvBackend>(
    qc: Tensor<B, 3>,
    k3: &Tensor<B, 3>,
    rows: &[usize],
    offsets: &[usize],
    lens: &[usize],
    tq: usize,
    (s, e): (usize, usize),
    g: usize,
) -> Tensor<B, 3> {
    let [bh, n, _] = k3.dims();
    let scores = qc.matmul(k3.clone().swap_dims(1, 2));
    let c = e - s;
    // Keys of this part query `i` sees, per head.
    let visible = |h: usize, i: usize| {
        (lens[h] - tq + i + 1)
            .saturating_sub(offsets[h])
            .min(rows[h])
    };
    if (0..bh).all(|h| visible(h, s) == n) {
        return scores;
    }
    let mut mask = vec![false; bh * g * c * n];
    for (h, per_head) in mask.chunks_exact_mut(g * c * n).enumerate() {
        for (r, row) in per_head.chunks_exact_mut(n).enumerate() {
            row[visible(h, s + r % c)..].fill(true);
        }
    }
    let mask =
        Tensor::<B, 3, Bool>::from_data(TensorData::new(mask, [bh, g * c, n]), &scores.device());
    scores.mask_fill(mask, f32::NEG_INFINITY)
}

//! Head-wise budgets (AdaKV, Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive
//! Budget Allocation", 2024): heads differ in how concentrated their attention is, so instead of
//! the same `n` tokens per KV head the layer's `n × heads` slots go to the best-scoring tokens of
//! the whole layer. AdaKV's safeguard keeps every head at least `min_share × n` tokens (plus its
//! protected sinks and window). Scores are compared across heads as they are, which is meaningful
//! for attention-based scorers (probabilities) — AdaKV's setting.
//!
//! Heads end up with different lengths. The kept tokens are stored ragged (one tensor per head,
//! [`kv_tensor::Encoded::Ragged`]), so memory really shrinks; kvpress only masks evicted entries.
use burn::tensor::{Int, Tensor, TensorData};
use kv_tensor::KvBackend;
use kv_tensor::{AxisError, Encoded, Positions, Segment};

/// Per KV head, the kept token indices (ascending) from `scores` `[1, h, t]` (protected = +∞),
/// `n` tokens per head on average, `min_share` of `n` guaranteed per head.
pub fn select<B: KvBackend>(
    scores: Tensor<B, 3>,
    n: usize,
    min_share: f64,
) -> Result<Vec<Vec<usize>>, AxisError> {
    let [b, h, t] = scores.dims();
    if b != 1 {
        return Err(AxisError::Method {
            method: "head-wise selection",
            source: format!("ragged head-wise budgets need batch 1, got {b}").into(),
        });
    }
    let s: Vec<f32> = scores
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| AxisError::Method {
            method: "head-wise selection",
            source: format!("{e:?}").into(),
        })?;
    Ok(allocate(&s, h, t, n, min_share))
}

/// The ragged segment of the `kept` rows of every head (batch 1): each head's keys, values and
/// positions gathered on their own, so heads hold different token counts.
pub fn assemble<B: KvBackend>(
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    positions: Tensor<B, 3, Int>,
    kept: Vec<Vec<usize>>,
) -> Segment<B> {
    let device = k.device();
    let b = k.dims()[0];
    let (mut ks, mut vs, mut ps) = (Vec::new(), Vec::new(), Vec::new());
    for (head, rows) in kept.into_iter().enumerate() {
        let m = rows.len();
        let rows: Vec<i32> = rows.into_iter().map(|i| i as i32).collect();
        let idx = Tensor::<B, 3, Int>::from_data(TensorData::new(rows, [b, 1, m]), &device);
        let kh = k.clone().slice_dim(1, head..head + 1);
        let vh = v.clone().slice_dim(1, head..head + 1);
        let (kh, vh) = crate::select::gather(kh, vh, idx.clone());
        ks.push(Encoded::Dense(kh));
        vs.push(Encoded::Dense(vh));
        ps.push(
            positions
                .clone()
                .slice_dim(1, head..head + 1)
                .gather(2, idx),
        );
    }
    Segment {
        positions: Positions::Ragged(ps),
        k: Encoded::Ragged(ks),
        v: Encoded::Ragged(vs),
    }
}

/// The allocation on host scores `[h × t]`; see [`select`].
pub fn allocate(scores: &[f32], h: usize, t: usize, n: usize, min_share: f64) -> Vec<Vec<usize>> {
    let n = n.min(t);
    let floor = ((min_share * n as f64).ceil() as usize).min(n);
    let mut kept: Vec<Vec<usize>> = Vec::with_capacity(h);
    let mut rest: Vec<(f32, usize, usize)> = Vec::new();
    for head in 0..h {
        let row = &scores[head * t..][..t];
        let mut idx: Vec<usize> = (0..t).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let protected = row.iter().filter(|x| **x == f32::INFINITY).count();
        let reserve = floor.max(protected.min(n));
        kept.push(idx[..reserve].to_vec());
        rest.extend(idx[reserve..].iter().map(|&i| (row[i], head, i)));
    }
    let reserved: usize = kept.iter().map(Vec::len).sum();
    let left = (n * h).saturating_sub(reserved);
    rest.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    for &(_, head, i) in rest.iter().take(left) {
        kept[head].push(i);
    }
    for k in &mut kept {
        k.sort_unstable();
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_moves_to_the_peaked_head() {
        // Head 0 has three strong tokens, head 1 one weak one.
        let scores = [9.0, 8.0, 7.0, 0.1, 0.2, 0.1, 0.1, 0.1];
        let kept = allocate(&scores, 2, 4, 2, 0.0);
        assert_eq!(kept, vec![vec![0, 1, 2], vec![0]]);
        // The safeguard: every head keeps its even share.
        let kept = allocate(&scores, 2, 4, 2, 1.0);
        assert_eq!(kept, vec![vec![0, 1], vec![0, 1]]);
    }

    #[test]
    fn protected_tokens_are_reserved() {
        let inf = f32::INFINITY;
        let scores = [9.0, 8.0, 7.0, 6.0, 0.0, 0.0, 0.0, inf];
        let kept = allocate(&scores, 2, 4, 2, 0.0);
        assert_eq!(kept, vec![vec![0, 1, 2], vec![3]]);
    }
}

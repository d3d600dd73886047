//! Span selection (ChunkKV, Liu et al., arXiv 2502.00299, as kvpress's `ChunkKVPress`): tokens
//! are scored as usual, the sequence is cut into chunks of `size` consecutive tokens, each
//! chunk is ranked by its mean score summed over KV heads, and whole chunks are kept, the same
//! for every head. A value spread over several tokens (a 7-digit number tokenised digit by
//! digit) then survives whole or not at all, instead of keeping a few scattered digits.
//!
//! Protected tokens (sinks, recent window: infinite scores) are kept first. To keep exactly `n`
//! tokens per head, as every selection does (the footprint is exact), the last chunk that does
//! not fit whole contributes its best tokens.
use burn::tensor::{Int, Tensor, TensorData};
use kv_tensor::{AxisError, KvBackend};

/// Indices `[b, h, n]` (ascending, equal across heads) chosen from `scores` `[b, h, t]`
/// (protected = +∞) in chunks of `size` tokens.
pub fn select<B: KvBackend>(
    scores: Tensor<B, 3>,
    n: usize,
    size: usize,
) -> Result<Tensor<B, 3, Int>, AxisError> {
    let [b, h, t] = scores.dims();
    let device = scores.device();
    let s: Vec<f32> = scores
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| AxisError::Method {
            method: "chunks",
            source: format!("{e:?}").into(),
        })?;
    let n = n.min(t);
    let mut out = Vec::with_capacity(b * h * n);
    for batch in 0..b {
        let rows = &s[batch * h * t..][..h * t];
        let summed: Vec<f32> = (0..t)
            .map(|i| (0..h).map(|head| rows[head * t + i]).sum())
            .collect();
        let kept = pick(&summed, n, size.max(1));
        for _ in 0..h {
            out.extend(kept.iter().map(|&i| i as i32));
        }
    }
    Ok(Tensor::from_data(TensorData::new(out, [b, h, n]), &device))
}

/// The `n` positions kept from head-summed `scores` (protected = +∞), ascending.
pub fn pick(scores: &[f32], n: usize, size: usize) -> Vec<usize> {
    let t = scores.len();
    let mut kept: Vec<usize> = (0..t)
        .filter(|&i| scores[i] == f32::INFINITY)
        .take(n)
        .collect();
    // Chunks by the mean score of their unprotected tokens, best first (earlier on ties).
    let mut chunks: Vec<(usize, f32)> = (0..t.div_ceil(size))
        .filter_map(|c| {
            let free: Vec<f32> = (c * size..((c + 1) * size).min(t))
                .map(|i| scores[i])
                .filter(|x| x.is_finite())
                .collect();
            (!free.is_empty()).then(|| (c, free.iter().sum::<f32>() / free.len() as f32))
        })
        .collect();
    chunks.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    for (c, _) in chunks {
        let room = n - kept.len();
        if room == 0 {
            break;
        }
        let mut free: Vec<usize> = (c * size..((c + 1) * size).min(t))
            .filter(|&i| scores[i].is_finite())
            .collect();
        if free.len() > room {
            free.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            free.truncate(room);
        }
        kept.extend(free);
    }
    kept.sort_unstable();
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn whole_chunks_by_mean_score() {
        // Chunks of 3: [0,1,2] mean 1, [3,4,5] mean 5, [6,7,8] mean 2, [9] protected.
        let s = [1.0, 1.0, 1.0, 9.0, 3.0, 3.0, 0.0, 0.0, 6.0, f32::INFINITY];
        assert_eq!(pick(&s, 4, 3), vec![3, 4, 5, 9]);
        // One more token: the next chunk by mean ([6,7,8]) gives its best token.
        assert_eq!(pick(&s, 5, 3), vec![3, 4, 5, 8, 9]);
        // A single high token does not pull its chunk ahead of a higher mean.
        assert_eq!(pick(&s, 7, 3), vec![3, 4, 5, 6, 7, 8, 9]);
    }

    proptest! {
        /// Exactly `min(n, t)` distinct ascending positions, every protected token first, and at
        /// most one chunk cut: every other chunk is kept whole or not at all.
        #[test]
        fn exact_count_protected_first_one_partial_chunk(
            scores in prop::collection::vec(prop_oneof![9 => -5.0f32..5.0, 1 => Just(f32::INFINITY)], 1..120),
            n in 0usize..130,
            size in 1usize..12,
        ) {
            let kept = pick(&scores, n, size);
            let t = scores.len();
            prop_assert_eq!(kept.len(), n.min(t));
            prop_assert!(kept.windows(2).all(|w| w[0] < w[1]));
            let protected = scores.iter().filter(|x| x.is_infinite()).count();
            let kept_protected = kept.iter().filter(|&&i| scores[i].is_infinite()).count();
            prop_assert_eq!(kept_protected, protected.min(n.min(t)));
            let partial = (0..t.div_ceil(size))
                .filter(|c| {
                    let free: Vec<usize> = (c * size..((c + 1) * size).min(t))
                        .filter(|&i| scores[i].is_finite())
                        .collect();
                    let held = free.iter().filter(|i| kept.contains(i)).count();
                    held > 0 && held < free.len()
                })
                .count();
            prop_assert!(partial <= 1, "{partial} chunks cut");
        }
    }
}

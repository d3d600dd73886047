//! Redundancy-aware greedy selection (facility-location style, as in redundancy-aware KV
//! retention): scores alone keep near-duplicate tokens together, wasting budget on information
//! the cache already holds. Each next pick maximises
//! `score′ − λ · max(0, max cos(v, v_kept))`, where `score′` is the head's score min-max
//! normalised to [0, 1] (so λ has the same meaning for every scorer) and the similarity is
//! measured between value vectors, what attention actually returns. Dissimilar tokens are not
//! rewarded (the similarity is clamped at 0). Protected tokens (infinite scores) are kept first.
//! With λ = 0 this is exactly top-k.
use burn::tensor::{Int, Tensor, TensorData};
use kv_tensor::AxisError;
use kv_tensor::KvBackend;

/// Indices `[b, h, n]` (ascending) chosen from `scores` `[b, h, t]` (protected = +∞) with
/// values `v` `[b, h, t, d]`.
pub fn select<B: KvBackend>(
    scores: Tensor<B, 3>,
    v: &Tensor<B, 4>,
    n: usize,
    lambda: f64,
) -> Result<Tensor<B, 3, Int>, AxisError> {
    let [b, h, t] = scores.dims();
    let d = v.dims()[3];
    let device = scores.device();
    let s = host(scores, "redundancy selection")?;
    let vals = host(v.clone(), "redundancy selection")?;
    let n = n.min(t);
    let mut out = Vec::with_capacity(b * h * n);
    let mut unit = vec![0f32; t * d];
    for row in 0..b * h {
        let sc = &s[row * t..][..t];
        let vr = &vals[row * t * d..][..t * d];
        for (u, x) in unit.chunks_mut(d).zip(vr.chunks(d)) {
            let norm = x.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
            for (o, a) in u.iter_mut().zip(x) {
                *o = a / norm;
            }
        }
        out.extend(
            greedy(sc, &unit, d, n, lambda)
                .into_iter()
                .map(|i| i as i32),
        );
    }
    Ok(Tensor::from_data(TensorData::new(out, [b, h, n]), &device))
}

/// The greedy picks of one head, ascending.
pub fn greedy(scores: &[f32], unit_values: &[f32], d: usize, n: usize, lambda: f64) -> Vec<usize> {
    let t = scores.len();
    let norm = normalised(scores);
    let mut picked = vec![false; t];
    let mut maxsim = vec![0f64; t];
    let mut order = Vec::with_capacity(n);
    let pick = |j: usize, picked: &mut [bool], maxsim: &mut [f64]| {
        picked[j] = true;
        let vj = &unit_values[j * d..][..d];
        for i in 0..t {
            if !picked[i] {
                let vi = &unit_values[i * d..][..d];
                let sim: f32 = vi.iter().zip(vj).map(|(a, b)| a * b).sum();
                maxsim[i] = maxsim[i].max(sim as f64);
            }
        }
    };
    // Protected tokens first, in position order.
    for j in (0..t).filter(|&j| norm[j] == f64::INFINITY).take(n) {
        pick(j, &mut picked, &mut maxsim);
        order.push(j);
    }
    while order.len() < n {
        let mut best = None;
        let mut best_gain = f64::NEG_INFINITY;
        for i in (0..t).filter(|&i| !picked[i]) {
            let gain = norm[i] - lambda * maxsim[i];
            if best.is_none() || gain > best_gain {
                best = Some(i);
                best_gain = gain;
            }
        }
        let Some(j) = best else { break };
        pick(j, &mut picked, &mut maxsim);
        order.push(j);
    }
    order.sort_unstable();
    order
}

/// Scores min-max normalised over the finite ones (so λ means the same for every scorer);
/// ±∞ (protected, excluded) stay. Shared with [`crate::facility`].
pub(crate) fn normalised(scores: &[f32]) -> Vec<f64> {
    let finite = scores.iter().copied().filter(|x| x.is_finite());
    let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    let span = if hi > lo { (hi - lo) as f64 } else { 1.0 };
    scores
        .iter()
        .map(|&x| {
            if x.is_finite() {
                (x - lo) as f64 / span
            } else if x > 0.0 {
                f64::INFINITY
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect()
}

/// A tensor's values on the host as f32, a failure named after `method`.
pub(crate) fn host<B: KvBackend, const D: usize>(
    x: Tensor<B, D>,
    method: &'static str,
) -> Result<Vec<f32>, AxisError> {
    x.into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| AxisError::Method {
            method,
            source: format!("{e:?}").into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_skipped_when_lambda_is_large() {
        // Tokens 0 and 1 are identical and score highest; token 2 is orthogonal and scores less.
        let v = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.7, 0.7];
        let scores = [1.0, 0.99, 0.5, 0.0];
        assert_eq!(greedy(&scores, &v, 2, 2, 0.0), vec![0, 1]);
        assert_eq!(greedy(&scores, &v, 2, 2, 1.0), vec![0, 2]);
    }

    #[test]
    fn protected_tokens_come_first() {
        let v = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        let scores = [0.0, f32::INFINITY, 5.0];
        assert_eq!(greedy(&scores, &v, 2, 1, 10.0), vec![1]);
        assert_eq!(greedy(&scores, &v, 2, 2, 10.0), vec![1, 2]);
    }
}

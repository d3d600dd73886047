//! Facility-location retention (α, arXiv 2605.14292, on TriAttention's scores): instead of the
//! `n` best scores, keep the set `S` that maximises
//!
//! `F(S) = Σ_{j∈S} ŝ_j + λ · Σ_i ŝ_i · max_{j∈S} sim⁺(v_i, v_j)`
//!
//! where `ŝ` is the head's score min-max normalised to [0, 1] (so λ means the same for every
//! scorer) and `sim⁺` the cosine similarity of value vectors clamped at 0 — what attention
//! returns. The second term is a facility-location coverage: every token is represented by its
//! most similar kept token, weighted by its importance. A near-duplicate of a kept token covers
//! nothing new, so it earns only its own score: that is the V-space redundancy penalty, and
//! λ = 0 is top-k. `F` is monotone submodular, so the greedy choice is within `1 − 1/e` of the
//! best set, and a token's marginal gain only falls as `S` grows, which makes the lazy greedy
//! exact: a token whose stale gain is below the best fresh one is never re-evaluated.
//! Protected tokens (infinite scores) are kept first. The selection reads only the segment it
//! compresses, so it runs at the end of prefill and again on each decoding re-eviction.
use crate::redundancy::{host, normalised};
use burn::tensor::{Int, Tensor, TensorData};
use kv_tensor::{AxisError, KvBackend};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

const METHOD: &str = "facility-location selection";

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
    let n = n.min(t);
    // Cosine similarities of every pair of values, per head, by one batched matmul.
    let unit = v.clone().reshape([b * h, t, d]);
    let norm = unit.clone().square().sum_dim(2).sqrt().clamp_min(1e-12);
    let unit = unit / norm;
    let sims = host(unit.clone().matmul(unit.swap_dims(1, 2)), METHOD)?;
    let s = host(scores, METHOD)?;
    let mut out = Vec::with_capacity(b * h * n);
    for row in 0..b * h {
        let picks = greedy(&s[row * t..][..t], &sims[row * t * t..][..t * t], n, lambda);
        out.extend(picks.into_iter().map(|i| i as i32));
    }
    Ok(Tensor::from_data(TensorData::new(out, [b, h, n]), &device))
}

/// A candidate's gain as of `round` picks (the lazy greedy's upper bound).
#[derive(PartialEq)]
struct Stale {
    gain: f64,
    index: usize,
    round: usize,
}

impl Eq for Stale {}

impl PartialOrd for Stale {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Stale {
    /// Larger gain first; ties to the earlier token.
    fn cmp(&self, other: &Self) -> Ordering {
        self.gain
            .total_cmp(&other.gain)
            .then(other.index.cmp(&self.index))
    }
}

/// The lazy-greedy picks of one head, ascending: `scores` `[t]`, `sims` `[t × t]` row-major.
pub fn greedy(scores: &[f32], sims: &[f32], n: usize, lambda: f64) -> Vec<usize> {
    let t = scores.len();
    let norm = normalised(scores);
    let finite: Vec<f64> = norm
        .iter()
        .map(|x| if x.is_finite() { *x } else { 1.0 })
        .collect();
    let mut cover = vec![0f64; t];
    let mut picked = vec![false; t];
    let mut order = Vec::with_capacity(n);
    let gain = |j: usize, cover: &[f64]| {
        let col = &sims[j * t..][..t];
        let covered: f64 = (0..t)
            .map(|i| finite[i] * (col[i].max(0.0) as f64 - cover[i]).max(0.0))
            .sum();
        finite[j] + lambda * covered
    };
    let take = |j: usize, cover: &mut [f64], picked: &mut [bool], order: &mut Vec<usize>| {
        picked[j] = true;
        order.push(j);
        for (i, c) in cover.iter_mut().enumerate() {
            *c = c.max(sims[j * t + i].max(0.0) as f64);
        }
    };
    for j in (0..t).filter(|&j| norm[j] == f64::INFINITY).take(n) {
        take(j, &mut cover, &mut picked, &mut order);
    }
    let mut heap: BinaryHeap<Stale> = (0..t)
        .filter(|&j| !picked[j] && norm[j] != f64::NEG_INFINITY)
        .map(|index| Stale {
            gain: gain(index, &cover),
            index,
            round: order.len(),
        })
        .collect();
    while order.len() < n {
        let Some(top) = heap.pop() else { break };
        if top.round == order.len() {
            take(top.index, &mut cover, &mut picked, &mut order);
        } else {
            heap.push(Stale {
                gain: gain(top.index, &cover),
                index: top.index,
                round: order.len(),
            });
        }
    }
    order.sort_unstable();
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Similarities of unit vectors given as rows.
    fn sims(v: &[[f32; 2]]) -> Vec<f32> {
        let unit: Vec<[f32; 2]> = v
            .iter()
            .map(|x| {
                let n = (x[0] * x[0] + x[1] * x[1]).sqrt();
                [x[0] / n, x[1] / n]
            })
            .collect();
        unit.iter()
            .flat_map(|a| unit.iter().map(move |b| a[0] * b[0] + a[1] * b[1]))
            .collect()
    }

    /// The plain greedy, every gain recomputed each round: the lazy greedy must agree.
    fn eager(scores: &[f32], s: &[f32], n: usize, lambda: f64) -> Vec<usize> {
        let t = scores.len();
        let norm = normalised(scores);
        let w: Vec<f64> = norm
            .iter()
            .map(|x| if x.is_finite() { *x } else { 1.0 })
            .collect();
        let f = |set: &[usize]| {
            let own: f64 = set.iter().map(|&j| w[j]).sum();
            let cov: f64 = (0..t)
                .map(|i| {
                    w[i] * set
                        .iter()
                        .map(|&j| s[j * t + i].max(0.0) as f64)
                        .fold(0.0, f64::max)
                })
                .sum();
            own + lambda * cov
        };
        let mut set: Vec<usize> = (0..t).filter(|&j| norm[j] == f64::INFINITY).collect();
        while set.len() < n {
            let base = f(&set);
            let best = (0..t)
                .filter(|j| !set.contains(j))
                .map(|j| {
                    let mut s2 = set.clone();
                    s2.push(j);
                    (j, f(&s2) - base)
                })
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
            match best {
                Some((j, _)) => set.push(j),
                None => break,
            }
        }
        set.sort_unstable();
        set
    }

    #[test]
    fn lambda_zero_is_top_k_and_coverage_skips_duplicates() {
        // Tokens 0 and 1 share a direction and score highest; 2 points elsewhere.
        let v = [[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.7, 0.7]];
        let scores = [1.0, 0.95, 0.6, 0.0];
        let s = sims(&v);
        assert_eq!(greedy(&scores, &s, 2, 0.0), vec![0, 1]);
        assert_eq!(greedy(&scores, &s, 2, 0.8), vec![0, 2]);
    }

    #[test]
    fn protected_tokens_come_first() {
        let v = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]];
        let scores = [0.0, f32::INFINITY, 5.0];
        assert_eq!(greedy(&scores, &sims(&v), 1, 0.5), vec![1]);
        assert_eq!(greedy(&scores, &sims(&v), 2, 0.5), vec![1, 2]);
    }

    proptest::proptest! {
        /// The lazy greedy picks exactly what the eager greedy picks.
        #[test]
        fn lazy_greedy_equals_eager_greedy(
            pts in proptest::collection::vec((-1.0f32..1.0, -1.0f32..1.0, 0.0f32..1.0), 2..14),
            lambda in 0.0f64..2.0,
            n in 1usize..8,
        ) {
            let v: Vec<[f32; 2]> = pts.iter().map(|p| [p.0 + 1e-3, p.1]).collect();
            let scores: Vec<f32> = pts.iter().map(|p| p.2).collect();
            let s = sims(&v);
            let n = n.min(v.len());
            proptest::prop_assert_eq!(greedy(&scores, &s, n, lambda), eager(&scores, &s, n, lambda));
        }
    }
}

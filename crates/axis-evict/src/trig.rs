//! TriAttention (Mao et al., "TriAttention: Efficient Long Reasoning with Trigonometric KV
//! Compression", 2026), the scorer MoE-nD uses.
//!
//! Pre-RoPE queries of a head are concentrated around a fixed centre q̄ that does not move with
//! position. Write each RoPE pair `f` (frequency ω_f) of a vector as a complex number; a key
//! cached after RoPE is `k_f`, a future query at position `p` is `q̄_f e^{iω_f p}`, and its logit
//! is `Σ_f Re(q̄_f e^{iω_f p} conj(k_f))`. Averaged over the next `horizon` query positions this
//! is a trigonometric series in the distance between key and queries, weighted by the centre's
//! magnitudes and phases — the head's distance preference — and it collapses to one dot product
//! `w · k` with `w_f = q̄_f · mean_p e^{iω_f p}`. What concentration does not explain
//! (`E|q_f| − |q̄_f|`, the spread of queries around the centre) is added as a key-norm term
//! `Σ_f (E|q_f| − |q̄_f|) |k_f|`. Query heads sharing a KV head are averaged.
//!
//! Because keys are scored after RoPE, no key positions are needed: the rotation is already in
//! `k_f`. The statistics come from calibration ([`TrigAccumulator`]), are saved as JSON with the
//! model's sha256 and validated on load ([`TrigStats::from_json`]).
use burn::tensor::{Tensor, TensorData};
use kv_tensor::AxisError;
use kv_tensor::KvBackend;
use serde::{Deserialize, Serialize};

/// Future query positions averaged over by default.
pub const DEFAULT_HORIZON: usize = 256;

/// How a head's dimensions pair up into RoPE rotations (the model's internal layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopePairing {
    /// Pairs `(2f, 2f + 1)` (GGUF llama tensors).
    Interleaved,
    /// Pairs `(f, f + d/2)` (HF rotate-half).
    Halves,
}

impl RopePairing {
    /// The two dimensions of pair `f` in a head of `d` dimensions.
    pub fn pair(self, f: usize, d: usize) -> (usize, usize) {
        match self {
            RopePairing::Interleaved => (2 * f, 2 * f + 1),
            RopePairing::Halves => (f, f + d / 2),
        }
    }
}

/// What can go wrong loading trig statistics.
#[derive(Debug, thiserror::Error)]
pub enum TrigError {
    /// Not valid JSON for [`TrigStats`].
    #[error("trig statistics: {0}")]
    Parse(#[from] serde_json::Error),
    /// Computed for another model file.
    #[error("trig statistics were calibrated on model sha256 {found}, not {expected}")]
    ModelMismatch {
        /// The model in use.
        expected: String,
        /// The model in the file.
        found: String,
    },
    /// Shapes disagree with the model or with themselves.
    #[error("trig statistics: {0}")]
    Shape(String),
    /// No statistics were accumulated.
    #[error("trig statistics: no queries were accumulated")]
    Empty,
}

/// One layer's query statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrigLayerStats {
    /// Mean pre-RoPE query per query head, `[q_heads × head_dim]` row-major.
    pub centre: Vec<f32>,
    /// Mean magnitude `E|q_f|` of each RoPE pair per query head, `[q_heads × head_dim/2]`.
    pub pair_norm: Vec<f32>,
}

/// Calibrated pre-RoPE query statistics of every layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrigStats {
    /// sha256 of the model file they were computed on.
    pub model_sha256: String,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE pair layout.
    pub pairing: RopePairing,
    /// Query heads per layer.
    pub q_heads: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Queries accumulated per head and layer.
    pub samples: u64,
    /// Per layer.
    pub layers: Vec<TrigLayerStats>,
}

impl TrigStats {
    /// Parses a statistics file and checks it belongs to `model_sha256` and has `layers` layers
    /// of consistent shape.
    pub fn from_json(text: &str, model_sha256: &str, layers: usize) -> Result<Self, TrigError> {
        let s: TrigStats = serde_json::from_str(text)?;
        if s.model_sha256 != model_sha256 {
            return Err(TrigError::ModelMismatch {
                expected: model_sha256.into(),
                found: s.model_sha256,
            });
        }
        s.validate(layers)?;
        Ok(s)
    }

    /// Serialises to JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain data serialises")
    }

    fn validate(&self, layers: usize) -> Result<(), TrigError> {
        let (qh, kvh, d) = (self.q_heads, self.kv_heads, self.head_dim);
        if self.layers.len() != layers {
            return Err(TrigError::Shape(format!(
                "{} layers, the model has {layers}",
                self.layers.len()
            )));
        }
        if kvh == 0 || qh % kvh != 0 || d == 0 || d % 2 != 0 {
            return Err(TrigError::Shape(format!(
                "{qh} query heads, {kvh} KV heads, head dim {d}"
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(TrigError::Shape(format!("rope theta {}", self.rope_theta)));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            if layer.centre.len() != qh * d || layer.pair_norm.len() != qh * d / 2 {
                return Err(TrigError::Shape(format!("layer {l}: wrong vector lengths")));
            }
            if layer
                .centre
                .iter()
                .chain(&layer.pair_norm)
                .any(|x| !x.is_finite())
            {
                return Err(TrigError::Shape(format!(
                    "layer {l}: non-finite statistics"
                )));
            }
        }
        Ok(())
    }

    /// Per KV head, the dot-product weights `w` `[kv_heads × d]` and the key-norm weights `c`
    /// `[kv_heads × d/2]` for queries at positions `next..next + horizon` (see the module doc).
    pub fn weights(&self, layer: usize, next: usize, horizon: usize) -> (Vec<f32>, Vec<f32>) {
        let (qh, kvh, d) = (self.q_heads, self.kv_heads, self.head_dim);
        let half = d / 2;
        let g = qh / kvh;
        let stats = &self.layers[layer];
        let horizon = horizon.max(1);
        let mut w = vec![0f64; kvh * d];
        let mut c = vec![0f64; kvh * half];
        for f in 0..half {
            let omega = self.rope_theta.powf(-(2.0 * f as f64) / d as f64);
            // mean over p of e^{iωp}
            let (mut mre, mut mim) = (0.0, 0.0);
            for j in 0..horizon {
                let a = omega * (next + j) as f64;
                mre += a.cos();
                mim += a.sin();
            }
            mre /= horizon as f64;
            mim /= horizon as f64;
            let (ia, ib) = self.pairing.pair(f, d);
            for h in 0..qh {
                let kv = h / g;
                let (za, zb) = (
                    stats.centre[h * d + ia] as f64,
                    stats.centre[h * d + ib] as f64,
                );
                w[kv * d + ia] += (za * mre - zb * mim) / g as f64;
                w[kv * d + ib] += (za * mim + zb * mre) / g as f64;
                let spread = stats.pair_norm[h * half + f] as f64 - za.hypot(zb);
                c[kv * half + f] += spread.max(0.0) / g as f64;
            }
        }
        (
            w.into_iter().map(|x| x as f32).collect(),
            c.into_iter().map(|x| x as f32).collect(),
        )
    }
}

/// Accumulates pre-RoPE query statistics over calibration text.
#[derive(Debug, Clone)]
pub struct TrigAccumulator {
    q_heads: usize,
    head_dim: usize,
    pairing: RopePairing,
    sums: Vec<Vec<f64>>,
    norms: Vec<Vec<f64>>,
    counts: Vec<u64>,
}

impl TrigAccumulator {
    /// An empty accumulator.
    pub fn new(layers: usize, q_heads: usize, head_dim: usize, pairing: RopePairing) -> Self {
        Self {
            q_heads,
            head_dim,
            pairing,
            sums: vec![vec![0.0; q_heads * head_dim]; layers],
            norms: vec![vec![0.0; q_heads * head_dim / 2]; layers],
            counts: vec![0; layers],
        }
    }

    /// Adds the pre-RoPE queries `[b, q_heads, w, d]` of `layer`.
    pub fn add<B: KvBackend>(&mut self, layer: usize, q: &Tensor<B, 4>) -> Result<(), TrigError> {
        let [b, qh, w, d] = q.dims();
        if layer >= self.sums.len() || qh != self.q_heads || d != self.head_dim {
            return Err(TrigError::Shape(format!(
                "layer {layer}: queries {:?}, expected {} heads of {}",
                q.dims(),
                self.q_heads,
                self.head_dim
            )));
        }
        let data: Vec<f32> = q
            .clone()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .map_err(|e| TrigError::Shape(format!("{e:?}")))?;
        let half = d / 2;
        for bi in 0..b {
            for h in 0..qh {
                for t in 0..w {
                    let row = &data[((bi * qh + h) * w + t) * d..][..d];
                    for (i, x) in row.iter().enumerate() {
                        self.sums[layer][h * d + i] += *x as f64;
                    }
                    for f in 0..half {
                        let (ia, ib) = self.pairing.pair(f, d);
                        self.norms[layer][h * half + f] += (row[ia] as f64).hypot(row[ib] as f64);
                    }
                }
            }
        }
        self.counts[layer] += (b * w) as u64;
        Ok(())
    }

    /// The statistics (every layer must have seen queries).
    pub fn finish(
        self,
        model_sha256: &str,
        rope_theta: f64,
        kv_heads: usize,
    ) -> Result<TrigStats, TrigError> {
        let samples = self.counts.iter().copied().min().unwrap_or(0);
        if samples == 0 {
            return Err(TrigError::Empty);
        }
        let layers = self
            .sums
            .iter()
            .zip(&self.norms)
            .zip(&self.counts)
            .map(|((s, n), &c)| TrigLayerStats {
                centre: s.iter().map(|x| (x / c as f64) as f32).collect(),
                pair_norm: n.iter().map(|x| (x / c as f64) as f32).collect(),
            })
            .collect::<Vec<_>>();
        let stats = TrigStats {
            model_sha256: model_sha256.into(),
            rope_theta,
            pairing: self.pairing,
            q_heads: self.q_heads,
            kv_heads,
            head_dim: self.head_dim,
            samples,
            layers,
        };
        stats.validate(stats.layers.len())?;
        Ok(stats)
    }
}

/// `[b, kv_heads, t]` scores of post-RoPE keys `k` `[b, kv_heads, t, d]` of `layer`, for
/// queries at positions `next..next + horizon`.
pub fn score<B: KvBackend>(
    k: &Tensor<B, 4>,
    stats: &TrigStats,
    layer: usize,
    next: usize,
    horizon: usize,
) -> Result<Tensor<B, 3>, AxisError> {
    let [b, kvh, t, d] = k.dims();
    if layer >= stats.layers.len() || kvh != stats.kv_heads || d != stats.head_dim {
        return Err(AxisError::Method {
            method: "trig",
            source: format!(
                "statistics are for {} layers of {} KV heads × {}, got layer {layer} with keys {:?}",
                stats.layers.len(),
                stats.kv_heads,
                stats.head_dim,
                k.dims()
            )
            .into(),
        });
    }
    let half = d / 2;
    let device = k.device();
    let (w, c) = stats.weights(layer, next, horizon);
    let w = Tensor::<B, 4>::from_data(TensorData::new(w, [1, kvh, 1, d]), &device);
    let c = Tensor::<B, 4>::from_data(TensorData::new(c, [1, kvh, 1, half]), &device);
    let norms = match stats.pairing {
        RopePairing::Interleaved => k
            .clone()
            .reshape([b, kvh, t, half, 2])
            .square()
            .sum_dim(4)
            .sqrt()
            .reshape([b, kvh, t, half]),
        RopePairing::Halves => {
            let a = k.clone().slice_dim(3, 0..half);
            let z = k.clone().slice_dim(3, half..d);
            (a.square() + z.square()).sqrt()
        }
    };
    let logit = k.clone().mul(w).sum_dim(3) + norms.mul(c).sum_dim(3);
    Ok(logit
        .mul_scalar(1.0 / (d as f64).sqrt())
        .reshape([b, kvh, t]))
}

/// The TriAttention scorer, built from calibrated statistics.
#[derive(Debug, Clone)]
pub struct Trig {
    stats: std::sync::Arc<TrigStats>,
    horizon: usize,
}

impl Trig {
    /// TriAttention averaging over the next [`DEFAULT_HORIZON`] query positions.
    pub fn new(stats: std::sync::Arc<TrigStats>) -> Self {
        Self {
            stats,
            horizon: DEFAULT_HORIZON,
        }
    }
}

impl crate::ScorerType for Trig {
    const NEEDS: crate::ScorerNeeds = crate::ScorerNeeds {
        calibration: true,
        ..crate::ScorerNeeds::NONE
    };

    /// Nothing without statistics: the registry reports them missing.
    fn builtin() -> Option<Self> {
        None
    }
}

impl<B: KvBackend> crate::Scorer<B> for Trig {
    fn needs(&self) -> crate::ScorerNeeds {
        <Self as crate::ScorerType>::NEEDS
    }

    fn score(&self, i: &crate::ScoreInput<'_, B>) -> Result<Tensor<B, 3>, AxisError> {
        score(i.k, &self.stats, i.ctx.layer, i.next, self.horizon)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_ndarray::NdArray;

    type B = NdArray<f32>;

    /// With every query equal to its centre, `w · k` is exactly the mean logit of the future
    /// queries after RoPE: check against rotating the centre by hand.
    #[test]
    fn weights_equal_mean_rotated_logit() {
        let d = 8;
        let theta = 10000.0f64;
        for pairing in [RopePairing::Interleaved, RopePairing::Halves] {
            let centre: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin() + 0.2).collect();
            let stats = TrigStats {
                model_sha256: "x".into(),
                rope_theta: theta,
                pairing,
                q_heads: 1,
                kv_heads: 1,
                head_dim: d,
                samples: 1,
                layers: vec![TrigLayerStats {
                    centre: centre.clone(),
                    pair_norm: (0..d / 2)
                        .map(|f| {
                            let (a, b) = pairing.pair(f, d);
                            centre[a].hypot(centre[b])
                        })
                        .collect(),
                }],
            };
            let key: Vec<f32> = (0..d).map(|i| (i as f32 * 1.3).cos()).collect();
            let (next, horizon) = (100, 5);
            let mut expected = 0.0f64;
            for p in next..next + horizon {
                let mut q = vec![0f64; d];
                for f in 0..d / 2 {
                    let (a, b) = pairing.pair(f, d);
                    let ang = p as f64 * theta.powf(-(2.0 * f as f64) / d as f64);
                    let (x, y) = (centre[a] as f64, centre[b] as f64);
                    q[a] = x * ang.cos() - y * ang.sin();
                    q[b] = x * ang.sin() + y * ang.cos();
                }
                expected += q.iter().zip(&key).map(|(a, b)| a * *b as f64).sum::<f64>();
            }
            expected /= horizon as f64 * (d as f64).sqrt();
            let k =
                Tensor::<B, 4>::from_data(TensorData::new(key, [1, 1, 1, d]), &Default::default());
            let s = score(&k, &stats, 0, next, horizon).expect("test");
            let got = s.into_data().to_vec::<f32>().expect("test")[0] as f64;
            assert!(
                (got - expected).abs() < 1e-4,
                "{pairing:?}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn load_rejects_other_model_and_bad_shapes() {
        let mut acc = TrigAccumulator::new(2, 2, 4, RopePairing::Interleaved);
        let q = Tensor::<B, 4>::ones([1, 2, 3, 4], &Default::default());
        acc.add(0, &q).expect("test");
        assert!(matches!(
            acc.clone().finish("m", 1e4, 1),
            Err(TrigError::Empty)
        ));
        acc.add(1, &q).expect("test");
        let stats = acc.finish("m", 1e4, 1).expect("test");
        assert_eq!(stats.layers[0].centre, vec![1.0; 8]);
        let json = stats.to_json();
        assert_eq!(TrigStats::from_json(&json, "m", 2).expect("test"), stats);
        assert!(matches!(
            TrigStats::from_json(&json, "other", 2),
            Err(TrigError::ModelMismatch { .. })
        ));
        assert!(matches!(
            TrigStats::from_json(&json, "m", 3),
            Err(TrigError::Shape(_))
        ));
        assert!(matches!(
            TrigStats::from_json("{\"model_sha256\": 1}", "m", 2),
            Err(TrigError::Parse(_))
        ));
        let bad = json.replace("\"kv_heads\":1", "\"kv_heads\":3");
        assert!(matches!(
            TrigStats::from_json(&bad, "m", 2),
            Err(TrigError::Shape(_))
        ));
    }
}

//! Calibration of per-head PCA bases.
//!
//! The bases diagonalise the *uncentred* second moment `E[x xᵀ]`: its top-r eigenvectors give
//! the best rank-r approximation of the vectors themselves (no mean to store), which is what a
//! projected cache decodes.
use burn::tensor::Tensor;
use kv_tensor::KvBackend;
use nalgebra::{DMatrix, SymmetricEigen};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What went wrong with bases.
#[derive(Debug, Error)]
pub enum LowRankError {
    /// The bases were calibrated on another model.
    #[error("PCA bases were calibrated on model {found}, not {expected}: recalibrate")]
    ModelMismatch {
        /// The model in use.
        expected: String,
        /// The model in the file.
        found: String,
    },
    /// The file is not valid bases.
    #[error("invalid PCA bases file: {0}")]
    Invalid(String),
    /// A rank beyond the head dimension or zero.
    #[error("rank {rank} is outside 1..={head_dim}")]
    Rank {
        /// Asked rank.
        rank: usize,
        /// Head dimension.
        head_dim: usize,
    },
    /// No bases for a layer.
    #[error("no PCA bases for layer {0}")]
    Layer(usize),
}

/// f64 second moments per layer, side (K, V) and KV head.
pub struct PcaAccumulator {
    head_dim: usize,
    kv_heads: usize,
    // [layer][side][head] → d×d, row-major
    sums: Vec<[Vec<Vec<f64>>; 2]>,
    count: Vec<u64>,
}

impl PcaAccumulator {
    /// Empty accumulators.
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        let zero = || {
            (0..kv_heads)
                .map(|_| vec![0f64; head_dim * head_dim])
                .collect::<Vec<_>>()
        };
        Self {
            head_dim,
            kv_heads,
            sums: (0..layers).map(|_| [zero(), zero()]).collect(),
            count: vec![0; layers],
        }
    }

    /// Adds a layer's keys and values `[1, kv_heads, t, d]`.
    pub fn add<B: KvBackend>(
        &mut self,
        layer: usize,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
    ) -> Result<(), LowRankError> {
        let d = self.head_dim;
        let [b, h, t, kd] = k.dims();
        if b != 1 || h != self.kv_heads || kd != d || layer >= self.sums.len() {
            return Err(LowRankError::Invalid(format!(
                "layer {layer}: shape {:?}",
                k.dims()
            )));
        }
        for (side, x) in [k, v].into_iter().enumerate() {
            let vals: Vec<f32> = x.clone().into_data().iter::<f32>().collect();
            for head in 0..h {
                let m = &mut self.sums[layer][side][head];
                for tok in 0..t {
                    let row = &vals[(head * t + tok) * d..(head * t + tok + 1) * d];
                    for i in 0..d {
                        let xi = row[i] as f64;
                        for j in i..d {
                            m[i * d + j] += xi * row[j] as f64;
                        }
                    }
                }
            }
        }
        self.count[layer] += t as u64;
        Ok(())
    }

    /// Diagonalises every accumulated matrix.
    pub fn finish(self, model_sha256: &str) -> PcaBases {
        let d = self.head_dim;
        let layers = self
            .sums
            .iter()
            .zip(&self.count)
            .map(|(sides, &n)| {
                let side = |mats: &Vec<Vec<f64>>| -> Vec<HeadBasis> {
                    mats.iter()
                        .map(|m| {
                            let full = DMatrix::from_fn(d, d, |i, j| if i <= j { m[i * d + j] } else { m[j * d + i] } / n.max(1) as f64);
                            let eig = SymmetricEigen::new(full);
                            let mut order: Vec<usize> = (0..d).collect();
                            order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
                            HeadBasis {
                                eigenvalues: order.iter().map(|&c| eig.eigenvalues[c].max(0.0)).collect(),
                                // Row i holds coordinate i of every direction (column j = direction j).
                                vectors: (0..d).flat_map(|i| order.iter().map(move |&c| (i, c))).map(|(i, c)| eig.eigenvectors[(i, c)] as f32).collect(),
                            }
                        })
                        .collect()
                };
                [side(&sides[0]), side(&sides[1])]
            })
            .collect();
        PcaBases {
            model_sha256: model_sha256.to_string(),
            head_dim: d,
            kv_heads: self.kv_heads,
            layers,
        }
    }
}

/// One head's directions, sorted by decreasing eigenvalue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadBasis {
    /// Eigenvalues, decreasing.
    pub eigenvalues: Vec<f64>,
    /// `d × d` row-major; column `j` is direction `j`.
    pub vectors: Vec<f32>,
}

/// Calibrated bases of a model: `layers[l][0]` keys, `layers[l][1]` values, one basis per head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PcaBases {
    /// sha256 of the model file.
    pub model_sha256: String,
    /// Head dimension.
    pub head_dim: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Per layer: `[keys, values]`, each one basis per KV head.
    pub layers: Vec<[Vec<HeadBasis>; 2]>,
}

impl PcaBases {
    /// Parses a bases file and checks it belongs to `model_sha256` and is well formed.
    pub fn from_json(text: &str, model_sha256: &str) -> Result<Self, LowRankError> {
        let b: PcaBases =
            serde_json::from_str(text).map_err(|e| LowRankError::Invalid(e.to_string()))?;
        if b.model_sha256 != model_sha256 {
            return Err(LowRankError::ModelMismatch {
                expected: model_sha256.into(),
                found: b.model_sha256,
            });
        }
        let d = b.head_dim;
        for (l, sides) in b.layers.iter().enumerate() {
            for heads in sides {
                if heads.len() != b.kv_heads
                    || heads
                        .iter()
                        .any(|h| h.vectors.len() != d * d || h.eigenvalues.len() != d)
                {
                    return Err(LowRankError::Invalid(format!(
                        "layer {l}: wrong basis shape"
                    )));
                }
            }
        }
        Ok(b)
    }

    /// The bases as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Share of the second moment captured by the top `rank` directions, mean over heads.
    pub fn explained(&self, layer: usize, side: usize, rank: usize) -> f64 {
        let heads = &self.layers[layer][side];
        heads
            .iter()
            .map(|h| {
                let total: f64 = h.eigenvalues.iter().sum();
                h.eigenvalues[..rank.min(h.eigenvalues.len())]
                    .iter()
                    .sum::<f64>()
                    / total.max(f64::MIN_POSITIVE)
            })
            .sum::<f64>()
            / heads.len().max(1) as f64
    }

    /// A layer's full bases as tensors `[h, d, d]` for keys and values.
    pub fn tensors<B: KvBackend>(
        &self,
        layer: usize,
        device: &B::Device,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 3>), LowRankError> {
        let sides = self.layers.get(layer).ok_or(LowRankError::Layer(layer))?;
        let d = self.head_dim;
        let t = |heads: &Vec<HeadBasis>| {
            let v: Vec<f32> = heads
                .iter()
                .flat_map(|h| h.vectors.iter().copied())
                .collect();
            Tensor::<B, 3>::from_data(
                burn::tensor::TensorData::new(v, [heads.len(), d, d]),
                device,
            )
        };
        Ok((t(&sides[0]), t(&sides[1])))
    }
}

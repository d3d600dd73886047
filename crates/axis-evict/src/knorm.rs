//! KNorm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
//! Compression", 2024): keys with a small norm attract more attention, so the score is the
//! negative key norm.
use burn::tensor::Tensor;
use kv_tensor::KvBackend;

/// `[b, h, t]` scores: `−‖k‖`.
pub fn score<B: KvBackend>(k: &Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, t, _] = k.dims();
    k.clone()
        .square()
        .sum_dim(3)
        .sqrt()
        .neg()
        .reshape([b, h, t])
}

/// The key-norm scorer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Knorm;

impl crate::ScorerType for Knorm {
    const NEEDS: crate::ScorerNeeds = crate::ScorerNeeds {
        window_queries: false,
        attention_mass: false,
        calibration: false,
    };

    fn builtin() -> Option<Self> {
        Some(Self)
    }
}

impl<B: KvBackend> crate::Scorer<B> for Knorm {
    fn needs(&self) -> crate::ScorerNeeds {
        <Self as crate::ScorerType>::NEEDS
    }

    fn score(&self, i: &crate::ScoreInput<'_, B>) -> Result<Tensor<B, 3>, kv_tensor::AxisError> {
        Ok(score(i.k))
    }
}

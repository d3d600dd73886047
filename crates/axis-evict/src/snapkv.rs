//! SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024):
//! the attention the last prompt tokens (the observation window) pay to each key, averaged over
//! the window and over the query heads sharing a KV head, then max-pooled along tokens (kernel
//! 7) so that neighbours of important tokens survive together.
use burn::tensor::Tensor;
use burn::tensor::module::max_pool1d;
use kv_tensor::KvBackend;
use kv_tensor::{AxisError, ObservationCtx, window_attention};

/// Pooling kernel along tokens.
pub const KERNEL: usize = 7;

/// `[b, h, t]` scores.
pub fn score<B: KvBackend>(
    k: &Tensor<B, 4>,
    ctx: &ObservationCtx<B>,
) -> Result<Tensor<B, 3>, AxisError> {
    let q = ctx.require_window_queries("snapkv")?;
    let att = window_attention(q, k.clone())?;
    let [b, h, t] = att.dims();
    let pooled = max_pool1d(att.reshape([b * h, 1, t]), KERNEL, 1, KERNEL / 2, 1, false);
    Ok(pooled.reshape([b, h, t]))
}

/// The SnapKV scorer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapkv;

impl crate::ScorerType for Snapkv {
    const NEEDS: crate::ScorerNeeds = crate::ScorerNeeds {
        window_queries: true,
        attention_mass: false,
        calibration: false,
    };

    fn builtin() -> Option<Self> {
        Some(Self)
    }
}

impl<B: KvBackend> crate::Scorer<B> for Snapkv {
    fn needs(&self) -> crate::ScorerNeeds {
        <Self as crate::ScorerType>::NEEDS
    }

    fn score(&self, i: &crate::ScoreInput<'_, B>) -> Result<Tensor<B, 3>, kv_tensor::AxisError> {
        score(i.k, i.ctx)
    }
}

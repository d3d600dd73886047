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

crate::builtin_scorer! {
    /// The SnapKV scorer.
    Snapkv, needs: [window_queries], |i| score(i.k, i.ctx)
}

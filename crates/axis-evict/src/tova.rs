//! TOVA (Oren et al., "Transformers are Multi-State RNNs", 2024): keep the tokens the last
//! query attends to most, averaged over heads.
use burn::tensor::Tensor;
use kv_tensor::KvBackend;
use kv_tensor::{AxisError, ObservationCtx, window_attention};

/// `[b, h, t]` scores: the last query's attention.
pub fn score<B: KvBackend>(
    k: &Tensor<B, 4>,
    ctx: &ObservationCtx<B>,
) -> Result<Tensor<B, 3>, AxisError> {
    let q = ctx.require_window_queries("tova")?;
    let w = q.dims()[2];
    let last = q.slice_dim(2, w - 1..w);
    let att = window_attention(last, k.clone())?;
    // TOVA averages over all heads of the layer, so every KV head keeps the same tokens.
    let [b, h, t] = att.dims();
    Ok(att.mean_dim(1).expand([b, h, t]))
}

crate::builtin_scorer! {
    /// The TOVA scorer.
    Tova, needs: [window_queries], |i| score(i.k, i.ctx)
}

//! H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
//! Language Models", 2023): the attention each key accumulated over every prefill query. The
//! model computes it when asked (`PrefillOptions::attention_mass`).
use burn::tensor::Tensor;
use kv_tensor::KvBackend;
use kv_tensor::{AxisError, ObservationCtx};

/// `[b, h, t]` scores: accumulated attention.
pub fn score<B: KvBackend>(
    k: &Tensor<B, 4>,
    ctx: &ObservationCtx<B>,
) -> Result<Tensor<B, 3>, AxisError> {
    // Early tokens receive attention from more queries; H2O keeps that bias on purpose.
    crate::scorer::observed_per_token(
        ctx.attention_mass.as_ref(),
        k,
        "h2o",
        "accumulated attention",
    )
}

crate::builtin_scorer! {
    /// The H2O scorer.
    H2o, needs: [attention_mass], |i| score(i.k, i.ctx)
}

//! Expected attention (Devoto et al., "Expected Attention: KV Cache Compression by Estimating
//! Attention from Future Queries Distribution", 2025): future queries are modelled as Gaussian
//! with the mean μ and per-dimension variance σ² of the observation-window queries; a key's
//! expected unnormalised attention is `exp(μ·k/√d + Σ σ²ᵢ kᵢ² / 2d)`. Scores are the resulting
//! softmax weights times the value norm, as in kvpress.
use burn::tensor::Tensor;
use burn::tensor::activation::softmax;
use kv_tensor::KvBackend;
use kv_tensor::{AxisError, ObservationCtx};

/// `[b, h, t]` scores.
pub fn score<B: KvBackend>(
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    ctx: &ObservationCtx<B>,
) -> Result<Tensor<B, 3>, AxisError> {
    let q = ctx.require_window_queries("expected_attention")?;
    let [b, qh, w, d] = q.dims();
    let [_, kvh, t, _] = k.dims();
    let g = qh / kvh.max(1);
    // Statistics over the window and the query heads of each KV head: [b, kvh, 1, d].
    let q = q.reshape([b, kvh, g * w, d]);
    let mu = q.clone().mean_dim(2);
    let var = (q - mu.clone()).square().mean_dim(2);
    let scale = 1.0 / (d as f64).sqrt();
    let linear = k.clone().mul(mu).sum_dim(3).mul_scalar(scale);
    let quad = k
        .clone()
        .square()
        .mul(var)
        .sum_dim(3)
        .mul_scalar(0.5 / d as f64);
    let logits = (linear + quad).reshape([b, kvh, t]);
    let probs = softmax(logits, 2);
    let vnorm = v.clone().square().sum_dim(3).sqrt().reshape([b, kvh, t]);
    Ok(probs * vnorm)
}

crate::builtin_scorer! {
    /// The expected-attention scorer.
    ExpectedAttention, needs: [window_queries], |i| score(i.k, i.v, i.ctx)
}

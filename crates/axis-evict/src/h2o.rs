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
    let mass = ctx
        .attention_mass
        .clone()
        .ok_or(AxisError::MissingObservation {
            method: "h2o",
            what: "accumulated attention",
        })?;
    let t = k.dims()[2];
    if mass.dims()[2] != t {
        return Err(kv_tensor::KvError::Shape {
            context: "h2o attention mass",
            expected: k.dims()[..3].to_vec(),
            got: mass.dims().to_vec(),
        }
        .into());
    }
    // Early tokens receive attention from more queries; H2O keeps that bias on purpose.
    Ok(mass)
}

crate::builtin_scorer! {
    /// The H2O scorer.
    H2o, needs: [attention_mass], |i| score(i.k, i.ctx)
}

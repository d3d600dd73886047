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

/// The H2O scorer.
#[derive(Debug, Clone, Copy, Default)]
pub struct H2o;

impl crate::ScorerType for H2o {
    const NEEDS: crate::ScorerNeeds = crate::ScorerNeeds {
        window_queries: false,
        attention_mass: true,
        calibration: false,
    };

    fn builtin() -> Option<Self> {
        Some(Self)
    }
}

impl<B: KvBackend> crate::Scorer<B> for H2o {
    fn needs(&self) -> crate::ScorerNeeds {
        <Self as crate::ScorerType>::NEEDS
    }

    fn score(&self, i: &crate::ScoreInput<'_, B>) -> Result<Tensor<B, 3>, kv_tensor::AxisError> {
        score(i.k, i.ctx)
    }
}

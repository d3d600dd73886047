//! StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
//! 2023): keep the attention sinks and the most recent tokens. The score is the position, so
//! with any keep ratio the newest tokens win; sinks are protected by the selection.
use burn::tensor::{Int, Tensor};
use kv_tensor::KvBackend;

/// `[b, h, t]` scores: the token index.
pub fn score<B: KvBackend>(k: &Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, t, _] = k.dims();
    Tensor::<B, 1, Int>::arange(0..t as i64, &k.device())
        .float()
        .reshape([1, 1, t])
        .expand([b, h, t])
}

/// The StreamingLLM scorer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Streaming;

impl crate::ScorerType for Streaming {
    const NEEDS: crate::ScorerNeeds = crate::ScorerNeeds {
        window_queries: false,
        attention_mass: false,
        calibration: false,
    };

    fn builtin() -> Option<Self> {
        Some(Self)
    }
}

impl<B: KvBackend> crate::Scorer<B> for Streaming {
    fn needs(&self) -> crate::ScorerNeeds {
        <Self as crate::ScorerType>::NEEDS
    }

    fn score(&self, i: &crate::ScoreInput<'_, B>) -> Result<Tensor<B, 3>, kv_tensor::AxisError> {
        Ok(score(i.k))
    }
}

//! The scorer enum (what plans name) and the eviction axis that runs scorer + selection.
use crate::{
    EvictSetting, expected_attention, h2o, knorm, random, select, snapkv, streaming, tova,
};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use kv_tensor::{
    AxisError, Bytes, CompressionAxis, Encoded, Footprint, LayerShape, ObservationCtx, Positions,
    Segment,
};
use serde::{Deserialize, Serialize};

/// Every scorer this crate ships, by the name plans use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScorerKind {
    /// StreamingLLM: sinks + most recent tokens.
    Streaming,
    /// Negative key norm.
    Knorm,
    /// SnapKV: observation-window attention, max-pooled.
    Snapkv,
    /// H2O: attention accumulated over the whole prefill.
    H2o,
    /// TOVA: attention of the last query.
    Tova,
    /// Expected attention of future queries under Gaussian query statistics.
    ExpectedAttention,
    /// Uniformly random (a control).
    Random,
}

impl ScorerKind {
    /// Every scorer.
    pub const ALL: [ScorerKind; 7] = [
        ScorerKind::Streaming,
        ScorerKind::Knorm,
        ScorerKind::Snapkv,
        ScorerKind::H2o,
        ScorerKind::Tova,
        ScorerKind::ExpectedAttention,
        ScorerKind::Random,
    ];

    /// Importance of each cached token `[b, h, t]` (higher = keep).
    pub fn score<B: Backend>(
        self,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
        ctx: &ObservationCtx<B>,
    ) -> Result<Tensor<B, 3>, AxisError> {
        match self {
            ScorerKind::Streaming => Ok(streaming::score(k)),
            ScorerKind::Knorm => Ok(knorm::score(k)),
            ScorerKind::Snapkv => snapkv::score(k, ctx),
            ScorerKind::H2o => h2o::score(k, ctx),
            ScorerKind::Tova => tova::score(k, ctx),
            ScorerKind::ExpectedAttention => expected_attention::score(k, v, ctx),
            ScorerKind::Random => Ok(random::score(k, ctx.layer as u64)),
        }
    }

    /// Whether the scorer reads the accumulated prefill attention (the model must be asked to
    /// compute it).
    pub fn needs_attention_mass(self) -> bool {
        self == ScorerKind::H2o
    }
}

/// The eviction axis: score, protect sinks and the recent window, keep the top tokens per head.
#[derive(Debug, Clone, Copy, Default)]
pub struct Evict;

impl<B: Backend> CompressionAxis<B> for Evict {
    type Setting = EvictSetting;

    fn name(&self) -> &'static str {
        "evict"
    }

    fn compress(
        &self,
        segment: Segment<B>,
        s: &EvictSetting,
        ctx: &ObservationCtx<B>,
    ) -> Result<Segment<B>, AxisError> {
        let k = segment.k.decode()?;
        let v = segment.v.decode()?;
        let [_, _, t, _] = k.dims();
        let n = s.kept(t);
        if n >= t {
            return Ok(segment);
        }
        let start = match &segment.positions {
            Positions::Contiguous { start, .. } => *start,
            Positions::Explicit(_) => {
                return Err(AxisError::Method {
                    method: "evict",
                    source: "eviction runs first: the segment was already evicted".into(),
                });
            }
        };
        let scores = s.scorer.score(&k, &v, ctx)?;
        let idx = select::top_k(select::protect(scores, s.sinks, s.window), n);
        let (k, v) = select::gather(k, v, idx.clone());
        Ok(Segment {
            positions: Positions::Explicit((idx + start as i32).cast(burn::tensor::IntDType::I32)),
            k: Encoded::Dense(k),
            v: Encoded::Dense(v),
        })
    }

    fn footprint(&self, shape: &LayerShape, s: &EvictSetting) -> Footprint {
        let n = s.kept(shape.tokens);
        let kept = shape.batch * shape.kv_heads * n;
        let dense = 2 * kept * shape.head_dim * std::mem::size_of::<B::FloatElem>();
        let indices = if n < shape.tokens { kept * 4 } else { 0 };
        Footprint {
            dense: Bytes(dense as u64),
            indices: Bytes(indices as u64),
            ..Footprint::default()
        }
    }
}

//! The scorer enum (what plans name) and the eviction axis that runs scorer + selection.
use crate::trig::{self, TrigStats};
use crate::{
    EvictSetting, Selection, expected_attention, h2o, headwise, knorm, random, redundancy, select,
    snapkv, streaming, tova,
};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use kv_tensor::{
    AxisError, Bytes, CompressionAxis, Encoded, Footprint, LayerShape, ObservationCtx, Positions,
    Segment,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

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
    /// TriAttention: calibrated pre-RoPE query centres give each head a distance preference
    /// (a trigonometric series over the RoPE frequencies) plus a key-norm term.
    Trig,
}

impl ScorerKind {
    /// Every scorer.
    pub const ALL: [ScorerKind; 8] = [
        ScorerKind::Streaming,
        ScorerKind::Knorm,
        ScorerKind::Snapkv,
        ScorerKind::H2o,
        ScorerKind::Tova,
        ScorerKind::ExpectedAttention,
        ScorerKind::Random,
        ScorerKind::Trig,
    ];

    /// Importance of each cached token `[b, h, t]` (higher = keep). [`ScorerKind::Trig`] needs
    /// calibration statistics: score it through [`Evict::score`].
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
            ScorerKind::Trig => Err(AxisError::MissingObservation {
                method: "trig",
                what: "calibrated query statistics (build the axis with Evict::with_trig)",
            }),
        }
    }

    /// Whether the scorer reads the accumulated prefill attention (the model must be asked to
    /// compute it).
    pub fn needs_attention_mass(self) -> bool {
        self == ScorerKind::H2o
    }

    /// The name plans and method names use (`expected_attention`).
    pub fn name(self) -> &'static str {
        match self {
            ScorerKind::Streaming => "streaming",
            ScorerKind::Knorm => "knorm",
            ScorerKind::Snapkv => "snapkv",
            ScorerKind::H2o => "h2o",
            ScorerKind::Tova => "tova",
            ScorerKind::ExpectedAttention => "expected_attention",
            ScorerKind::Random => "random",
            ScorerKind::Trig => "trig",
        }
    }
}

impl std::fmt::Display for ScorerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ScorerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                format!("unknown scorer {s:?}; one of {}", names.join(", "))
            })
    }
}

/// The eviction axis: score, protect sinks and the recent window, select per the setting.
///
/// Carries what scorers calibrated offline need ([`TrigStats`] for [`ScorerKind::Trig`]).
#[derive(Debug, Clone, Default)]
pub struct Evict {
    trig: Option<Arc<TrigStats>>,
    horizon: usize,
}

impl Evict {
    /// The axis without calibrated statistics (every scorer but `trig`).
    pub fn new() -> Self {
        Self::default()
    }

    /// The axis with TriAttention statistics, averaging over the next
    /// [`trig::DEFAULT_HORIZON`] query positions.
    pub fn with_trig(stats: Arc<TrigStats>) -> Self {
        Self {
            trig: Some(stats),
            horizon: trig::DEFAULT_HORIZON,
        }
    }

    /// Scores `[b, h, t]` of keys `k` (post-RoPE) and values `v` whose next query sits at
    /// position `next`.
    pub fn score<B: Backend>(
        &self,
        scorer: ScorerKind,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
        next: usize,
        ctx: &ObservationCtx<B>,
    ) -> Result<Tensor<B, 3>, AxisError> {
        match (scorer, &self.trig) {
            (ScorerKind::Trig, Some(stats)) => trig::score(k, stats, ctx.layer, next, self.horizon),
            _ => scorer.score(k, v, ctx),
        }
    }
}

impl<B: Backend> CompressionAxis<B> for Evict {
    type Setting = EvictSetting;

    fn name(&self) -> &'static str {
        "evict"
    }

    /// Evicts a dense segment. Its positions may be contiguous (a prompt) or explicit (a cache
    /// evicted before and compressed again during decoding); ragged segments are final.
    fn compress(
        &self,
        segment: Segment<B>,
        s: &EvictSetting,
        ctx: &ObservationCtx<B>,
    ) -> Result<Segment<B>, AxisError> {
        let k = segment.k.decode()?;
        let v = segment.v.decode()?;
        let [b, h, t, _] = k.dims();
        let n = s.kept(t);
        if n >= t {
            return Ok(segment);
        }
        let device = k.device();
        let next = match &segment.positions {
            Positions::Contiguous { start, len } => start + len,
            Positions::Explicit(p) => {
                let last: Vec<i64> = p
                    .clone()
                    .slice_dim(2, t - 1..t)
                    .into_data()
                    .convert::<i64>()
                    .into_vec()
                    .unwrap_or_default();
                last.into_iter().max().unwrap_or(0) as usize + 1
            }
            Positions::Ragged(_) => {
                return Err(AxisError::Method {
                    method: "evict",
                    source: "a ragged (head-wise) segment cannot be evicted again".into(),
                });
            }
        };
        // Every token's position `[b, h, t]`: kept positions are gathered from it.
        let positions = segment.positions.to_tensor(b, h, &device);
        let scores = self.score(s.scorer, &k, &v, next, ctx)?;
        let scores = select::protect(scores, s.sinks, s.window);
        let idx = match s.selection {
            Selection::TopK => select::top_k(scores, n),
            Selection::Redundancy { lambda } => redundancy::select(scores, &v, n, lambda.get())?,
            Selection::HeadWise { min_share } => {
                let kept = headwise::select(scores, n, min_share.get())?;
                let mut ks = Vec::with_capacity(h);
                let mut vs = Vec::with_capacity(h);
                let mut ps = Vec::with_capacity(h);
                for (head, rows) in kept.into_iter().enumerate() {
                    let m = rows.len();
                    let rows: Vec<i32> = rows.into_iter().map(|i| i as i32).collect();
                    let idx =
                        Tensor::<B, 3, Int>::from_data(TensorData::new(rows, [b, 1, m]), &device);
                    let kh = k.clone().slice_dim(1, head..head + 1);
                    let vh = v.clone().slice_dim(1, head..head + 1);
                    let (kh, vh) = select::gather(kh, vh, idx.clone());
                    ks.push(Encoded::Dense(kh));
                    vs.push(Encoded::Dense(vh));
                    ps.push(
                        positions
                            .clone()
                            .slice_dim(1, head..head + 1)
                            .gather(2, idx),
                    );
                }
                return Ok(Segment {
                    positions: Positions::Ragged(ps),
                    k: Encoded::Ragged(ks),
                    v: Encoded::Ragged(vs),
                });
            }
        };
        let (k, v) = select::gather(k, v, idx.clone());
        Ok(Segment {
            positions: Positions::Explicit(positions.gather(2, idx)),
            k: Encoded::Dense(k),
            v: Encoded::Dense(v),
        })
    }

    /// Head-wise selection moves slots between heads but keeps the layer's total, so every
    /// selection allocates the same bytes.
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

#[cfg(test)]
mod tests {
    use super::ScorerKind;

    /// Method names (`adakv(snapkv)`) and plans (`scorer = "snapkv"`) spell scorers alike.
    #[test]
    fn names_are_the_plan_spelling_and_parse_back() {
        for k in ScorerKind::ALL {
            let serde = serde_json::to_string(&k).unwrap_or_default();
            assert_eq!(serde, format!("\"{}\"", k.name()));
            assert_eq!(k.name().parse::<ScorerKind>(), Ok(k));
        }
        assert!("snap_kv".parse::<ScorerKind>().is_err());
    }
}

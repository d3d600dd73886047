//! The eviction axis: score with the setting's scorer, protect sinks and the recent window,
//! select with the setting's selection.
use crate::scorer::{ScoreInput, Scorer};
use crate::trig::TrigStats;
use crate::{EvictSetting, ScorerKind, Selection, headwise, redundancy, select};
use burn::tensor::Tensor;
use kv_tensor::KvBackend;
use kv_tensor::{
    AxisError, Bytes, CompressionAxis, Encoded, Footprint, LayerShape, ObservationCtx, Positions,
    Segment,
};
use std::sync::Arc;

/// The eviction axis. Holds the scorers built from calibration (TriAttention's statistics);
/// every other scorer is the registry's uncalibrated one.
#[derive(Debug, Clone)]
pub struct Evict<B: KvBackend> {
    calibrated: Vec<(ScorerKind, Arc<dyn Scorer<B>>)>,
}

impl<B: KvBackend> Default for Evict<B> {
    fn default() -> Self {
        Self {
            calibrated: Vec::new(),
        }
    }
}

impl<B: KvBackend> Evict<B> {
    /// The axis with the uncalibrated scorers (every scorer but `trig`).
    pub fn new() -> Self {
        Self::default()
    }

    /// The axis with `scorer` serving `kind` (a scorer built from calibration statistics, or a
    /// replacement for a built-in one).
    pub fn with_scorer(mut self, kind: ScorerKind, scorer: Arc<dyn Scorer<B>>) -> Self {
        self.calibrated.retain(|(k, _)| *k != kind);
        self.calibrated.push((kind, scorer));
        self
    }

    /// The axis with TriAttention built from `stats`.
    pub fn with_trig(stats: Arc<TrigStats>) -> Self {
        Self::new().with_scorer(ScorerKind::Trig, Arc::new(crate::trig::Trig::new(stats)))
    }

    /// The scorer serving `kind`.
    pub fn scorer(&self, kind: ScorerKind) -> Result<Arc<dyn Scorer<B>>, AxisError> {
        self.calibrated
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, s)| s.clone())
            .or_else(|| kind.builtin())
            .ok_or(AxisError::MissingObservation {
                method: kind.name(),
                what: "calibrated statistics (build the axis with them, e.g. Evict::with_trig)",
            })
    }

    /// Scores `[b, h, t]` of keys `k` (post-RoPE) and values `v` whose next query sits at
    /// position `next`.
    pub fn score(
        &self,
        kind: ScorerKind,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
        next: usize,
        ctx: &ObservationCtx<B>,
    ) -> Result<Tensor<B, 3>, AxisError> {
        self.scorer(kind)?.score(&ScoreInput { k, v, next, ctx })
    }
}

/// Position of the query after a segment's newest token.
fn next_position<B: KvBackend>(positions: &Positions<B>, t: usize) -> Result<usize, AxisError> {
    match positions {
        Positions::Contiguous { start, len } => Ok(start + len),
        Positions::Explicit(p) => {
            let last: Vec<i64> = p
                .clone()
                .slice_dim(2, t - 1..t)
                .into_data()
                .convert::<i64>()
                .into_vec()
                .unwrap_or_default();
            Ok(last.into_iter().max().unwrap_or(0) as usize + 1)
        }
        Positions::Ragged(_) => Err(AxisError::Method {
            method: "evict",
            source: "a ragged (head-wise) segment cannot be evicted again".into(),
        }),
    }
}

impl<B: KvBackend> CompressionAxis<B> for Evict<B> {
    type Setting = EvictSetting;

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
        let next = next_position(&segment.positions, t)?;
        // Every token's position `[b, h, t]`: kept positions are gathered from it.
        let positions = segment.positions.to_tensor(b, h, &k.device());
        let scores = self.score(s.scorer, &k, &v, next, ctx)?;
        let scores = select::protect(scores, s.sinks, s.window);
        let idx = match s.selection {
            Selection::TopK => select::top_k(scores, n),
            Selection::Redundancy { lambda } => redundancy::select(scores, &v, n, lambda.get())?,
            Selection::FacilityLocation { lambda } => {
                crate::facility::select(scores, &v, n, lambda.get())?
            }
            Selection::Chunks { size } => crate::chunks::select(scores, n, size.get())?,
            Selection::HeadWise { min_share } => {
                let kept = headwise::select(scores, n, min_share.get())?;
                return Ok(headwise::assemble(k, v, positions, kept));
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

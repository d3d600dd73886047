//! Low-rank projection as a compression axis.
use crate::{LowRankError, PcaBases};
use burn::tensor::Tensor;
use kv_tensor::KvBackend;
use kv_tensor::{
    AxisError, Basis, Bytes, CompressionAxis, Encoded, Footprint, LayerShape, ObservationCtx,
    PlanStage, Segment, Side, SidePlan,
};
use serde::{Deserialize, Serialize};

/// Ranks for keys and values (`None` = that side untouched).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LowRankSetting {
    /// Key rank.
    #[serde(default)]
    pub k_rank: Option<usize>,
    /// Value rank.
    #[serde(default)]
    pub v_rank: Option<usize>,
}

/// Bytes per value of a stored basis: bases stay in the backend's f32 (they are tiny:
/// `kv_heads × head_dim × rank` per layer and side).
pub const BASIS_BYTES: usize = 4;

impl LowRankSetting {
    /// The rank of `side` (`None` = untouched).
    pub fn rank(&self, side: Side) -> Option<usize> {
        match side {
            Side::Keys => self.k_rank,
            Side::Values => self.v_rank,
        }
    }
}

/// A projected side narrows to its rank and holds one basis `[kv_heads, head_dim, rank]` per
/// layer; an unprojected side passes through.
impl PlanStage for LowRankSetting {
    fn plan_side(&self, side: Side, input: &LayerShape) -> SidePlan {
        SidePlan::projected(input, self.rank(side), BASIS_BYTES, 1)
    }
}

/// The axis: per layer, full bases `[h, d, d]` for keys and values (columns by decreasing
/// variance); a rank-r setting keeps the first r columns.
pub struct LowRank<B: KvBackend> {
    bases: Vec<(Tensor<B, 3>, Tensor<B, 3>)>,
    head_dim: usize,
}

impl<B: KvBackend> LowRank<B> {
    /// Loads every layer's bases onto `device`.
    pub fn new(bases: &PcaBases, device: &B::Device) -> Result<Self, LowRankError> {
        let layers = (0..bases.layers.len())
            .map(|l| bases.tensors::<B>(l, device))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            bases: layers,
            head_dim: bases.head_dim,
        })
    }

    /// From explicit bases (tests, other calibrations).
    pub fn from_tensors(bases: Vec<(Tensor<B, 3>, Tensor<B, 3>)>, head_dim: usize) -> Self {
        Self { bases, head_dim }
    }

    fn project(
        &self,
        e: Encoded<B>,
        basis: &Tensor<B, 3>,
        rank: Option<usize>,
    ) -> Result<Encoded<B>, AxisError> {
        let Some(r) = rank else { return Ok(e) };
        let d = self.head_dim;
        if r == 0 || r > d {
            return Err(AxisError::Method {
                method: "lowrank",
                source: Box::new(LowRankError::Rank {
                    rank: r,
                    head_dim: d,
                }),
            });
        }
        let p = basis.clone().slice_dim(2, 0..r);
        Ok(Encoded::project(e.decode()?, Basis::new(p)))
    }
}

impl<B: KvBackend> CompressionAxis<B> for LowRank<B> {
    type Setting = LowRankSetting;

    fn compress(
        &self,
        segment: Segment<B>,
        s: &LowRankSetting,
        ctx: &ObservationCtx<B>,
    ) -> Result<Segment<B>, AxisError> {
        let (kb, vb) = self.bases.get(ctx.layer).ok_or_else(|| AxisError::Method {
            method: "lowrank",
            source: Box::new(LowRankError::Layer(ctx.layer)),
        })?;
        Ok(Segment {
            positions: segment.positions,
            k: self.project(segment.k, kb, s.k_rank)?,
            v: self.project(segment.v, vb, s.v_rank)?,
        })
    }

    /// Coefficients only: the bases are counted once per layer by `CompressedLayer`
    /// (`h·d·r` floats per projected side).
    fn footprint(&self, shape: &LayerShape, s: &LowRankSetting) -> Footprint {
        let fb = std::mem::size_of::<B::FloatElem>();
        let per = |r: Option<usize>| {
            shape.batch * shape.kv_heads * shape.tokens * r.unwrap_or(shape.head_dim) * fb
        };
        Footprint::dense(Bytes((per(s.k_rank) + per(s.v_rank)) as u64))
    }
}

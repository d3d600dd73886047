//! The axis: projection onto a group's shared basis.
use crate::{ShareError, ShareSetting};
use axis_lowrank::PcaBases;
use burn::tensor::Tensor;
use kv_tensor::{
    AxisError, Basis, CompressionAxis, Encoded, Footprint, KvBackend, LayerShape, ObservationCtx,
    Segment, Side, compose_footprint,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Shared bases `[h, d, d]` per group of adjacent layers (columns by decreasing pooled
/// variance). A rank-r setting keeps the first r columns; every layer of a group receives the
/// same `Arc<Basis>`, so the basis (and its host copy) exists once per group.
pub struct Share<B: KvBackend> {
    bases: Vec<(Tensor<B, 3>, Tensor<B, 3>)>,
    group: usize,
    head_dim: usize,
    sliced: Mutex<HashMap<BasisKey, Arc<Basis<B>>>>,
}

/// A cut basis: group, side, rank.
type BasisKey = (usize, Side, usize);

impl<B: KvBackend> Share<B> {
    /// From pooled bases (see [`crate::pooled_bases`]) calibrated for groups of `group`.
    pub fn new(pooled: &PcaBases, group: usize, device: &B::Device) -> Result<Self, AxisError> {
        let bases = (0..pooled.layers.len())
            .map(|g| pooled.tensors::<B>(g, device))
            .collect::<Result<_, _>>()
            .map_err(|e| method(e.into()))?;
        Ok(Self {
            bases,
            group,
            head_dim: pooled.head_dim,
            sliced: Mutex::new(HashMap::new()),
        })
    }

    /// The calibrated group size.
    pub fn group(&self) -> usize {
        self.group
    }

    /// Group `g`'s basis for `side`, cut to rank `r` (made once, then shared).
    fn basis(&self, g: usize, side: Side, r: usize) -> Result<Arc<Basis<B>>, ShareError> {
        let (k, v) = self.bases.get(g).ok_or(ShareError::Layer(g * self.group))?;
        let mut sliced = self.sliced.lock().unwrap_or_else(PoisonError::into_inner);
        let full = if side == Side::Keys { k } else { v };
        Ok(sliced
            .entry((g, side, r))
            .or_insert_with(|| Basis::shared(full.clone().slice_dim(2, 0..r), self.group))
            .clone())
    }

    fn project(
        &self,
        e: Encoded<B>,
        g: usize,
        side: Side,
        rank: Option<usize>,
    ) -> Result<Encoded<B>, AxisError> {
        let Some(r) = rank else { return Ok(e) };
        let d = self.head_dim;
        if r == 0 || r > d {
            return Err(method(Box::new(ShareError::Rank {
                rank: r,
                head_dim: d,
            })));
        }
        let basis = self.basis(g, side, r).map_err(|e| method(Box::new(e)))?;
        Ok(Encoded::project(e.decode()?, basis))
    }
}

fn method(e: Box<dyn std::error::Error + Send + Sync>) -> AxisError {
    AxisError::Method {
        method: "share",
        source: e,
    }
}

impl<B: KvBackend> CompressionAxis<B> for Share<B> {
    type Setting = ShareSetting;

    fn compress(
        &self,
        segment: Segment<B>,
        s: &ShareSetting,
        ctx: &ObservationCtx<B>,
    ) -> Result<Segment<B>, AxisError> {
        if s.layers != self.group {
            return Err(method(Box::new(ShareError::GroupMismatch {
                asked: s.layers,
                calibrated: self.group,
            })));
        }
        let g = ctx.layer / self.group;
        Ok(Segment {
            positions: segment.positions,
            k: self.project(segment.k, g, Side::Keys, s.k_rank)?,
            v: self.project(segment.v, g, Side::Values, s.v_rank)?,
        })
    }

    /// Coefficients plus this layer's share of the group's bases.
    fn footprint(&self, shape: &LayerShape, s: &ShareSetting) -> Footprint {
        compose_footprint(&[s], shape)
    }
}

//! Stages: the steps an expert applies, in order, to the tokens it compresses, and how their
//! bytes compose.
//!
//! A stage transforms one or both sides (K, V) of a segment: a projection narrows each token's
//! width and adds a per-layer basis; quantization fixes how a side is stored. The bytes of a
//! chain of stages follow from each stage's [`SidePlan`] alone, so a solver prices an expert
//! without compressing anything, whichever crates its stages come from.
use crate::Segment;
use crate::{AxisError, Bytes, CompressionAxis, Footprint, KvBackend, LayerShape, ObservationCtx};
use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::Arc;

/// One side of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// Keys.
    Keys,
    /// Values.
    Values,
}

/// What one stage does to one side, for byte planning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SidePlan {
    /// The shape the next stage receives (a projection narrows `head_dim` to its rank).
    pub output: LayerShape,
    /// Bytes held once per layer for this side (a basis, or this layer's share of one).
    pub fixed: Footprint,
    /// The side's stored bytes when this stage decides its storage (quantization); `None`
    /// leaves that to later stages, and a side no stage stores is kept in fp16.
    pub stored: Option<Footprint>,
}

impl SidePlan {
    /// A stage that leaves the side as it is.
    pub fn unchanged(input: &LayerShape) -> Self {
        Self {
            output: *input,
            fixed: Footprint::default(),
            stored: None,
        }
    }

    /// A projection of the side to `rank` coefficients per token onto a basis
    /// `[kv_heads, head_dim, rank]` of `elem`-byte floats shared by `layers` layers (each
    /// charged its share, as [`crate::Basis::bytes`] counts it); `None` leaves the side as is.
    pub fn projected(input: &LayerShape, rank: Option<usize>, elem: usize, layers: usize) -> Self {
        match rank {
            None => Self::unchanged(input),
            Some(r) => Self {
                output: LayerShape {
                    head_dim: r,
                    ..*input
                },
                fixed: Footprint {
                    basis: crate::basis_bytes_per_layer(
                        input.kv_heads * input.head_dim * r * elem,
                        layers,
                    ),
                    ..Footprint::default()
                },
                stored: None,
            },
        }
    }
}

/// The byte plan of a stage's setting: backend-free, so plans are priced without a device.
pub trait PlanStage: Debug + Send + Sync {
    /// How this stage leaves `side`, given the shape it receives.
    fn plan_side(&self, side: Side, input: &LayerShape) -> SidePlan;
}

/// The bytes of a dense `shape` after `stages` in order: per side, the last stage that stores
/// it decides its bytes (fp16 of the final shape when none does, or when a stage reshapes the
/// side after it was stored: its output is new floats), plus every stage's fixed bytes.
pub fn compose_footprint(stages: &[&dyn PlanStage], shape: &LayerShape) -> Footprint {
    let mut total = Footprint::default();
    for side in [Side::Keys, Side::Values] {
        let mut now = *shape;
        let mut stored = None;
        for stage in stages {
            let p = stage.plan_side(side, &now);
            total += p.fixed;
            stored = match p.stored {
                Some(s) => Some(s),
                None if p.output != now => None,
                None => stored,
            };
            now = p.output;
        }
        total += stored.unwrap_or_else(|| Footprint::dense(Bytes((now.numel() * 2) as u64)));
    }
    total
}

/// The shape `side` has after `stages` (what a later stage, such as quantization, receives).
pub fn output_shape(stages: &[&dyn PlanStage], side: Side, shape: &LayerShape) -> LayerShape {
    stages
        .iter()
        .fold(*shape, |now, s| s.plan_side(side, &now).output)
}

/// One configured stage at run time: compresses the history segments of one expert's layers.
pub trait Stage<B: KvBackend>: PlanStage {
    /// Compresses `segment` (dense, or already transformed by the stages before this one).
    fn compress(
        &self,
        segment: Segment<B>,
        ctx: &ObservationCtx<B>,
    ) -> Result<Segment<B>, AxisError>;
}

/// Any [`CompressionAxis`] with one setting, as a [`Stage`]: the adapter through which the
/// router runs built-in and user axes alike.
pub struct Configured<A, S, B> {
    axis: Arc<A>,
    setting: S,
    backend: PhantomData<fn() -> B>,
}

impl<A, S, B> Configured<A, S, B> {
    /// `axis` applied with `setting`.
    pub fn new(axis: Arc<A>, setting: S) -> Self {
        Self {
            axis,
            setting,
            backend: PhantomData,
        }
    }
}

impl<A, S: Debug, B> Debug for Configured<A, S, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Configured").field(&self.setting).finish()
    }
}

impl<A, S: PlanStage, B> PlanStage for Configured<A, S, B>
where
    A: Send + Sync,
{
    fn plan_side(&self, side: Side, input: &LayerShape) -> SidePlan {
        self.setting.plan_side(side, input)
    }
}

impl<B: KvBackend, A: CompressionAxis<B, Setting = S>, S: PlanStage> Stage<B>
    for Configured<A, S, B>
{
    fn compress(
        &self,
        segment: Segment<B>,
        ctx: &ObservationCtx<B>,
    ) -> Result<Segment<B>, AxisError> {
        self.axis.compress(segment, &self.setting, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Halves the width and adds 10 fixed bytes per side.
    #[derive(Debug)]
    struct Halve;
    impl PlanStage for Halve {
        fn plan_side(&self, _: Side, input: &LayerShape) -> SidePlan {
            SidePlan {
                output: LayerShape {
                    head_dim: input.head_dim / 2,
                    ..*input
                },
                fixed: Footprint {
                    basis: Bytes(10),
                    ..Footprint::default()
                },
                stored: None,
            }
        }
    }

    /// Stores keys at one byte per value, leaves values.
    #[derive(Debug)]
    struct ByteKeys;
    impl PlanStage for ByteKeys {
        fn plan_side(&self, side: Side, input: &LayerShape) -> SidePlan {
            SidePlan {
                stored: (side == Side::Keys).then(|| Footprint {
                    codes: Bytes(input.numel() as u64),
                    ..Footprint::default()
                }),
                ..SidePlan::unchanged(input)
            }
        }
    }

    fn shape() -> LayerShape {
        LayerShape {
            batch: 1,
            kv_heads: 2,
            tokens: 8,
            head_dim: 16,
        }
    }

    #[test]
    fn no_stage_is_fp16_of_both_sides() {
        assert_eq!(
            compose_footprint(&[], &shape()).total(),
            Bytes(2 * 2 * 8 * 16 * 2)
        );
    }

    #[test]
    fn stages_compose_in_order() {
        // Halve then store keys: keys at 1 byte × half width, values fp16 × half width.
        let f = compose_footprint(&[&Halve, &ByteKeys], &shape());
        assert_eq!(f.codes, Bytes(2 * 8 * 8));
        assert_eq!(f.dense, Bytes(2 * 8 * 8 * 2));
        assert_eq!(f.basis, Bytes(20));
        // Store keys, then reshape: the projection's output is new fp16 floats.
        let g = compose_footprint(&[&ByteKeys, &Halve], &shape());
        assert_eq!(g.codes, Bytes(0));
        assert_eq!(g.dense, Bytes(2 * 2 * 8 * 8 * 2));
        // A stage that stores nothing after one that stores keeps the stored bytes.
        let h = compose_footprint(&[&ByteKeys, &ByteKeys], &shape());
        assert_eq!(h.codes, Bytes(2 * 8 * 16));
        assert_eq!(
            output_shape(&[&Halve, &Halve], Side::Values, &shape()).head_dim,
            4
        );
    }
}

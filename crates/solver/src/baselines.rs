//! The budgeted baselines that are not solved over the menu: one keep for every layer, or
//! PyramidKV's keeps falling with depth, each matched to the budget by the one shared search
//! ([`Ratio::largest_fitting`]) at 1 % resolution (the menu's six keeps are too coarse for a
//! uniform plan).
use crate::Geometry;
use axis_evict::{EvictSetting, ScorerKind, Selection};
use axis_quant::QuantSetting;
use kv_tensor::{Bytes, Ratio};
use router::{Expert, RoutingPlan};

/// PyramidKV's slope: keep falls linearly from `(1 + s)·k` at the first layer to `(1 − s)·k`
/// at the last.
pub const PYRAMID_SLOPE: f64 = 0.5;

/// AdaKV's guaranteed share of each head's even budget.
pub const ADAKV_MIN_SHARE: f64 = 0.2;

/// The plan's total bytes for a `geo.tokens`-token prompt.
pub fn plan_bytes(plan: &RoutingPlan, geo: &Geometry) -> Bytes {
    plan.layers
        .iter()
        .map(|e| e.footprint(&geo.shape, geo.tokens).total())
        .sum()
}

/// The same expert on every layer, its keep the largest 1 % step that fits `budget`, tokens
/// chosen by `scorer` with `selection`, `quant` applied to what is kept.
pub fn matched_keep(
    scorer: ScorerKind,
    selection: Selection,
    quant: Option<QuantSetting>,
    geo: &Geometry,
    budget: Bytes,
) -> Option<RoutingPlan> {
    Ratio::largest_fitting(
        budget,
        |keep| {
            let evict = EvictSetting::new(scorer, keep).with_selection(selection);
            let expert = Expert {
                evict: Some(evict),
                lowrank: None,
                stages: Vec::new(),
                quant,
                residual: None,
                decode: None,
            };
            Some(RoutingPlan::uniform(expert, geo.layers))
        },
        |p| plan_bytes(p, geo),
    )
}

/// PyramidKV-shaped keeps with `scorer`: layer `l` keeps `k·(1 + s − 2s·l/(L−1))` (clamped to
/// [1 %, 100 %]), `k` the largest mean keep in 1 % steps that fits `budget`.
pub fn pyramid(scorer: ScorerKind, geo: &Geometry, budget: Bytes) -> Option<RoutingPlan> {
    let n = geo.layers.max(2);
    Ratio::largest_fitting(
        budget,
        |k| {
            let layers = (0..geo.layers)
                .map(|l| {
                    let f = 1.0 + PYRAMID_SLOPE - 2.0 * PYRAMID_SLOPE * l as f64 / (n - 1) as f64;
                    let keep = Ratio::new((k.get() * f).clamp(0.01, 1.0)).ok()?;
                    Some(Expert {
                        evict: Some(EvictSetting::new(scorer, keep)),
                        ..Expert::FULL
                    })
                })
                .collect::<Option<Vec<Expert>>>()?;
            Some(RoutingPlan {
                sized_for: None,
                layers,
            })
        },
        |p| plan_bytes(p, geo),
    )
}

/// AdaKV's selection: the layer's budget shared across heads by score.
pub fn adakv() -> Selection {
    Selection::HeadWise {
        min_share: Ratio::new(ADAKV_MIN_SHARE).unwrap_or(Ratio::ONE),
    }
}

/// Tokens per chunk of `chunkkv(<scorer>)`: kvpress's `ChunkKVPress` default.
pub const CHUNK_TOKENS: usize = 20;

/// ChunkKV's span selection with chunks of [`CHUNK_TOKENS`].
pub fn chunkkv() -> Selection {
    Selection::Chunks {
        size: std::num::NonZeroUsize::new(CHUNK_TOKENS).unwrap_or(std::num::NonZeroUsize::MIN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_tensor::{Bits, KvLayout};
    use proptest::prelude::*;

    fn geo(tokens: usize) -> Geometry {
        Geometry::new(KvLayout::new(30, 3, 9, 64).expect("layout"), tokens)
    }

    fn keep(p: &RoutingPlan, l: usize) -> f64 {
        p.layers[l].evict.map_or(1.0, |e| e.keep.get())
    }

    proptest! {
        /// A matched keep fits, and one more percent would not.
        #[test]
        fn matched_keep_is_the_largest_that_fits(tokens in 300usize..4000, denom in 2u64..20, quant in any::<bool>()) {
            let g = geo(tokens);
            let fp16 = 2 * 2 * (30 * 3 * 64 * tokens) as u64;
            let budget = Bytes(fp16 / denom);
            let q = quant.then(|| QuantSetting::new(Bits::try_from(8).unwrap_or(Bits::Full), Bits::try_from(4).unwrap_or(Bits::Full)));
            if let Some(p) = matched_keep(ScorerKind::Snapkv, Selection::TopK, q, &g, budget) {
                prop_assert!(plan_bytes(&p, &g) <= budget);
                let k = keep(&p, 0);
                prop_assert!((0..30).all(|l| keep(&p, l) == k));
                if let Ok(up) = Ratio::new(k + 0.01) {
                    let bigger = RoutingPlan::uniform(Expert { evict: Some(EvictSetting::new(ScorerKind::Snapkv, up)), lowrank: None, stages: Vec::new(), quant: q, residual: None, decode: None }, 30);
                    prop_assert!(plan_bytes(&bigger, &g) > budget);
                }
            }
        }

        /// A pyramid fits and keeps no more at a deeper layer than at a shallower one.
        #[test]
        fn pyramid_fits_and_falls_with_depth(tokens in 300usize..4000, denom in 2u64..20) {
            let g = geo(tokens);
            let budget = Bytes(2 * 2 * (30 * 3 * 64 * tokens) as u64 / denom);
            if let Some(p) = pyramid(ScorerKind::Snapkv, &g, budget) {
                prop_assert!(plan_bytes(&p, &g) <= budget);
                prop_assert!((1..30).all(|l| keep(&p, l) <= keep(&p, l - 1)));
            }
        }
    }
}

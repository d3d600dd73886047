//! The default expert menu.
use axis_evict::{EvictSetting, ScorerKind};
use axis_lowrank::LowRankSetting;
use axis_quant::QuantSetting;
use kv_tensor::{Bits, Ratio};
use router::{CustomStage, Expert};

/// keep {1.0, 0.9, 0.75, 0.5, 0.25, 0.1} × K bits {16, 8, 4, 2} × V bits {16, 8, 4, 2}: the
/// MoE-nD menu extended with 2-bit, every eviction with the same `scorer`.
pub fn default_menu(scorer: ScorerKind) -> Vec<Expert> {
    let keeps = [1.0, 0.9, 0.75, 0.5, 0.25, 0.1];
    let bits: Vec<Bits> = [16u8, 8, 4, 2]
        .iter()
        .filter_map(|&b| Bits::try_from(b).ok())
        .collect();
    let mut menu = Vec::new();
    for keep in keeps {
        for &k in &bits {
            for &v in &bits {
                let evict = (keep < 1.0)
                    .then(|| Ratio::new(keep).map(|r| EvictSetting::new(scorer, r)).ok())
                    .flatten();
                let quant = (k != Bits::Full || v != Bits::Full).then_some(QuantSetting::new(k, v));
                menu.push(Expert {
                    evict,
                    lowrank: None,
                    stages: Vec::new(),
                    quant,
                    residual: None,
                    decode: None,
                });
            }
        }
    }
    menu
}

/// Residual windows of [`window_menu`]: smaller than the default 64 tokens, which alone is
/// 1/16 of a 1k-token layer.
pub const SMALL_WINDOWS: [usize; 2] = [16, 0];

/// Experts whose residual window is smaller than the default, so budgets of 1/14 and below are
/// plannable on short prompts: keep {0.25, 0.1} × (K, V) bits {(4, 4), (4, 2), (2, 2)} × window
/// [`SMALL_WINDOWS`], evicting with `scorer`.
pub fn window_menu(scorer: ScorerKind) -> Vec<Expert> {
    let bits = |b: u8| Bits::try_from(b).unwrap_or(Bits::Full);
    let mut menu = Vec::new();
    for keep in [0.25, 0.1] {
        for (k, v) in [(4, 4), (4, 2), (2, 2)] {
            for w in SMALL_WINDOWS {
                menu.push(Expert {
                    evict: Ratio::new(keep).map(|r| EvictSetting::new(scorer, r)).ok(),
                    quant: Some(QuantSetting::new(bits(k), bits(v))),
                    residual: Some(w),
                    ..Expert::FULL
                });
            }
        }
    }
    menu
}

/// The scorers [`scorer_menu`] crosses with keep and bits besides the menu's own: every
/// shipped scorer except the random control.
pub const ROUTED_SCORERS: [ScorerKind; 7] = [
    ScorerKind::Snapkv,
    ScorerKind::Tova,
    ScorerKind::H2o,
    ScorerKind::Trig,
    ScorerKind::Knorm,
    ScorerKind::Streaming,
    ScorerKind::Kvzip,
];

/// The scorer axis (PolyKV inside MoE-nD): each of `scorers` × keep {0.5, 0.25, 0.1} ×
/// (K, V) bits {(16, 16), (4, 4), (4, 2), (2, 2)}, so the solver can pick a layer's scorer
/// together with its keep and bits.
///
/// Why this grid and not the default menu's whole 6 × 4 × 4: a scorer matters only where a
/// layer evicts much (at keep 0.9 and 0.75 every scorer keeps nearly the same tokens), and the
/// plans solved at 1/4 to 1/14 use the symmetric and V-lighter bit pairs. Twelve experts per
/// scorer keep the calibration of the default menu within its time budget (a full cross would
/// calibrate 80 experts per scorer).
pub fn scorer_menu(scorers: &[ScorerKind]) -> Vec<Expert> {
    let bits = |b: u8| Bits::try_from(b).unwrap_or(Bits::Full);
    let mut menu = Vec::new();
    for &scorer in scorers {
        for keep in [0.5, 0.25, 0.1] {
            for (k, v) in [(16, 16), (4, 4), (4, 2), (2, 2)] {
                let quant = (k != 16 || v != 16).then(|| QuantSetting::new(bits(k), bits(v)));
                menu.push(Expert {
                    evict: Ratio::new(keep).map(|r| EvictSetting::new(scorer, r)).ok(),
                    quant,
                    ..Expert::FULL
                });
            }
        }
    }
    menu
}

/// Rank of projected keys in [`rank_menu`]: keys keep 89–97% of their variance at rank 32 on
/// SmolLM2 (values only 74–94%, so values are not projected).
pub const KEY_RANK: usize = 32;

/// The low-rank extension for `hetero+rank`: keys projected to [`KEY_RANK`] × keep
/// {1.0, 0.5, 0.25, 0.1} × K bits {16, 4} × V bits {16, 4, 2}.
pub fn rank_menu(scorer: ScorerKind) -> Vec<Expert> {
    extension_menu(
        scorer,
        &Expert {
            lowrank: Some(LowRankSetting {
                k_rank: Some(KEY_RANK),
                v_rank: None,
            }),
            ..Expert::FULL
        },
    )
}

/// The extension menu of a registered axis' `stage` (for `hetero+<axis>`): the same grid as
/// [`rank_menu`] with the stage in place of the projection.
pub fn stage_menu(scorer: ScorerKind, stage: CustomStage) -> Vec<Expert> {
    extension_menu(
        scorer,
        &Expert {
            stages: vec![stage],
            ..Expert::FULL
        },
    )
}

/// `base` × keep {1.0, 0.5, 0.25, 0.1} × K bits {16, 4} × V bits {16, 4, 2}.
fn extension_menu(scorer: ScorerKind, base: &Expert) -> Vec<Expert> {
    let bits = |b: u8| Bits::try_from(b).unwrap_or(Bits::Full);
    let mut menu = Vec::new();
    for keep in [1.0, 0.5, 0.25, 0.1] {
        for k in [16, 4] {
            for v in [16, 4, 2] {
                let evict = (keep < 1.0)
                    .then(|| Ratio::new(keep).map(|r| EvictSetting::new(scorer, r)).ok())
                    .flatten();
                menu.push(Expert {
                    evict,
                    quant: Some(QuantSetting::new(bits(k), bits(v))),
                    ..base.clone()
                });
            }
        }
    }
    menu
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Geometry, Method};
    use kv_tensor::KvLayout;

    /// At 1024 tokens of SmolLM2's geometry, the default window alone (64 of 1024 tokens in
    /// fp16) makes 1/14 infeasible; the small-window experts make 1/14 and 1/20 plannable, and
    /// their plans hold the budget.
    #[test]
    fn small_windows_make_one_in_fourteen_plannable_at_1k() {
        let tokens = 1024;
        let geo = Geometry::new(KvLayout::new(30, 3, 9, 64).expect("layout"), tokens);
        let fp16 = (2 * 30 * 3 * tokens * 64 * 2) as u64;
        let base = default_menu(ScorerKind::Snapkv);
        let mut with = base.clone();
        with.extend(window_menu(ScorerKind::Snapkv));
        let loss = |_: usize, _: usize| 1.0;
        let plan = |menu: &[Expert], d: u64| Method::Hetero.plan(menu, &loss, &geo, fp16 / d, true);
        assert!(
            plan(&base, 14).is_err(),
            "1/14 at 1k was infeasible with the 64-token window"
        );
        for d in [14, 20] {
            let p = plan(&with, d).expect("plannable with small windows");
            assert!(p.bytes.get() <= fp16 / d);
            assert!(
                p.plan
                    .layers
                    .iter()
                    .any(|e| e.residual() < router::RESIDUAL)
            );
        }
    }
}

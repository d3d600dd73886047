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

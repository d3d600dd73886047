//! The default expert menu.
use axis_evict::{EvictSetting, ScorerKind};
use axis_quant::QuantSetting;
use kv_tensor::{Bits, Ratio};
use router::Expert;

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
                menu.push(Expert { evict, quant });
            }
        }
    }
    menu
}

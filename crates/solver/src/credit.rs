//! How much of a routed scorer's measured gain the solver believes.
//!
//! The scorer axis offers each layer eight scorers at every (keep, bits). Taking the smallest of
//! eight noisy means per layer favours whichever scorer was lucky on one calibration passage:
//! with the mean alone, hetero routed TOVA to nine layers at 1/8 and lost to the same menu
//! with one scorer (README, "Quality at ≥ 10×"). So a routed scorer is credited only with the
//! smallest gain it shows over its *twin* — the same expert with the menu's own scorer — on any
//! passage: a gain every passage shows counts at its weakest, and a gain that one passage
//! carries while another reverses it becomes a loss. With one passage this is the mean.
//!
//! KVzip is credited at its mean ([`MEAN_CREDITED`]). The proxy is an attention-output error,
//! and the attention-statistics scorers pick tokens by the very mass it weighs, so their gains
//! on it are the suspect ones; KVzip ranks by reconstruction, and its mean gains carried to the
//! tasks at 1/14 (README, "Quality at ≥ 10×") where the worst-passage rule discarded them.
use axis_evict::ScorerKind;
use router::Expert;

/// `loss[layer][expert]` as the solver should see it: `mean` for the menu scorer's experts and
/// for experts without a twin; for a routed scorer's expert, its twin's mean less the smallest
/// gain over that twin on any of `each[passage][layer][expert]`. `each` empty (a table without
/// per-passage losses) leaves `mean` as it is.
pub fn credited_losses(
    menu: &[Expert],
    each: &[Vec<Vec<f64>>],
    mean: &[Vec<f64>],
) -> Vec<Vec<f64>> {
    let mut out = mean.to_vec();
    let Some(home) = menu_scorer(menu) else {
        return out;
    };
    if each.is_empty() {
        return out;
    }
    for (e, t) in twins(menu, home) {
        for (l, row) in out.iter_mut().enumerate() {
            let least_gain = each
                .iter()
                .map(|p| p[l][t] - p[l][e])
                .fold(f64::INFINITY, f64::min);
            row[e] = mean[l][t] - least_gain;
        }
    }
    out
}

/// Scorers whose gains are credited at their mean: those that do not rank by attention
/// statistics.
pub const MEAN_CREDITED: [ScorerKind; 1] = [ScorerKind::Kvzip];

/// The menu's own scorer: that of its first evicting expert, as [`crate::Method::plan`] reads it.
pub fn menu_scorer(menu: &[Expert]) -> Option<ScorerKind> {
    menu.iter().find_map(|e| e.evict.map(|s| s.scorer))
}

/// `(expert, twin)` index pairs: every expert evicting with another scorer than `home` (and
/// not one of [`MEAN_CREDITED`]) whose copy with `home` is in the menu.
fn twins(menu: &[Expert], home: ScorerKind) -> Vec<(usize, usize)> {
    menu.iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let s = e
                .evict
                .filter(|s| s.scorer != home && !MEAN_CREDITED.contains(&s.scorer))?;
            let twin = Expert {
                evict: Some(axis_evict::EvictSetting { scorer: home, ..s }),
                ..e.clone()
            };
            menu.iter().position(|m| *m == twin).map(|t| (i, t))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{default_menu, scorer_menu};
    use proptest::prelude::*;

    fn menu() -> Vec<Expert> {
        let mut m = default_menu(ScorerKind::ExpectedAttention);
        m.extend(scorer_menu(&[ScorerKind::Tova, ScorerKind::Kvzip]));
        m
    }

    fn mean_of(each: &[Vec<Vec<f64>>]) -> Vec<Vec<f64>> {
        crate::calibrate::mean_over_passages(each, each[0].len(), each[0][0].len())
    }

    #[test]
    fn every_routed_expert_has_its_twin_in_the_default_menu() {
        let m = menu();
        let routed = m
            .iter()
            .filter(|e| {
                e.evict
                    .is_some_and(|s| s.scorer != ScorerKind::ExpectedAttention)
            })
            .count();
        assert_eq!(routed, 24);
        // TOVA's twelve; KVzip's are credited at their mean.
        assert_eq!(twins(&m, ScorerKind::ExpectedAttention).len(), 12);
    }

    /// A scorer ahead on every passage stays ahead of its twin; one that a single passage puts
    /// ahead (and the mean too) is credited behind it.
    #[test]
    fn only_gains_every_passage_shows_are_credited() {
        let m = menu();
        let (e, t) = twins(&m, ScorerKind::ExpectedAttention)[0];
        let (f, u) = twins(&m, ScorerKind::ExpectedAttention)[1];
        let mut each = vec![vec![vec![1.0; m.len()]]; 3];
        // e: 0.1 better than its twin on every passage.
        for p in &mut each {
            p[0][e] = 0.9;
        }
        // f: 0.9 better on one passage, 0.1 worse on two: better on average.
        each[0][0][f] = 0.1;
        each[1][0][f] = 1.1;
        each[2][0][f] = 1.1;
        let mean = mean_of(&each);
        assert!(mean[0][f] < mean[0][u]);
        let c = credited_losses(&m, &each, &mean);
        assert!((c[0][e] - 0.9).abs() < 1e-12 && c[0][e] < c[0][t]);
        assert!((c[0][f] - 1.1).abs() < 1e-12 && c[0][f] > c[0][u]);
        assert_eq!(c[0][t], mean[0][t]);
    }

    proptest! {
        /// Credit never makes an expert look better than its mean, leaves the menu scorer's
        /// experts alone, and with one passage changes nothing.
        #[test]
        fn credit_is_never_more_than_the_mean(
            passages in 1usize..4,
            seed in proptest::collection::vec(0.0f64..2.0, 64),
        ) {
            let m = menu();
            let each: Vec<Vec<Vec<f64>>> = (0..passages)
                .map(|p| vec![(0..m.len()).map(|e| seed[(p * 31 + e * 7) % 64]).collect()])
                .collect();
            let mean = mean_of(&each);
            let c = credited_losses(&m, &each, &mean);
            for (e, x) in m.iter().enumerate() {
                prop_assert!(c[0][e] >= mean[0][e] - 1e-12);
                let own = x.evict.is_none_or(|s| {
                    s.scorer == ScorerKind::ExpectedAttention || MEAN_CREDITED.contains(&s.scorer)
                });
                if own || passages == 1 {
                    prop_assert!((c[0][e] - mean[0][e]).abs() < 1e-12);
                }
            }
        }
    }
}

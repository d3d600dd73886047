//! The methods compared by `eval`, each turned into per-layer caches.
use crate::backend::B;
use anyhow::Result;
use axis_evict::{EvictSetting, ScorerKind};
use axis_quant::QuantSetting;
use kv_tensor::{Bits, FullCache, LayerCache, LayerShape, Ratio};
use router::{Expert, RoutedCache, RoutingPlan};
use solver::{Geometry, Method, SensitivityTable};

/// A method at a budget, ready to build caches.
pub struct Entry {
    /// Report name.
    pub name: String,
    /// Budget label (`1/8`), or `-` for budget-free methods.
    pub budget: String,
    /// The plan (`None`: the uncompressed f32 reference cache).
    pub plan: Option<RoutingPlan>,
}

impl Entry {
    /// Fresh caches, one per layer.
    pub fn caches(&self, layers: usize) -> Vec<Box<dyn LayerCache<B>>> {
        match &self.plan {
            None => (0..layers)
                .map(|_| Box::new(FullCache::<B>::new()) as Box<dyn LayerCache<B>>)
                .collect(),
            Some(p) => p
                .layers
                .iter()
                .map(|e| Box::new(RoutedCache::<B>::new(*e)) as Box<dyn LayerCache<B>>)
                .collect(),
        }
    }
}

fn bits(b: u8) -> Bits {
    Bits::try_from(b).unwrap_or(Bits::Full)
}

/// Largest uniform keep (1% steps) whose bytes fit the budget, with `quant` on every layer.
fn matched_keep(
    scorer: ScorerKind,
    quant: Option<QuantSetting>,
    geo: &Geometry,
    budget: u64,
) -> Option<Expert> {
    (1..=100).rev().find_map(|p| {
        let e = Expert {
            evict: Some(EvictSetting::new(
                scorer,
                Ratio::new(p as f64 / 100.0).ok()?,
            )),
            quant,
        };
        (e.footprint(&geo.shape, geo.tokens).total().get() * geo.layers as u64 <= budget)
            .then_some(e)
    })
}

/// Every method at every budget.
pub fn entries(
    table: &SensitivityTable,
    geo: &Geometry,
    budgets: &[(String, u64)],
    quick: bool,
    scorers: &[ScorerKind],
) -> Result<Vec<Entry>> {
    let mut out = vec![Entry {
        name: "full".into(),
        budget: "-".into(),
        plan: None,
    }];
    for (name, q) in [
        ("kivi-4", QuantSetting::new(bits(4), bits(4))),
        ("kivi-2", QuantSetting::new(bits(2), bits(2))),
    ] {
        out.push(Entry {
            name: name.into(),
            budget: "-".into(),
            plan: Some(RoutingPlan::uniform(
                Expert {
                    evict: None,
                    quant: Some(q),
                },
                geo.layers,
            )),
        });
    }
    // 1d and 2d_uniform are uniform by definition: their keep is matched to the budget at 1%
    // resolution (the menu's six keeps are too coarse for a uniform plan), with the same scorer
    // as the calibrated menu. 2d and hetero are solved over the calibrated menu.
    let menu_scorer = table
        .menu
        .iter()
        .find_map(|e| e.evict.map(|s| s.scorer))
        .unwrap_or(ScorerKind::ExpectedAttention);
    let methods: &[Method] = if quick {
        &[Method::Hetero]
    } else {
        &[Method::TwoD, Method::Hetero]
    };
    for (label, bytes) in budgets {
        let loss = |l: usize, e: usize| table.loss[l][e];
        let uniform: &[(&str, Option<QuantSetting>)] = if quick {
            &[("1d", None)]
        } else {
            &[
                ("1d", None),
                ("2d_uniform", Some(QuantSetting::new(bits(8), bits(4)))),
            ]
        };
        for (name, q) in uniform {
            match matched_keep(menu_scorer, *q, geo, *bytes) {
                Some(e) => out.push(Entry {
                    name: (*name).into(),
                    budget: label.clone(),
                    plan: Some(RoutingPlan::uniform(e, geo.layers)),
                }),
                None => eprintln!("{name} at {label}: no uniform keep fits"),
            }
        }
        for m in methods {
            match m.plan(&table.menu, &loss, geo, *bytes, true) {
                Ok((plan, _)) => out.push(Entry {
                    name: m.name().into(),
                    budget: label.clone(),
                    plan: Some(plan),
                }),
                Err(e) => eprintln!("{} at {label}: {e}", m.name()),
            }
        }
        for &s in scorers {
            match matched_keep(s, None, geo, *bytes) {
                Some(e) => out.push(Entry {
                    name: format!("{s:?}").to_lowercase(),
                    budget: label.clone(),
                    plan: Some(RoutingPlan::uniform(e, geo.layers)),
                }),
                None => eprintln!("{s:?} at {label}: no uniform keep fits"),
            }
        }
    }
    Ok(out)
}

/// The layer shape of the model after `tokens` tokens.
pub fn geometry(layout: kv_tensor::KvLayout, tokens: usize) -> Geometry {
    Geometry {
        layers: layout.layers,
        shape: LayerShape {
            batch: 1,
            kv_heads: layout.kv_heads,
            tokens,
            head_dim: layout.head_dim,
        },
        tokens,
    }
}

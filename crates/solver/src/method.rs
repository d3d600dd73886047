//! The named routing methods, as restrictions of one menu solved against one predictor.
use crate::{Problem, Solution, SolverError, exact, greedy};
use kv_tensor::LayerShape;
use router::{Expert, RoutingPlan};
use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// What a plan is for: `layers` layers of `shape` after a `tokens`-token prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    /// Decoder layers.
    pub layers: usize,
    /// One layer's KV shape (its token count is ignored).
    pub shape: LayerShape,
    /// Prompt tokens.
    pub tokens: usize,
}

/// How a plan is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Method {
    /// One keep ratio for every layer, 16-bit.
    #[serde(rename = "1d")]
    OneD,
    /// One keep ratio for every layer, K8/V4 everywhere.
    #[serde(rename = "2d_uniform")]
    TwoDUniform,
    /// One keep ratio for every layer, per-layer K/V bits from the solver.
    #[serde(rename = "2d")]
    TwoD,
    /// Per-layer keep, K bits and V bits jointly from the solver (MoE-nD).
    #[serde(rename = "hetero")]
    Hetero,
    /// `hetero` plus the low-rank axis (experts that project keys).
    #[serde(rename = "hetero+rank")]
    HeteroRank,
}

impl Method {
    /// Every method.
    pub const ALL: [Method; 5] = [
        Method::OneD,
        Method::TwoDUniform,
        Method::TwoD,
        Method::Hetero,
        Method::HeteroRank,
    ];

    /// The CLI / report name.
    pub fn name(self) -> &'static str {
        match self {
            Method::OneD => "1d",
            Method::TwoDUniform => "2d_uniform",
            Method::TwoD => "2d",
            Method::Hetero => "hetero",
            Method::HeteroRank => "hetero+rank",
        }
    }

    /// The least-loss plan of this method under `budget` bytes. `loss(l, e)` indexes `menu`.
    pub fn plan(
        self,
        menu: &[Expert],
        loss: &dyn Fn(usize, usize) -> f64,
        geometry: &Geometry,
        budget: u64,
        use_exact: bool,
    ) -> Result<(RoutingPlan, Solution), SolverError> {
        let Geometry {
            layers,
            shape,
            tokens,
        } = *geometry;
        let bytes: Vec<u64> = menu
            .iter()
            .map(|e| e.footprint(&shape, tokens).total().get())
            .collect();
        let keep = |e: &Expert| e.evict.map_or(1.0, |s| s.keep.get());
        let bits = |e: &Expert| {
            e.quant
                .map_or((16, 16), |q| (q.k_bits.get(), q.v_bits.get()))
        };
        // Only hetero+rank may use experts that project.
        let plain: Vec<usize> = (0..menu.len())
            .filter(|&i| self == Method::HeteroRank || menu[i].lowrank.is_none())
            .collect();
        // Candidate groups: each group is a set of allowed experts; the best group wins.
        let groups: Vec<Vec<usize>> = match self {
            Method::Hetero | Method::HeteroRank => vec![plain],
            Method::TwoD => distinct(plain.iter().map(|&i| keep(&menu[i])))
                .into_iter()
                .map(|k| {
                    plain
                        .iter()
                        .copied()
                        .filter(|&i| keep(&menu[i]) == k)
                        .collect()
                })
                .collect(),
            Method::OneD => plain
                .into_iter()
                .filter(|&i| bits(&menu[i]) == (16, 16))
                .map(|i| vec![i])
                .collect(),
            Method::TwoDUniform => plain
                .into_iter()
                .filter(|&i| bits(&menu[i]) == (8, 4))
                .map(|i| vec![i])
                .collect(),
        };
        let mut best: Option<(Vec<usize>, Solution)> = None;
        let mut min_bytes = u64::MAX;
        for g in groups {
            let p = Problem {
                layers: (0..layers)
                    .map(|l| g.iter().map(|&i| (bytes[i], loss(l, i))).collect())
                    .collect(),
            };
            let solved = if use_exact {
                exact::solve(&p, budget)
            } else {
                greedy::solve(&p, budget)
            };
            match solved {
                Ok(s) if best.as_ref().is_none_or(|(_, b)| s.loss < b.loss) => best = Some((g, s)),
                Ok(_) => {}
                Err(SolverError::Infeasible { min_bytes: m, .. }) => min_bytes = min_bytes.min(m),
                Err(e) => return Err(e),
            }
        }
        let (g, s) = best.ok_or(SolverError::Infeasible { budget, min_bytes })?;
        let plan = RoutingPlan {
            layers: s.choice.iter().map(|&c| menu[g[c]]).collect(),
        };
        Ok((plan, s))
    }
}

fn distinct(it: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = Vec::new();
    for x in it {
        if !v.contains(&x) {
            v.push(x);
        }
    }
    v
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("unknown method {s:?}; one of 1d, 2d_uniform, 2d, hetero, hetero+rank")
            })
    }
}

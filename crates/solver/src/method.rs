//! The named routing methods, as restrictions of one menu solved against one predictor.
use crate::{Problem, Solution, SolverError, baselines, exact, greedy};
use axis_evict::{ScorerKind, Selection};
use axis_quant::QuantSetting;
use kv_tensor::{Bits, Bytes, KvLayout, LayerShape};
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

impl Geometry {
    /// A model of `layout` after a `tokens`-token prompt (batch 1).
    pub fn new(layout: KvLayout, tokens: usize) -> Self {
        Self {
            layers: layout.layers,
            shape: layout.layer_shape(1, tokens),
            tokens,
        }
    }
}

/// How a plan is chosen. Every named method in `solve`, `generate --plan` and `eval` is one of
/// these, so a name means the same plan everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Method {
    /// One keep for every layer, 16-bit, with the menu's scorer; keep matched to the budget at
    /// 1 % resolution.
    OneD,
    /// One keep for every layer, K8/V4 everywhere, with the menu's scorer; keep matched to the
    /// budget at 1 % resolution.
    TwoDUniform,
    /// One keep for every layer (from the menu), per-layer K/V bits from the solver.
    TwoD,
    /// Per-layer keep, K bits, V bits and scorer jointly from the solver (MoE-nD with
    /// PolyKV's per-layer scorer choice).
    Hetero,
    /// `hetero` with one scorer for every evicting layer (MoE-nD as its paper defines it):
    /// `hetero(expected_attention)` is `hetero` without the scorer axis.
    HeteroScorer(ScorerKind),
    /// `hetero` plus the low-rank axis (experts that project keys).
    HeteroRank,
    /// `hetero` plus the experts whose stages all come from one registered axis
    /// (`hetero+share`): how a new axis is compared with the rest at matched bytes.
    HeteroStage(&'static str),
    /// One scorer's uniform keep, 16-bit, matched to the budget (a kvpress press).
    Single(ScorerKind),
    /// AdaKV over a scorer: a uniform layer budget shared across heads by score.
    AdaKv(ScorerKind),
    /// ChunkKV over a scorer: a uniform keep of whole spans of consecutive tokens.
    ChunkKv(ScorerKind),
    /// PyramidKV over a scorer: keeps fall linearly with depth, their mean matched.
    Pyramid(ScorerKind),
}

/// A method's plan under a budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// One expert per layer.
    pub plan: RoutingPlan,
    /// Its bytes for the planning geometry.
    pub bytes: Bytes,
    /// The predicted loss, for methods solved over the menu (a baseline's experts need not be
    /// in it).
    pub predicted_loss: Option<f64>,
}

impl Method {
    /// The methods solved over the calibrated menu.
    pub const SOLVED: [Method; 3] = [Method::TwoD, Method::Hetero, Method::HeteroRank];

    /// The CLI / report name: `hetero`, `hetero(snapkv)`, `snapkv`, `adakv(snapkv)`,
    /// `chunkkv(snapkv)`, `pyramid(snapkv)`, `hetero+share`.
    pub fn name(self) -> String {
        match self {
            Method::OneD => "1d".into(),
            Method::TwoDUniform => "2d_uniform".into(),
            Method::TwoD => "2d".into(),
            Method::Hetero => "hetero".into(),
            Method::HeteroScorer(s) => format!("hetero({s})"),
            Method::HeteroRank => "hetero+rank".into(),
            Method::HeteroStage(axis) => format!("hetero+{axis}"),
            Method::Single(s) => s.name().into(),
            Method::AdaKv(s) => format!("adakv({s})"),
            Method::ChunkKv(s) => format!("chunkkv({s})"),
            Method::Pyramid(s) => format!("pyramid({s})"),
        }
    }

    /// The least-loss plan of this method under `budget` bytes. `loss(l, e)` indexes `menu`;
    /// `1d` and `2d_uniform` evict with the menu's scorer.
    pub fn plan(
        self,
        menu: &[Expert],
        loss: &dyn Fn(usize, usize) -> f64,
        geometry: &Geometry,
        budget: u64,
        use_exact: bool,
    ) -> Result<Planned, SolverError> {
        let menu_scorer = crate::menu_scorer(menu).unwrap_or(ScorerKind::ExpectedAttention);
        let k8v4 = Bits::try_from(8)
            .and_then(|k| Bits::try_from(4).map(|v| QuantSetting::new(k, v)))
            .ok();
        let b = Bytes(budget);
        let baseline = match self {
            Method::TwoD
            | Method::Hetero
            | Method::HeteroScorer(_)
            | Method::HeteroRank
            | Method::HeteroStage(_) => {
                return self.solve(menu, menu_scorer, loss, geometry, budget, use_exact);
            }
            Method::OneD => {
                baselines::matched_keep(menu_scorer, Selection::TopK, None, geometry, b)
            }
            Method::TwoDUniform => {
                baselines::matched_keep(menu_scorer, Selection::TopK, k8v4, geometry, b)
            }
            Method::Single(s) => baselines::matched_keep(s, Selection::TopK, None, geometry, b),
            Method::AdaKv(s) => baselines::matched_keep(s, baselines::adakv(), None, geometry, b),
            Method::ChunkKv(s) => {
                baselines::matched_keep(s, baselines::chunkkv(), None, geometry, b)
            }
            Method::Pyramid(s) => baselines::pyramid(s, geometry, b),
        };
        let plan = baseline.ok_or(SolverError::NoKeepFits { budget })?;
        // A baseline's loss is predicted only when every expert it uses is in the menu.
        let predicted_loss = plan
            .layers
            .iter()
            .enumerate()
            .map(|(l, e)| menu.iter().position(|m| m == e).map(|i| loss(l, i)))
            .sum::<Option<f64>>();
        Ok(Planned {
            bytes: baselines::plan_bytes(&plan, geometry),
            plan,
            predicted_loss,
        })
    }

    /// The menu-solved methods: each candidate group of allowed experts is a knapsack over
    /// layers; the best group wins.
    fn solve(
        self,
        menu: &[Expert],
        menu_scorer: ScorerKind,
        loss: &dyn Fn(usize, usize) -> f64,
        geometry: &Geometry,
        budget: u64,
        use_exact: bool,
    ) -> Result<Planned, SolverError> {
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
        let plain: Vec<usize> = (0..menu.len())
            .filter(|&i| self.allows(&menu[i], menu_scorer))
            .collect();
        let groups: Vec<Vec<usize>> = match self {
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
            _ => vec![plain],
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
        Ok(Planned {
            plan: RoutingPlan {
                sized_for: None,
                layers: s.choice.iter().map(|&c| menu[g[c]].clone()).collect(),
            },
            bytes: s.bytes,
            predicted_loss: Some(s.loss),
        })
    }
}

impl Method {
    /// Whether a solved method may route `e`: projecting experts only in `hetero+rank`, a
    /// registered axis' stages only in `hetero+<axis>`, one scorer (the menu's in `2d`) in
    /// `2d` and `hetero(<scorer>)`, every other expert everywhere.
    fn allows(self, e: &Expert, menu_scorer: ScorerKind) -> bool {
        let own = match self {
            Method::HeteroStage(axis) => {
                e.lowrank.is_none() && e.stages.iter().all(|s| s.setting().axis() == axis)
            }
            _ => e.stages.is_empty(),
        };
        let scorer = match self {
            Method::TwoD => Some(menu_scorer),
            Method::HeteroScorer(s) => Some(s),
            _ => None,
        };
        let scored = scorer.is_none_or(|s| e.evict.is_none_or(|ev| ev.scorer == s));
        own && scored && (e.lowrank.is_none() || self == Method::HeteroRank)
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
    /// `1d`, `2d_uniform`, `2d`, `hetero`, `hetero+rank`, `hetero+<registered axis>`, a scorer
    /// (`snapkv`), `adakv(<scorer>)`, `chunkkv(<scorer>)` or `pyramid(<scorer>)`.
    fn from_str(s: &str) -> Result<Self, String> {
        let named = [
            Method::OneD,
            Method::TwoDUniform,
            Method::TwoD,
            Method::Hetero,
            Method::HeteroRank,
        ];
        if let Some(m) = named.into_iter().find(|m| m.name() == s) {
            return Ok(m);
        }
        if let Some(axis) = s.strip_prefix("hetero+")
            && let Some(&a) = router::registered_stages().iter().find(|&&a| a == axis)
        {
            return Ok(Method::HeteroStage(a));
        }
        let wrapped = |prefix: &str| {
            s.strip_prefix(prefix)
                .and_then(|r| r.strip_prefix('('))
                .and_then(|r| r.strip_suffix(')'))
        };
        let scorer = |name: &str| name.parse::<ScorerKind>();
        if let Some(inner) = wrapped("adakv") {
            return scorer(inner).map(Method::AdaKv);
        }
        if let Some(inner) = wrapped("hetero") {
            return scorer(inner).map(Method::HeteroScorer);
        }
        if let Some(inner) = wrapped("pyramid") {
            return scorer(inner).map(Method::Pyramid);
        }
        if let Some(inner) = wrapped("chunkkv") {
            return scorer(inner).map(Method::ChunkKv);
        }
        scorer(s).map(Method::Single).map_err(|_| {
            format!(
                "unknown method {s:?}; one of 1d, 2d_uniform, 2d, hetero, hetero(<scorer>), \
                 hetero+rank, hetero+<axis> for a registered axis ({}), a scorer (snapkv, h2o, …), \
                 adakv(<scorer>), chunkkv(<scorer>), pyramid(<scorer>)",
                router::registered_stages().join(", ")
            )
        })
    }
}

impl TryFrom<String> for Method {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Method> for String {
    fn from(m: Method) -> String {
        m.name()
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_to_its_method() {
        let mut all = vec![
            Method::OneD,
            Method::TwoDUniform,
            Method::TwoD,
            Method::Hetero,
            Method::HeteroRank,
        ];
        for s in ScorerKind::ALL {
            all.extend([
                Method::HeteroScorer(s),
                Method::Single(s),
                Method::AdaKv(s),
                Method::ChunkKv(s),
                Method::Pyramid(s),
            ]);
        }
        for m in all {
            assert_eq!(m.name().parse::<Method>(), Ok(m), "{m}");
        }
        for bad in [
            "",
            "adakv",
            "adakv()",
            "pyramid(x)",
            "hetero+",
            "snapkv)",
            "hetero(x)",
        ] {
            assert!(bad.parse::<Method>().is_err(), "{bad:?} parsed");
        }
    }

    /// The scorer axis: with a menu of two scorers whose losses favour a different one on
    /// alternate layers, `hetero` routes each layer to its better scorer, `hetero(<s>)` and
    /// `2d` stay on one, and every plan holds the budget.
    #[test]
    fn hetero_picks_a_scorer_per_layer_and_one_scorer_methods_do_not() {
        let tokens = 2048;
        let geo = Geometry::new(KvLayout::new(6, 3, 9, 64).expect("layout"), tokens);
        let (a, b) = (ScorerKind::ExpectedAttention, ScorerKind::Snapkv);
        let mut menu = crate::default_menu(a);
        menu.extend(crate::scorer_menu(&[b]));
        let scorer_of = |i: usize| menu[i].evict.map(|e| e.scorer);
        // Evicting experts lose 1; the favoured scorer of a layer loses half as much.
        let loss = |l: usize, i: usize| match scorer_of(i) {
            None => 0.0,
            Some(s) if (s == b) == l.is_multiple_of(2) => 0.5,
            Some(_) => 1.0,
        };
        let fp16 = (2 * 6 * 3 * tokens * 64 * 2) as u64;
        let plan = |m: Method| {
            m.plan(&menu, &loss, &geo, fp16 / 8, true)
                .expect("plannable")
        };
        let scorers = |p: &Planned| -> Vec<Option<ScorerKind>> {
            p.plan
                .layers
                .iter()
                .map(|e| e.evict.map(|s| s.scorer))
                .collect()
        };
        let hetero = plan(Method::Hetero);
        assert!(hetero.bytes.get() <= fp16 / 8);
        for (l, s) in scorers(&hetero).into_iter().enumerate() {
            if let Some(s) = s {
                assert_eq!(s == b, l.is_multiple_of(2), "layer {l} routed to {s}");
            }
        }
        for (m, only) in [(Method::HeteroScorer(b), b), (Method::TwoD, a)] {
            let p = plan(m);
            assert!(p.bytes.get() <= fp16 / 8);
            assert!(scorers(&p).into_iter().flatten().all(|s| s == only), "{m}");
            assert!(p.predicted_loss >= hetero.predicted_loss, "{m}");
        }
    }
}

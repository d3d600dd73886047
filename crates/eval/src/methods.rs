//! The methods registry: what `eval` compares, each turned into per-layer caches. Every
//! budgeted routing method is a [`solver::Method`], so a name is the same plan here, in
//! `solve` and in `generate --plan`.
use axis_evict::ScorerKind;
use axis_quant::QuantSetting;
use axis_quant::moqae::learned::{LearnedBudgeted, LearnedRouter};
use axis_quant::moqae::{BudgetedRouter, ChunkRouter, MoqaeCache};
use kv_tensor::KvBackend;
use kv_tensor::{Bits, FullCache, LayerCache, LayerShape};
use router::{Axes, Expert, RoutingPlan};
use serde::Serialize;
use solver::{Geometry, Method, SensitivityTable};
use std::sync::Arc;

/// How a method's caches are built.
pub enum Build {
    /// The uncompressed f32 reference cache.
    Full,
    /// A routing plan: one expert per layer.
    Plan(RoutingPlan),
    /// MoQAE chunk-level mixed precision with this router over chunks of this many tokens
    /// (the first chunk fp16).
    Chunks(Arc<dyn ChunkRouter>, usize),
}

/// A method at a budget, ready to build caches.
pub struct Entry {
    /// Report name.
    pub name: String,
    /// Budget label (`1/8`), or `-` for budget-free methods.
    pub budget: String,
    /// How its caches are built.
    pub build: Build,
}

impl Entry {
    /// The index of an earlier entry with the same caches (e.g. `1d` and single-scorer
    /// eviction with the menu's scorer, or `hetero+rank` when the solver picked no low-rank
    /// expert): its results are this entry's, measured once.
    pub fn same_as(entries: &[Entry], i: usize) -> Option<usize> {
        let Build::Plan(p) = &entries[i].build else {
            return None;
        };
        entries[..i]
            .iter()
            .position(|e| matches!(&e.build, Build::Plan(q) if q == p))
    }

    fn plan(name: &str, budget: &str, plan: RoutingPlan) -> Self {
        Self {
            name: name.into(),
            budget: budget.into(),
            build: Build::Plan(plan),
        }
    }

    /// The plan's experts (none for the full cache and MoQAE).
    pub fn plan_layers(&self) -> &[Expert] {
        match &self.build {
            Build::Plan(p) => &p.layers,
            _ => &[],
        }
    }

    /// Fresh caches, one per layer, sharing the calibrated `axes`.
    pub fn caches<B: KvBackend>(
        &self,
        layers: usize,
        axes: &Axes<B>,
    ) -> Vec<Box<dyn LayerCache<B>>> {
        match &self.build {
            Build::Full => (0..layers)
                .map(|_| Box::new(FullCache::<B>::new()) as Box<dyn LayerCache<B>>)
                .collect(),
            Build::Plan(p) => p
                .layers
                .iter()
                .map(|e| Box::new(axes.cache(e.clone())) as Box<dyn LayerCache<B>>)
                .collect(),
            Build::Chunks(router, chunk) => (0..layers)
                .map(|l| {
                    Box::new(MoqaeCache::<B>::new(router.clone(), l, *chunk))
                        as Box<dyn LayerCache<B>>
                })
                .collect(),
        }
    }
}

/// A method's per-layer plan at a budget, and the context lengths (tokens) it was planned for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanRecord {
    /// Method name.
    pub method: String,
    /// Budget label.
    pub budget: String,
    /// Context tokens of the samples this plan served.
    pub tokens: Vec<usize>,
    /// One expert per layer.
    pub plan: RoutingPlan,
}

/// MoQAE's chunk size (tokens).
const MOQAE_CHUNK: usize = axis_quant::moqae::DEFAULT_CHUNK;

fn bits(b: u8) -> Bits {
    Bits::try_from(b).unwrap_or(Bits::Full)
}

/// The budgeted methods the eval compares by default, in report order (MoQAE, not a routing
/// plan, is added after them unless `quick`): hetero; `hetero` without the scorer axis
/// (`hetero(expected_attention)`), which shows what the axis adds; the one-dimensional baseline
/// `1d` (the menu scorer's uniform keep: the single-axis method MoE-nD is measured against);
/// and KVzip, the strongest question-agnostic press in kvpress's benchmarks and hetero's best
/// rival at every budget of the 2026-12-02 default run. The attention-statistics scorers
/// (`snapkv`, `trig`, …) never were once KVzip ran beside them, so they are one flag away
/// (`--methods` or `--all-methods`) and the default run affords more samples.
pub fn default_methods(quick: bool) -> Vec<Method> {
    use ScorerKind::*;
    if quick {
        return vec![
            Method::OneD,
            Method::Hetero,
            Method::HeteroRank,
            Method::HeteroStage(axis_share::AXIS),
            Method::Single(Streaming),
            Method::Single(Snapkv),
        ];
    }
    vec![
        Method::Hetero,
        Method::HeteroScorer(crate::session::MENU_SCORER),
        Method::OneD,
        Method::Single(Kvzip),
    ]
}

/// Every budgeted method kvnd implements, in report order.
pub fn all_methods() -> Vec<Method> {
    use ScorerKind::*;
    let mut m = vec![
        Method::OneD,
        Method::TwoDUniform,
        Method::TwoD,
        Method::Hetero,
        Method::HeteroScorer(crate::session::MENU_SCORER),
        Method::HeteroRank,
        Method::HeteroStage(axis_share::AXIS),
        Method::Pyramid(Snapkv),
    ];
    // The redundancy-aware selection is left out: its greedy pass is quadratic in the kept
    // tokens (it would take a quarter of the default run) and it lost to plain top-k on every
    // real-model measurement (`tests/tests/real_model/evict.rs`).
    m.extend(
        [
            Streaming,
            Snapkv,
            Knorm,
            Tova,
            H2o,
            ExpectedAttention,
            Trig,
            Kvzip,
        ]
        .into_iter()
        .map(Method::Single),
    );
    m.push(Method::AdaKv(Snapkv));
    m.push(Method::ChunkKv(Snapkv));
    m
}

/// Every method at every budget: the budget-free references (full, KIVI-4, KIVI-2), then per
/// budget each of `methods` planned by the solver crate (so a name is the plan `solve` writes)
/// and, unless `quick`, MoQAE with the `learned` router's ranking and with the heuristic's.
pub fn entries(
    table: &SensitivityTable,
    geo: &Geometry,
    budgets: &[(String, u64)],
    quick: bool,
    methods: &[Method],
    learned: Option<&Arc<LearnedRouter>>,
    skips: &mut Skips,
) -> Vec<Entry> {
    let mut out = vec![Entry {
        name: "full".into(),
        budget: "-".into(),
        build: Build::Full,
    }];
    for (name, q) in [
        ("kivi-4", QuantSetting::new(bits(4), bits(4))),
        ("kivi-2", QuantSetting::new(bits(2), bits(2))),
    ] {
        let kivi = Expert {
            quant: Some(q),
            ..Expert::FULL
        };
        out.push(Entry::plan(
            name,
            "-",
            RoutingPlan::uniform(kivi, geo.layers),
        ));
    }
    let credited = table.solver_loss();
    let loss = |l: usize, e: usize| credited[l][e];
    for (label, bytes) in budgets {
        for m in methods {
            match m.plan(&table.menu, &loss, geo, *bytes, true) {
                Ok(p) => out.push(Entry::plan(&m.name(), label, p.plan)),
                Err(e) => skips.add(&m.name(), label, e),
            }
        }
        if let (false, Some(learned)) = (quick, learned) {
            // MoQAE: 4-bit for the chunks ranked first, 2-bit for the rest (its expert set
            // {16, 4, 2} with the first chunk at 16), the share fitted to the budget. The same
            // fit for both rankings, so the two meet at matched bytes.
            let shape = LayerShape {
                tokens: geo.tokens,
                ..geo.shape
            };
            let fit = BudgetedRouter::fit(
                bits(4),
                bits(2),
                &shape,
                MOQAE_CHUNK,
                geo.layers,
                kv_tensor::Bytes(*bytes),
            );
            let Some(budget) = fit else {
                for name in ["moqae", "moqae-heuristic"] {
                    skips.add(name, label, "quantization alone cannot reach the budget");
                }
                continue;
            };
            let ranked: Arc<dyn ChunkRouter> = Arc::new(LearnedBudgeted {
                router: learned.clone(),
                budget,
            });
            out.push(Entry {
                name: "moqae".into(),
                budget: label.clone(),
                build: Build::Chunks(ranked, MOQAE_CHUNK),
            });
            out.push(Entry {
                name: "moqae-heuristic".into(),
                budget: label.clone(),
                build: Build::Chunks(Arc::new(budget), MOQAE_CHUNK),
            });
        }
    }
    out
}

/// Methods that could not be planned for some samples, reported once per method and budget
/// rather than once per sample: `(method, budget)` → (first reason, samples).
#[derive(Debug, Default)]
pub struct Skips(std::collections::BTreeMap<(String, String), (String, usize)>);

impl Skips {
    fn add(&mut self, method: &str, budget: &str, reason: impl std::fmt::Display) {
        self.0
            .entry((method.to_string(), budget.to_string()))
            .or_insert_with(|| (reason.to_string(), 0))
            .1 += 1;
    }

    /// One line per skipped method and budget, e.g. `moqae at 1/8: skipped on 14 of 14
    /// samples (quantization alone cannot reach the budget)`.
    pub fn lines(&self, samples: usize) -> Vec<String> {
        self.0
            .iter()
            .map(|((m, b), (why, n))| {
                format!("{m} at {b}: skipped on {n} of {samples} samples ({why})")
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_tensor::KvLayout;

    /// A table over the default menu with losses that fall with kept bytes, as calibration's do.
    fn table(tokens: usize) -> SensitivityTable {
        let menu = solver::default_menu(ScorerKind::ExpectedAttention);
        let geo = Geometry::new(KvLayout::new(30, 3, 9, 64).expect("layout"), tokens);
        let loss = (0..30)
            .map(|l| {
                menu.iter()
                    .map(|e| {
                        let b = e.footprint(&geo.shape, tokens).total().get() as f64;
                        (1.0 + l as f64 / 30.0) / b.max(1.0)
                    })
                    .collect()
            })
            .collect();
        SensitivityTable {
            model_sha256: "0".repeat(64),
            tokens,
            menu,
            loss,
            passage_loss: Vec::new(),
        }
    }

    /// A registered axis is a method name and a menu extension like the built-in ones:
    /// `hetero+share` parses once eval registered it, its experts join the menu only when the
    /// layers pair up, and the solver routes them in `hetero+share` alone.
    #[test]
    fn the_sharing_axis_is_a_method_and_a_menu_extension() {
        crate::register_axes();
        assert_eq!(
            "hetero+share".parse::<Method>(),
            Ok(Method::HeteroStage(axis_share::AXIS))
        );
        assert!("hetero+nothing".parse::<Method>().is_err());
        let sharing = |m: &[Expert]| m.iter().filter(|e| !e.stages.is_empty()).count();
        assert_eq!(sharing(&crate::menu(30)), 24);
        assert_eq!(sharing(&crate::menu(29)), 0);
        let menu = crate::menu(30);
        let geo = Geometry::new(KvLayout::new(30, 3, 9, 64).expect("layout"), 1024);
        // Losses that make the sharing experts cheapest in loss: only hetero+share takes them.
        let loss = |_: usize, e: usize| if menu[e].stages.is_empty() { 1.0 } else { 0.0 };
        let budget = KvLayout::new(30, 3, 9, 64)
            .expect("layout")
            .fp16_bytes(1, 1024)
            .get()
            / 4;
        let plan = |m: Method| {
            m.plan(&menu, &loss, &geo, budget, true)
                .expect("plans")
                .plan
        };
        assert!(
            plan(Method::HeteroStage(axis_share::AXIS))
                .layers
                .iter()
                .all(|e| !e.stages.is_empty())
        );
        assert!(
            plan(Method::Hetero)
                .layers
                .iter()
                .all(|e| e.stages.is_empty())
        );
        assert!(
            plan(Method::HeteroRank)
                .layers
                .iter()
                .all(|e| e.stages.is_empty())
        );
        let p = plan(Method::HeteroStage(axis_share::AXIS));
        let text = p.to_toml().expect("toml");
        assert_eq!(RoutingPlan::from_toml(&text, 30, 64).expect("parses"), p);
    }

    /// MoQAE's two rankings meet at matched bytes: where quantization alone reaches the
    /// budget both are planned with the same fitted share, elsewhere both are reported skipped.
    #[test]
    fn learned_and_heuristic_moqae_share_the_budget_fit() {
        use axis_quant::moqae::learned::{LearnedRouter, RouterMlp};
        let f = 2 * 3 * 64;
        let mlp = RouterMlp {
            mean: vec![0.0; f],
            scale: vec![1.0; f],
            w1: vec![0.0; f * 4],
            w2: vec![0.0; f * 4],
            w3: vec![0.0; 4 * 3],
            hidden: 4,
        };
        let learned = Arc::new(LearnedRouter {
            experts: axis_quant::moqae::AttentionMassRouter::default_experts(),
            lambda: 0.5,
            layers_per_router: 30,
            mlps: vec![mlp],
        });
        let tokens = 2048;
        let layout = KvLayout::new(30, 3, 9, 64).expect("layout");
        let geo = Geometry::new(layout, tokens);
        let fp16 = layout.fp16_bytes(1, tokens).get();
        let budgets: Vec<(String, u64)> = vec![("1/4".into(), fp16 / 4), ("1/8".into(), fp16 / 8)];
        let mut skips = Skips::default();
        let e = entries(
            &table(tokens),
            &geo,
            &budgets,
            false,
            &[],
            Some(&learned),
            &mut skips,
        );
        let names: Vec<(&str, &str)> = e
            .iter()
            .map(|x| (x.name.as_str(), x.budget.as_str()))
            .collect();
        assert!(names.contains(&("moqae", "1/4")) && names.contains(&("moqae-heuristic", "1/4")));
        assert!(!names.iter().any(|(_, b)| *b == "1/8"));
        let lines = skips.lines(1);
        assert!(
            lines.iter().any(|l| l.starts_with("moqae at 1/8")),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("moqae-heuristic at 1/8")),
            "{lines:?}"
        );
    }

    /// Every planned entry fits its budget at the sample's length, names are unique per
    /// budget, and what could not be planned is reported, not dropped silently.
    #[test]
    fn entries_fit_their_budgets_and_skips_are_reported() {
        for tokens in [700usize, 2000] {
            let t = table(tokens);
            let geo = Geometry::new(KvLayout::new(30, 3, 9, 64).expect("layout"), tokens);
            let fp16 = KvLayout::new(30, 3, 9, 64)
                .expect("layout")
                .fp16_bytes(1, tokens)
                .get();
            let budgets: Vec<(String, u64)> = [("1/4", 4), ("1/8", 8), ("1/30", 30)]
                .map(|(n, d)| (n.to_string(), fp16 / d))
                .to_vec();
            let mut skips = Skips::default();
            let methods = all_methods();
            let entries = entries(&t, &geo, &budgets, false, &methods, None, &mut skips);
            for (label, cap) in &budgets {
                let here: Vec<&Entry> = entries.iter().filter(|e| &e.budget == label).collect();
                for e in &here {
                    let bytes: u64 = e
                        .plan_layers()
                        .iter()
                        .map(|x| x.footprint(&geo.shape, tokens).total().get())
                        .sum();
                    assert!(bytes <= *cap, "{} at {label}: {bytes} > {cap}", e.name);
                }
                let mut names: Vec<&str> = here.iter().map(|e| e.name.as_str()).collect();
                let n = names.len();
                names.sort_unstable();
                names.dedup();
                assert_eq!(names.len(), n, "duplicate names at {label}");
                // Every method either planned or reported as skipped at this budget.
                for m in &methods {
                    let planned = here.iter().any(|e| e.name == m.name());
                    let skipped = skips
                        .lines(1)
                        .iter()
                        .any(|l| l.starts_with(&format!("{} at {label}:", m.name())));
                    assert!(
                        planned ^ skipped,
                        "{} at {label}: planned {planned}, skipped {skipped}",
                        m.name()
                    );
                }
            }
            assert_eq!(entries[0].name, "full");
        }
    }
}

//! Eviction invariants (proptest): kept count, protected tokens, increasing positions, keep = 1
//! is the identity, footprint prediction == allocation; and settings validated on load.
use crate::{Evict, EvictSetting, Lambda, ScorerKind, Selection};
use burn::tensor::{Distribution, Int, Tensor};
use burn_ndarray::NdArray;
use kv_tensor::{CompressionAxis, LayerShape, ObservationCtx, Positions, Ratio, Segment};
use proptest::prelude::*;

type B = NdArray<f32>;

fn ctx(heads: usize, w: usize) -> ObservationCtx<B> {
    let q = Tensor::<B, 4>::random(
        [1, heads * 3, w, 16],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    );
    let mut c = ObservationCtx::bare(0);
    c.window_queries = Some(q);
    c
}

fn positions(p: &Positions<B>) -> Vec<Vec<i64>> {
    match p {
        Positions::Explicit(t) => {
            let [_, h, n] = t.dims();
            let v: Vec<i64> = t
                .clone()
                .into_data()
                .convert::<i64>()
                .to_vec()
                .expect("ints");
            (0..h).map(|i| v[i * n..(i + 1) * n].to_vec()).collect()
        }
        Positions::Ragged(heads) => heads
            .iter()
            .map(|t| {
                t.clone()
                    .into_data()
                    .convert::<i64>()
                    .to_vec()
                    .expect("ints")
            })
            .collect(),
        Positions::Contiguous { .. } => vec![],
    }
}

fn selection() -> impl Strategy<Value = Selection> {
    prop_oneof![
        Just(Selection::TopK),
        (0.05f64..1.0).prop_map(|m| Selection::HeadWise {
            min_share: Ratio::new(m).expect("ratio")
        }),
        (0.0f64..2.0).prop_map(|l| Selection::Redundancy {
            lambda: Lambda::new(l).expect("lambda")
        }),
        (0.0f64..2.0).prop_map(|l| Selection::FacilityLocation {
            lambda: Lambda::new(l).expect("lambda")
        }),
        (1usize..32).prop_map(|c| Selection::Chunks {
            size: std::num::NonZeroUsize::new(c).expect("nonzero")
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn eviction_invariants(
        scorer in prop::sample::select(vec![ScorerKind::Streaming, ScorerKind::Knorm, ScorerKind::Snapkv, ScorerKind::Tova, ScorerKind::ExpectedAttention, ScorerKind::Random]),
        keep in 0.05f64..1.0, t in 40usize..200, heads in 1usize..4, start in 0usize..50,
        selection in selection(),
    ) {
        let device = Default::default();
        let k = Tensor::<B, 4>::random([1, heads, t, 16], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<B, 4>::random([1, heads, t, 16], Distribution::Normal(0.0, 1.0), &device);
        let s = EvictSetting::new(scorer, Ratio::new(keep).expect("ratio")).with_selection(selection);
        let seg = Segment::dense(k, v, start).expect("segment");
        let out = Evict::new().compress(seg, &s, &ctx(heads, 8)).expect("compress");
        let n = (keep * t as f64 - 1e-9).ceil() as usize;
        let expected = n.max(s.sinks + s.window).min(t);
        let kept = positions(&out.positions);
        if expected < t {
            // Every selection keeps the layer's total; only head-wise moves it between heads.
            prop_assert_eq!(kept.iter().map(Vec::len).sum::<usize>(), expected * heads);
            if !matches!(selection, Selection::HeadWise { .. }) {
                prop_assert_eq!(out.len(), expected);
            }
        } else {
            prop_assert_eq!(out.len(), t);
        }
        let shape = LayerShape { batch: 1, kv_heads: heads, tokens: t, head_dim: 16 };
        prop_assert_eq!(out.footprint(), CompressionAxis::<B>::footprint(&Evict::new(), &shape, &s));
        for head in kept {
            prop_assert!(head.windows(2).all(|w| w[0] < w[1]), "positions not increasing: {:?}", head);
            for p in 0..s.sinks {
                prop_assert!(head.contains(&((start + p) as i64)));
            }
            for p in t - s.window..t {
                prop_assert!(head.contains(&((start + p) as i64)));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// With λ = 0 the redundancy-aware greedy keeps exactly what top-k keeps. (Scorers with
    /// continuous, tie-free scores: SnapKV's max-pooling creates ties, broken differently.)
    #[test]
    fn redundancy_with_zero_lambda_is_top_k(
        scorer in prop::sample::select(vec![ScorerKind::Knorm, ScorerKind::Random, ScorerKind::ExpectedAttention]),
        keep in 0.05f64..1.0, t in 40usize..160, heads in 1usize..4,
    ) {
        let device = Default::default();
        let k = Tensor::<B, 4>::random([1, heads, t, 16], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<B, 4>::random([1, heads, t, 16], Distribution::Normal(0.0, 1.0), &device);
        let c = ctx(heads, 8);
        let base = EvictSetting::new(scorer, Ratio::new(keep).expect("ratio"));
        let a = Evict::new().compress(Segment::dense(k.clone(), v.clone(), 0).expect("seg"), &base, &c).expect("top-k");
        let zero = Lambda::new(0.0).expect("0");
        for sel in [Selection::Redundancy { lambda: zero }, Selection::FacilityLocation { lambda: zero }] {
            let b = Evict::new().compress(Segment::dense(k.clone(), v.clone(), 0).expect("seg"), &base.with_selection(sel), &c).expect("greedy");
            prop_assert_eq!(positions(&a.positions), positions(&b.positions));
        }
    }
}

#[test]
fn redundancy_penalty_spreads_kept_values() {
    // Values come in identical pairs (rows 2i and 2i+1); with a large λ the greedy never keeps
    // both members of a pair while unrepresented pairs remain.
    let device = Default::default();
    let t = 80;
    let v = Tensor::<B, 4>::random([1, 1, t / 2, 16], Distribution::Normal(0.0, 1.0), &device)
        .reshape([1, 1, t / 2, 1, 16])
        .expand([1, 1, t / 2, 2, 16])
        .reshape([1, 1, t, 16]);
    let k = Tensor::<B, 4>::random([1, 1, t, 16], Distribution::Normal(0.0, 1.0), &device);
    let mut s = EvictSetting::new(ScorerKind::Knorm, Ratio::new(0.5).expect("r")).with_selection(
        Selection::Redundancy {
            lambda: Lambda::new(10.0).expect("l"),
        },
    );
    s.sinks = 0;
    s.window = 0;
    let out = Evict::new()
        .compress(Segment::dense(k, v, 0).expect("seg"), &s, &ctx(1, 4))
        .expect("greedy");
    let kept = positions(&out.positions).remove(0);
    let mut pairs: Vec<i64> = kept.iter().map(|p| p / 2).collect();
    pairs.dedup();
    assert_eq!(
        pairs.len(),
        kept.len(),
        "a duplicate pair was kept: {kept:?}"
    );
}

#[test]
fn head_wise_storage_is_ragged_and_attention_ignores_padding() {
    use kv_tensor::{CompressedLayer, Encoded, attention, attention_padded};
    let device = Default::default();
    let (h, t, d) = (3, 120, 16);
    let k = Tensor::<B, 4>::random([1, h, t, d], Distribution::Normal(0.0, 1.0), &device);
    let v = Tensor::<B, 4>::random([1, h, t, d], Distribution::Normal(0.0, 1.0), &device);
    let s = EvictSetting::new(ScorerKind::Snapkv, Ratio::new(0.4).expect("r")).with_selection(
        Selection::HeadWise {
            min_share: Ratio::new(0.2).expect("r"),
        },
    );
    let out = Evict::new()
        .compress(
            Segment::dense(k.clone(), v.clone(), 0).expect("seg"),
            &s,
            &ctx(h, 8),
        )
        .expect("head-wise");
    let Encoded::Ragged(heads) = &out.k else {
        panic!("not ragged")
    };
    let lens: Vec<usize> = heads.iter().map(|e| e.dims()[2]).collect();
    // Allocated bytes are the kept rows, not the padded rectangle.
    let kept: usize = lens.iter().sum();
    assert_eq!(out.footprint().dense.get() as usize, 2 * kept * d * 4);
    assert_eq!(out.footprint().indices.get() as usize, kept * 4);
    // Attention over the padded decode equals attention over each head's own tokens.
    let mut layer = CompressedLayer::<B>::new();
    layer.push_segment(out.clone()).expect("push");
    let (pk, pv) = layer.decode().expect("decode");
    let q = Tensor::<B, 4>::random([1, h * 3, 1, d], Distribution::Normal(0.0, 1.0), &device);
    let got = attention_padded(q.clone(), pk, pv, layer.padding()).expect("padded");
    let Encoded::Ragged(vheads) = &out.v else {
        panic!("not ragged")
    };
    for head in 0..h {
        let kh = heads[head].decode().expect("k");
        let vh = vheads[head].decode().expect("v");
        let qh = q.clone().slice_dim(1, head * 3..head * 3 + 3);
        let want = attention(qh, kh, vh).expect("head");
        let diff = (got.clone().slice_dim(1, head * 3..head * 3 + 3) - want)
            .abs()
            .max()
            .into_scalar();
        assert!(diff < 1e-5, "head {head}: {diff}");
    }
}

#[test]
fn keep_one_is_the_identity() {
    let k = Tensor::<B, 4>::random(
        [1, 2, 50, 16],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    );
    let seg = Segment::dense(k.clone(), k.clone(), 0).expect("segment");
    let out = Evict::new()
        .compress(
            seg,
            &EvictSetting::new(ScorerKind::Knorm, Ratio::ONE),
            &ctx(2, 4),
        )
        .expect("compress");
    assert!(matches!(
        out.positions,
        Positions::Contiguous { start: 0, len: 50 }
    ));
    let back: Vec<f32> = out
        .k
        .decode()
        .expect("decode")
        .into_data()
        .to_vec()
        .expect("f32");
    let orig: Vec<f32> = k.into_data().to_vec().expect("f32");
    assert_eq!(back, orig);
}

#[test]
fn kept_rows_are_the_original_rows() {
    let device = Default::default();
    let t = 100;
    // Key j of head 0 is the constant j: gathered rows must carry their own position.
    let k = Tensor::<B, 1, Int>::arange(0..t as i64, &device)
        .float()
        .reshape([1, 1, t, 1])
        .expand([1, 1, t, 16]);
    let seg = Segment::dense(k.clone(), k, 10).expect("segment");
    let out = Evict::new()
        .compress(
            seg,
            &EvictSetting::new(ScorerKind::Random, Ratio::new(0.5).expect("r")),
            &ctx(1, 4),
        )
        .expect("compress");
    let kept: Vec<f32> = out
        .k
        .decode()
        .expect("decode")
        .slice_dim(3, 0..1)
        .into_data()
        .to_vec()
        .expect("f32");
    let pos = positions(&out.positions).remove(0);
    for (row, p) in kept.iter().zip(&pos) {
        assert_eq!(*row as i64 + 10, *p);
    }
}

#[test]
fn missing_observations_are_typed_errors() {
    let k = Tensor::<B, 4>::random(
        [1, 1, 64, 16],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    );
    // Exactly the scorers that declare a need fail without observations or calibration, and
    // every scorer that declares none scores a bare context.
    for scorer in ScorerKind::ALL {
        let n = scorer.needs();
        let seg = Segment::dense(k.clone(), k.clone(), 0).expect("segment");
        let r = Evict::new().compress(
            seg,
            &EvictSetting::new(scorer, Ratio::new(0.5).expect("r")),
            &ObservationCtx::bare(0),
        );
        if n.window_queries || n.attention_mass || n.calibration || n.reconstruction {
            let e = r.expect_err("needs observations");
            assert!(e.to_string().contains("needs"), "{scorer}: {e}");
        } else {
            assert!(r.is_ok(), "{scorer}: {:?}", r.err());
        }
    }
}

/// A user's scorer, written against the public trait, replaces a built-in one: the axis keeps
/// the tokens it ranks highest.
#[test]
fn a_user_scorer_plugs_into_the_axis() {
    #[derive(Debug)]
    struct Oldest;
    impl crate::Scorer<B> for Oldest {
        fn needs(&self) -> crate::ScorerNeeds {
            crate::ScorerNeeds::default()
        }
        fn score(
            &self,
            i: &crate::ScoreInput<'_, B>,
        ) -> Result<Tensor<B, 3>, kv_tensor::AxisError> {
            Ok(crate::streaming::score(i.k).neg())
        }
    }
    let k = Tensor::<B, 4>::random([1, 1, 40, 16], Distribution::Default, &Default::default());
    let axis = Evict::new().with_scorer(ScorerKind::Random, std::sync::Arc::new(Oldest));
    let mut s = EvictSetting::new(ScorerKind::Random, Ratio::new(0.5).expect("r"));
    s.sinks = 0;
    s.window = 0;
    let seg = Segment::dense(k.clone(), k, 0).expect("segment");
    let out = axis
        .compress(seg, &s, &ObservationCtx::bare(0))
        .expect("compress");
    assert_eq!(
        positions(&out.positions),
        vec![(0..20).collect::<Vec<i64>>()]
    );
}

#[test]
fn settings_are_validated_on_load() {
    assert!(toml::from_str::<EvictSetting>("scorer = \"snapkv\"\nkeep = 0.25").is_ok());
    assert!(toml::from_str::<EvictSetting>("scorer = \"snapkv\"\nkeep = 0.0").is_err());
    assert!(toml::from_str::<EvictSetting>("scorer = \"nope\"\nkeep = 0.5").is_err());
    assert!(toml::from_str::<EvictSetting>("scorer = \"knorm\"\nkeep = 0.5\nextra = 1").is_err());
}

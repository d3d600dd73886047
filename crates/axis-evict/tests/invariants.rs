//! Eviction invariants (proptest): kept count, protected tokens, increasing positions, keep = 1
//! is the identity, footprint prediction == allocation; and settings validated on load.
use axis_evict::{Evict, EvictSetting, ScorerKind};
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
        Positions::Contiguous { .. } => vec![],
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn eviction_invariants(
        scorer in prop::sample::select(vec![ScorerKind::Streaming, ScorerKind::Knorm, ScorerKind::Snapkv, ScorerKind::Tova, ScorerKind::ExpectedAttention, ScorerKind::Random]),
        keep in 0.05f64..1.0, t in 40usize..200, heads in 1usize..4, start in 0usize..50,
    ) {
        let device = Default::default();
        let k = Tensor::<B, 4>::random([1, heads, t, 16], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<B, 4>::random([1, heads, t, 16], Distribution::Normal(0.0, 1.0), &device);
        let s = EvictSetting::new(scorer, Ratio::new(keep).expect("ratio"));
        let seg = Segment::dense(k, v, start).expect("segment");
        let out = Evict.compress(seg, &s, &ctx(heads, 8)).expect("compress");
        let n = (keep * t as f64 - 1e-9).ceil() as usize;
        let expected = n.max(s.sinks + s.window).min(t);
        prop_assert_eq!(out.len(), expected);
        let shape = LayerShape { batch: 1, kv_heads: heads, tokens: t, head_dim: 16 };
        prop_assert_eq!(out.footprint(), CompressionAxis::<B>::footprint(&Evict, &shape, &s));
        for head in positions(&out.positions) {
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

#[test]
fn keep_one_is_the_identity() {
    let k = Tensor::<B, 4>::random(
        [1, 2, 50, 16],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    );
    let seg = Segment::dense(k.clone(), k.clone(), 0).expect("segment");
    let out = Evict
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
    let out = Evict
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
    for scorer in [
        ScorerKind::Snapkv,
        ScorerKind::H2o,
        ScorerKind::Tova,
        ScorerKind::ExpectedAttention,
    ] {
        let seg = Segment::dense(k.clone(), k.clone(), 0).expect("segment");
        let e = Evict
            .compress(
                seg,
                &EvictSetting::new(scorer, Ratio::new(0.5).expect("r")),
                &ObservationCtx::bare(0),
            )
            .expect_err("needs observations");
        assert!(e.to_string().contains("needs"), "{e}");
    }
}

#[test]
fn settings_are_validated_on_load() {
    assert!(toml::from_str::<EvictSetting>("scorer = \"snapkv\"\nkeep = 0.25").is_ok());
    assert!(toml::from_str::<EvictSetting>("scorer = \"snapkv\"\nkeep = 0.0").is_err());
    assert!(toml::from_str::<EvictSetting>("scorer = \"nope\"\nkeep = 0.5").is_err());
    assert!(toml::from_str::<EvictSetting>("scorer = \"knorm\"\nkeep = 0.5\nextra = 1").is_err());
}

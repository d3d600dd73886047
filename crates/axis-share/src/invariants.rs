//! Shared bases are orthonormal and keep what the group's layers hold; a layer routed through
//! the stage holds exactly the bytes its expert predicts; adjacent layers hold one basis.
use crate::{AXIS, Share, ShareSetting, pooled_bases};
use axis_lowrank::{PcaAccumulator, PcaBases};
use burn::tensor::{Distribution, Tensor};
use burn_ndarray::NdArray;
use kv_tensor::{CompressionAxis, LayerCache, LayerShape, ObservationCtx, Segment};
use proptest::prelude::*;
use router::{Axes, CustomStage, Expert};
use std::sync::Arc;

type B = NdArray<f32>;
const D: usize = 16;
const H: usize = 2;

/// PCA bases of `layers` layers fitted on random keys and values whose scale differs per layer
/// and channel (so directions and eigenvalues differ between layers).
fn pca(layers: usize, seed: u64) -> PcaBases {
    let dev = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&dev, seed);
    let mut acc = PcaAccumulator::new(layers, H, D);
    for l in 0..layers {
        let scale: Vec<f32> = (0..D).map(|c| 1.0 + ((c * (l + 1)) % 7) as f32).collect();
        let s = Tensor::<B, 1>::from_floats(scale.as_slice(), &dev).reshape([1, 1, 1, D]);
        let x = || Tensor::<B, 4>::random([1, H, 200, D], Distribution::Normal(0.0, 1.0), &dev);
        acc.add::<B>(l, &(x() * s.clone()), &(x() * s))
            .expect("shape");
    }
    acc.finish("model")
}

fn setting(k: Option<usize>, v: Option<usize>, layers: usize) -> ShareSetting {
    ShareSetting {
        k_rank: k,
        v_rank: v,
        layers,
    }
}

#[test]
fn a_group_of_one_is_the_layers_own_pca() {
    let p = pca(3, 1);
    let pooled = pooled_bases(&p, 1).expect("groups of one");
    for l in 0..3 {
        for side in 0..2 {
            for r in [1, 4, 8] {
                let (a, b) = (p.explained(l, side, r), pooled.explained(l, side, r));
                assert!(
                    (a - b).abs() < 1e-6,
                    "layer {l} side {side} rank {r}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn pooled_bases_are_orthonormal_and_keep_the_mean_variance() {
    let p = pca(4, 2);
    let pooled = pooled_bases(&p, 2).expect("4 layers in pairs");
    assert_eq!(pooled.layers.len(), 2);
    for (g, sides) in pooled.layers.iter().enumerate() {
        for (side, heads) in sides.iter().enumerate() {
            for (h, hb) in heads.iter().enumerate() {
                let v = nalgebra::DMatrix::from_fn(D, D, |i, j| f64::from(hb.vectors[i * D + j]));
                let eye = v.transpose() * &v;
                assert!((eye - nalgebra::DMatrix::identity(D, D)).abs().max() < 1e-4);
                let total = |l: usize| p.layers[l][side][h].eigenvalues.iter().sum::<f64>();
                let mean = (total(2 * g) + total(2 * g + 1)) / 2.0;
                let got: f64 = hb.eigenvalues.iter().sum();
                assert!((got - mean).abs() < 1e-6 * mean.max(1.0), "{got} vs {mean}");
            }
        }
    }
}

#[test]
fn groups_must_divide_the_layers() {
    let p = pca(3, 3);
    let err = pooled_bases(&p, 2).expect_err("3 layers in pairs");
    assert!(err.to_string().contains("3 layers"), "{err}");
    assert!(pooled_bases(&p, 0).is_err());
}

fn axis(layers: usize, group: usize) -> Arc<Share<B>> {
    let pooled = pooled_bases(&pca(layers, 4), group).expect("grouping");
    Arc::new(Share::new(&pooled, group, &Default::default()).expect("bases"))
}

#[test]
fn adjacent_layers_hold_one_basis_and_a_full_rank_is_lossless() {
    let share = axis(4, 2);
    let dev = Default::default();
    let x = Tensor::<B, 4>::random([1, H, 40, D], Distribution::Normal(0.0, 1.0), &dev);
    let seg = || Segment::dense(x.clone(), x.clone(), 0).expect("segment");
    let s = setting(Some(D), Some(4), 2);
    let at = |layer| {
        share
            .compress(seg(), &s, &ObservationCtx::bare(layer))
            .expect("compress")
    };
    let (l0, l1, l2) = (at(0), at(1), at(2));
    let basis = |s: &Segment<B>| s.k.basis().expect("projected").clone();
    assert!(
        Arc::ptr_eq(&basis(&l0), &basis(&l1)),
        "layers 0 and 1 share"
    );
    assert!(
        !Arc::ptr_eq(&basis(&l1), &basis(&l2)),
        "layer 2 is the next group"
    );
    l0.k.decode()
        .expect("decode")
        .into_data()
        .assert_approx_eq::<f32>(
            &x.clone().into_data(),
            burn::tensor::Tolerance::absolute(1e-4),
        );
    let wrong = share.compress(seg(), &setting(Some(4), None, 3), &ObservationCtx::bare(0));
    assert!(
        wrong
            .expect_err("group size")
            .to_string()
            .contains("calibrated for 2")
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Routed through the router like any stage, with or without quantization after it, a
    /// layer holds exactly what its expert predicts: its coefficients plus half the pair's
    /// bases.
    #[test]
    fn routed_footprint_equals_prediction(
        k in prop::option::of(1usize..=D),
        v in prop::sample::select(vec![None, Some(8), Some(16)]),
        bits in prop::option::of(prop::sample::select(vec![2u8, 4, 8])),
        t in 70usize..300,
        layer in 0usize..4,
    ) {
        crate::register();
        let axes = Axes::<B>::default().with_stage(AXIS, axis(4, 2));
        let quant = bits.map(|b| {
            let b = kv_tensor::Bits::try_from(b).expect("bits");
            axis_quant_setting(b)
        });
        let e = Expert { stages: vec![CustomStage::new(setting(k, v, 2))], quant, ..Expert::FULL };
        prop_assume!(e.validate(D).is_ok());
        let mut c = axes.cache(e.clone());
        let x = Tensor::<B, 4>::random([1, H, t, D], Distribution::Normal(0.0, 1.0), &Default::default());
        c.append(x.clone(), x).expect("append");
        c.finish_prefill(&ObservationCtx::bare(layer)).expect("compress");
        let shape = LayerShape { batch: 1, kv_heads: H, tokens: t, head_dim: D };
        prop_assert_eq!(c.footprint(), e.footprint(&shape, t));
        let text = router::RoutingPlan::uniform(e.clone(), 4).to_toml().expect("toml");
        prop_assert_eq!(router::RoutingPlan::from_toml(&text, 4, D).expect("parses").layers[0].clone(), e);
    }
}

fn axis_quant_setting(b: kv_tensor::Bits) -> axis_quant::QuantSetting {
    axis_quant::QuantSetting {
        group: axis_quant::GroupSize::new(8).expect("group"),
        ..axis_quant::QuantSetting::new(b, b)
    }
}

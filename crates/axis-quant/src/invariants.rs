//! Quantization invariants (proptest): error bound, exact constant groups, identity at 16 bits,
//! typed errors on NaN/Inf, footprint prediction == allocation.
use crate::{Kivi, QuantError, QuantSetting, quantize};
use burn::tensor::{Tensor, TensorData};
use burn_ndarray::NdArray;
use kv_tensor::{
    Bits, CodeBits, CompressionAxis, Encoded, GroupAxis, LayerShape, ObservationCtx, Segment,
};
use proptest::prelude::*;

type B = NdArray<f32>;

fn tensor(v: Vec<f32>, shape: [usize; 4]) -> Tensor<B, 4> {
    Tensor::from_data(TensorData::new(v, shape), &Default::default())
}

fn to_vec(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data().to_vec().expect("f32")
}

/// Scales per element, broadcast back to `[b, h, t, d]`, from the reconstruction of a group's
/// range: the stored scale is recovered as (max code value − min value) / levels.
fn check_bound(x: Vec<f32>, shape: [usize; 4], bits: CodeBits, group: usize, along: GroupAxis) {
    let q = quantize(tensor(x.clone(), shape), bits, group, along, "test").expect("quantize");
    let back = to_vec(q.decode().expect("decode"));
    let [b, h, t, d] = shape;
    let levels = bits.max_code() as f32;
    // Group membership of element (bi, hi, ti, di).
    let gid = |bi: usize, hi: usize, ti: usize, di: usize| match along {
        GroupAxis::Tokens => ((bi * h + hi) * (t / group) + ti / group) * d + di,
        GroupAxis::Channels => ((bi * h + hi) * t + ti) * (d / group) + di / group,
    };
    let n_groups = b * h * t * d / group;
    let (mut lo, mut hi_) = (
        vec![f32::INFINITY; n_groups],
        vec![f32::NEG_INFINITY; n_groups],
    );
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                for di in 0..d {
                    let i = ((bi * h + hi) * t + ti) * d + di;
                    let g = gid(bi, hi, ti, di);
                    lo[g] = lo[g].min(x[i]);
                    hi_[g] = hi_[g].max(x[i]);
                }
            }
        }
    }
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                for di in 0..d {
                    let i = ((bi * h + hi) * t + ti) * d + di;
                    let g = gid(bi, hi, ti, di);
                    let scale = (hi_[g] - lo[g]) / levels;
                    // The stored min is ≤ 1 fp16 ulp below the true min, so the stored scale
                    // covers (range + ulp(min)) / levels, rounded up by ≤ 1 ulp; the error is
                    // half a stored step, plus f32 arithmetic.
                    let tiny = 2f32.powi(-24);
                    let stored_scale = ((hi_[g] - lo[g] + lo[g].abs() * 2f32.powi(-10) + tiny)
                        / levels)
                        * (1.0 + 2f32.powi(-10))
                        + tiny;
                    let bound = stored_scale / 2.0 + x[i].abs().max(lo[g].abs()) * 2f32.powi(-21);
                    let err = (x[i] - back[i]).abs();
                    assert!(
                        err <= bound,
                        "elem {i}: |{} − {}| = {err} > {bound} (scale {scale})",
                        x[i],
                        back[i]
                    );
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn error_is_within_half_a_step(
        bits in prop::sample::select(CodeBits::ALL.to_vec()),
        keys in any::<bool>(),
        t_groups in 1usize..4,
        seed in prop::collection::vec(-8f32..8f32, 64),
        scale in prop::sample::select(vec![1e-3f32, 1.0, 30.0]),
    ) {
        let shape = [1, 2, 32 * t_groups, 64];
        let n: usize = shape.iter().product();
        let x: Vec<f32> = (0..n).map(|i| seed[i % 64] * scale * (1.0 + (i % 7) as f32 * 0.1)).collect();
        let along = if keys { GroupAxis::Tokens } else { GroupAxis::Channels };
        check_bound(x, shape, bits, 32, along);
    }

    #[test]
    fn constant_groups_reconstruct_exactly(v in prop::sample::select(vec![0.0f32, 1.0, -2.5, 0.125, 1024.0, -0.0009765625]),
                                           bits in prop::sample::select(CodeBits::ALL.to_vec())) {
        // Values representable in fp16 come back bit-exact.
        let x = vec![v; 2 * 32 * 64];
        for along in [GroupAxis::Tokens, GroupAxis::Channels] {
            let q = quantize(tensor(x.clone(), [1, 2, 32, 64]), bits, 32, along, "test").expect("quantize");
            prop_assert_eq!(to_vec(q.decode().expect("decode")), x.clone());
        }
    }

    #[test]
    fn footprint_prediction_equals_allocation(
        kb in prop::sample::select(vec![2u8, 3, 4, 8, 16]),
        vb in prop::sample::select(vec![2u8, 3, 4, 8, 16]),
        groups in 1usize..5, heads in 1usize..4,
    ) {
        let s = QuantSetting::new(Bits::try_from(kb).expect("bits"), Bits::try_from(vb).expect("bits"));
        let shape = LayerShape { batch: 1, kv_heads: heads, tokens: 32 * groups, head_dim: 64 };
        let k = Tensor::<B, 4>::random(shape.dims(), burn::tensor::Distribution::Normal(0.0, 1.0), &Default::default());
        let seg = Segment::dense(k.clone(), k, 0).expect("segment");
        let out = Kivi.compress(seg, &s, &ObservationCtx::bare(0)).expect("compress");
        prop_assert_eq!(out.footprint(), CompressionAxis::<B>::footprint(&Kivi, &shape, &s));
    }
}

#[test]
fn sixteen_bits_is_the_identity() {
    let k = Tensor::<B, 4>::random(
        [1, 3, 64, 64],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &Default::default(),
    );
    let seg = Segment::dense(k.clone(), k.clone(), 0).expect("segment");
    let out = Kivi
        .compress(
            seg,
            &QuantSetting::new(Bits::Full, Bits::Full),
            &ObservationCtx::bare(0),
        )
        .expect("compress");
    assert!(matches!(out.k, Encoded::Dense(_)));
    assert_eq!(to_vec(out.k.decode().expect("decode")), to_vec(k));
}

#[test]
fn nan_and_inf_are_typed_errors() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = vec![0.5f32; 32 * 64];
        x[77] = bad;
        let e = quantize(
            tensor(x, [1, 1, 32, 64]),
            CodeBits::B4,
            32,
            GroupAxis::Tokens,
            "keys of layer 0",
        )
        .expect_err("rejected");
        assert!(matches!(e, QuantError::NonFinite { .. }), "{e}");
    }
    let e = quantize(
        tensor(vec![0.0; 40 * 64], [1, 1, 40, 64]),
        CodeBits::B4,
        32,
        GroupAxis::Tokens,
        "keys",
    )
    .expect_err("ragged");
    assert!(
        matches!(
            e,
            QuantError::Ragged {
                len: 40,
                group: 32,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn group_size_and_setting_are_validated_on_load() {
    assert!(toml::from_str::<QuantSetting>("k_bits = 2\nv_bits = 4\ngroup = 32").is_ok());
    assert!(toml::from_str::<QuantSetting>("k_bits = 2\nv_bits = 4\ngroup = 33").is_err());
    assert!(toml::from_str::<QuantSetting>("k_bits = 5\nv_bits = 4").is_err());
    assert!(toml::from_str::<QuantSetting>("k_bits = 2\nv_bits = 4\nbogus = 1").is_err());
}

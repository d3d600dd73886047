//! Low-rank invariants on random low-rank-plus-noise data (proptest): full rank reconstructs,
//! error is non-increasing in rank, data in an r-dim subspace is exact at rank r; reduced-space
//! bases files are validated on load.
use crate::{LowRank, LowRankSetting, PcaAccumulator, PcaBases};
use burn::tensor::{Tensor, TensorData};
use burn_ndarray::NdArray;
use kv_tensor::{CompressionAxis, Encoded, ObservationCtx, Segment};
use proptest::prelude::*;

type B = NdArray<f32>;
const D: usize = 16;
const H: usize = 2;

/// `[1, H, t, D]` data of rank `r` (plus `noise`), from a deterministic seed.
fn data(t: usize, r: usize, noise: f32, seed: u64) -> Tensor<B, 4> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    let mut v = Vec::with_capacity(H * t * D);
    for _ in 0..H {
        let dirs: Vec<f32> = (0..r * D).map(|_| next()).collect();
        for _ in 0..t {
            let c: Vec<f32> = (0..r).map(|_| next()).collect();
            for j in 0..D {
                v.push((0..r).map(|i| c[i] * dirs[i * D + j]).sum::<f32>() + noise * next());
            }
        }
    }
    Tensor::from_data(TensorData::new(v, [1, H, t, D]), &Default::default())
}

fn axis_for(x: &Tensor<B, 4>) -> LowRank<B> {
    let mut acc = PcaAccumulator::new(1, H, D);
    acc.add(0, x, x).expect("add");
    LowRank::new(&acc.finish("test"), &Default::default()).expect("bases")
}

fn err_at(axis: &LowRank<B>, x: &Tensor<B, 4>, r: usize) -> f32 {
    let seg = Segment::dense(x.clone(), x.clone(), 0).expect("segment");
    let s = LowRankSetting {
        k_rank: Some(r),
        v_rank: None,
    };
    let out = axis
        .compress(seg, &s, &ObservationCtx::bare(0))
        .expect("compress");
    assert!(matches!(out.k, Encoded::Projected { .. }));
    let back = out.k.decode().expect("decode");
    (back - x.clone())
        .abs()
        .max()
        .into_data()
        .iter::<f32>()
        .next()
        .unwrap_or(f32::NAN)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn rank_properties(t in 40usize..120, r0 in 1usize..8, seed in 0u64..10_000) {
        let noisy = data(t, r0, 0.05, seed);
        let axis = axis_for(&noisy);
        prop_assert!(err_at(&axis, &noisy, D) < 1e-4, "full rank does not reconstruct");
        let errs: Vec<f32> = (1..=D).map(|r| err_at(&axis, &noisy, r)).collect();
        // Max-abs error can wiggle slightly; the Frobenius error is what PCA minimises.
        let fro = |r: usize| {
            let seg = Segment::dense(noisy.clone(), noisy.clone(), 0).expect("segment");
            let out = axis.compress(seg, &LowRankSetting { k_rank: Some(r), v_rank: None }, &ObservationCtx::bare(0)).expect("compress");
            (out.k.decode().expect("decode") - noisy.clone()).square().sum().into_data().iter::<f32>().next().unwrap_or(f32::NAN)
        };
        for r in 1..D {
            prop_assert!(fro(r + 1) <= fro(r) * (1.0 + 1e-4) + 1e-6, "error grew from rank {} to {}: {:?}", r, r + 1, errs);
        }
        let exact = data(t, r0, 0.0, seed);
        let axis = axis_for(&exact);
        prop_assert!(err_at(&axis, &exact, r0) < 1e-4, "rank-{} data not exact at rank {}", r0, r0);
    }
}

#[test]
fn bases_files_are_validated() {
    let x = data(30, 3, 0.1, 1);
    let mut acc = PcaAccumulator::new(1, H, D);
    acc.add(0, &x, &x).expect("add");
    let json = acc.finish("abc").to_json();
    assert!(PcaBases::from_json(&json, "abc").is_ok());
    let e = PcaBases::from_json(&json, "def").expect_err("other model");
    assert!(e.to_string().contains("recalibrate"), "{e}");
    assert!(PcaBases::from_json("{\"nope\": 1}", "abc").is_err());
    let bad = LowRankSetting {
        k_rank: Some(0),
        v_rank: None,
    };
    let seg = Segment::dense(x.clone(), x.clone(), 0).expect("segment");
    assert!(
        axis_for(&x)
            .compress(seg, &bad, &ObservationCtx::bare(0))
            .is_err()
    );
}

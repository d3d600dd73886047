//! `FullCache::attend` against a naive softmax attention written out loop by loop.
use crate::{Bytes, DensePrecision, FullCache, LayerCache, LayerShape};
use burn::tensor::{Distribution, Tensor};
use burn_ndarray::NdArray;

type B = NdArray<f32>;

const QH: usize = 9;
const KVH: usize = 3;
const D: usize = 64;

fn to_vec(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data().to_vec().expect("f32 data")
}

/// Causal softmax of query `i` of head `h` (of `tq` queries, the last of `tk` positions) over
/// the keys it sees, in f64: key j's weight for j in 0..=tk − tq + i.
fn naive_probs(q: &[f32], k: &[f32], h: usize, i: usize, tq: usize, tk: usize) -> Vec<f64> {
    let kh = h / (QH / KVH);
    let qrow = &q[(h * tq + i) * D..(h * tq + i + 1) * D];
    let visible = tk - tq + i + 1;
    let scores: Vec<f64> = (0..visible)
        .map(|j| {
            let krow = &k[(kh * tk + j) * D..(kh * tk + j + 1) * D];
            qrow.iter()
                .zip(krow)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum::<f64>()
                / (D as f64).sqrt()
        })
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
    scores.iter().map(|s| (s - max).exp() / sum).collect()
}

/// Naive attention: for each query head h (reading KV head h / 3) and query token i at
/// absolute position `offset + i`, softmax over keys 0..=offset+i.
fn naive(q: &[f32], k: &[f32], v: &[f32], tq: usize, tk: usize) -> Vec<f32> {
    let mut out = vec![0f32; QH * tq * D];
    for h in 0..QH {
        let kh = h / (QH / KVH);
        for i in 0..tq {
            for (j, p) in naive_probs(q, k, h, i, tq, tk).into_iter().enumerate() {
                let vrow = &v[(kh * tk + j) * D..(kh * tk + j + 1) * D];
                for c in 0..D {
                    out[(h * tq + i) * D + c] += (p * vrow[c] as f64) as f32;
                }
            }
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_within(got, want, 1e-5, what);
}

fn assert_within(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= tol, "{what}: max abs error {worst}");
}

/// The values a cache of `precision` stores for `x` (fp16 rounds to nearest even).
fn stored(x: Vec<f32>, precision: DensePrecision) -> Vec<f32> {
    match precision {
        DensePrecision::F32 => x,
        DensePrecision::F16 => x
            .into_iter()
            .map(|v| half::f16::from_f32(v).to_f32())
            .collect(),
    }
}

#[test]
fn full_cache_matches_naive_attention_prefill_and_decode() {
    for precision in [DensePrecision::F32, DensePrecision::F16] {
        full_cache_matches_naive(precision);
    }
}

fn full_cache_matches_naive(precision: DensePrecision) {
    let device = Default::default();
    let rand =
        |shape: [usize; 4]| Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let mut cache = match precision {
        DensePrecision::F16 => FullCache::<B>::new(),
        DensePrecision::F32 => FullCache::<B>::f32(),
    };

    // Causal prefill of 37 tokens.
    let (k0, v0, q0) = (
        rand([1, KVH, 37, D]),
        rand([1, KVH, 37, D]),
        rand([1, QH, 37, D]),
    );
    cache.append(k0.clone(), v0.clone()).expect("append");
    let out = cache.attend(q0.clone()).expect("attend");
    assert_eq!(out.dims(), [1, QH, 37, D]);
    let (mut kall, mut vall) = (
        stored(to_vec(k0.clone()), precision),
        stored(to_vec(v0.clone()), precision),
    );
    assert_close(
        &to_vec(out),
        &naive(&to_vec(q0), &kall, &vall, 37, 37),
        "prefill",
    );

    // Single-token decode steps.
    let (mut k_acc, mut v_acc) = (k0, v0);
    for step in 0..5 {
        let (k1, v1, q1) = (
            rand([1, KVH, 1, D]),
            rand([1, KVH, 1, D]),
            rand([1, QH, 1, D]),
        );
        cache.append(k1.clone(), v1.clone()).expect("append");
        k_acc = Tensor::cat(vec![k_acc, k1], 2);
        v_acc = Tensor::cat(vec![v_acc, v1], 2);
        kall = stored(to_vec(k_acc.clone()), precision);
        vall = stored(to_vec(v_acc.clone()), precision);
        let tk = 38 + step;
        assert_eq!(cache.len(), tk);
        let out = cache.attend(q1.clone()).expect("attend");
        assert_close(
            &to_vec(out),
            &naive(&to_vec(q1), &kall, &vall, 1, tk),
            "decode",
        );
    }

    // Footprint: all dense, at the stored width.
    let shape = LayerShape {
        batch: 1,
        kv_heads: KVH,
        tokens: 42,
        head_dim: D,
    };
    let (width, ratio) = match precision {
        DensePrecision::F32 => (4, 0.5),
        DensePrecision::F16 => (2, 1.0),
    };
    assert_eq!(
        cache.footprint().total(),
        Bytes(2 * width * shape.numel() as u64)
    );
    assert_eq!(cache.footprint().ratio_to(shape.fp16_bytes()), ratio);
}

#[test]
fn chunked_prefill_equals_one_shot() {
    // Two appends + attends of 600 and 700 tokens cross the internal query-chunk boundary.
    let device = Default::default();
    let rand =
        |shape: [usize; 4]| Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let (k, v, q) = (
        rand([1, KVH, 1300, D]),
        rand([1, KVH, 1300, D]),
        rand([1, QH, 1300, D]),
    );
    let mut one = FullCache::<B>::new();
    one.append(k.clone(), v.clone()).expect("append");
    let full = one.attend(q.clone()).expect("attend");
    let mut two = FullCache::<B>::new();
    two.append(
        k.clone().slice_dim(2, 0..600),
        v.clone().slice_dim(2, 0..600),
    )
    .expect("append");
    let a = two.attend(q.clone().slice_dim(2, 0..600)).expect("attend");
    two.append(k.slice_dim(2, 600..1300), v.slice_dim(2, 600..1300))
        .expect("append");
    let b = two.attend(q.slice_dim(2, 600..1300)).expect("attend");
    let chunked = Tensor::cat(vec![a, b], 2);
    assert_close(&to_vec(chunked), &to_vec(full), "chunked prefill");
}

#[test]
fn bad_shapes_are_errors() {
    let device = Default::default();
    let mut cache = FullCache::<B>::new();
    assert!(cache.attend(Tensor::zeros([1, QH, 1, D], &device)).is_err());
    cache
        .append(
            Tensor::zeros([1, KVH, 4, D], &device),
            Tensor::zeros([1, KVH, 4, D], &device),
        )
        .expect("append");
    assert!(
        cache
            .append(
                Tensor::zeros([1, KVH, 1, 32], &device),
                Tensor::zeros([1, KVH, 1, 32], &device)
            )
            .is_err()
    );
    assert!(cache.attend(Tensor::zeros([1, QH, 5, D], &device)).is_err());
    assert!(cache.attend(Tensor::zeros([1, 4, 1, D], &device)).is_err());
}

/// Naive window attention: for each KV head, the attention every key receives from each window
/// query of each grouped query head (window query i sits at position t − w + i and sees keys
/// up to it), averaged over those queries and heads.
fn naive_mass(q: &[f32], k: &[f32], w: usize, t: usize) -> Vec<f32> {
    let g = QH / KVH;
    let mut mass = vec![0f64; KVH * t];
    for h in 0..QH {
        let kh = h / g;
        for i in 0..w {
            for (j, p) in naive_probs(q, k, h, i, w, t).into_iter().enumerate() {
                mass[kh * t + j] += p / (g * w) as f64;
            }
        }
    }
    mass.into_iter().map(|x| x as f32).collect()
}

#[test]
fn window_attention_matches_naive_mass() {
    let dev = Default::default();
    // Windows of one query (no causal block), a few queries, and the whole sequence.
    for (w, t) in [(1usize, 7usize), (5, 19), (12, 12)] {
        let q = Tensor::<B, 4>::random([1, QH, w, D], Distribution::Normal(0.0, 1.0), &dev);
        let k = Tensor::<B, 4>::random([1, KVH, t, D], Distribution::Normal(0.0, 1.0), &dev);
        let want = naive_mass(&to_vec(q.clone()), &to_vec(k.clone()), w, t);
        let got: Vec<f32> = crate::window_attention(q, k)
            .expect("shapes agree")
            .into_data()
            .to_vec()
            .expect("f32 data");
        assert_close(&got, &want, &format!("window {w} over {t} keys"));
        for (kh, row) in got.chunks(t).enumerate() {
            let s: f32 = row.iter().sum();
            assert!((s - 1.0).abs() < 1e-4, "head {kh} mass sums to {s}");
        }
    }
}

#[test]
fn attention_mass_is_the_column_sum_of_the_same_softmax() {
    let dev = Default::default();
    for (tq, tk) in [(1usize, 9usize), (6, 6), (7, 23)] {
        let q = Tensor::<B, 4>::random([1, QH, tq, D], Distribution::Normal(0.0, 1.0), &dev);
        let k = Tensor::<B, 4>::random([1, KVH, tk, D], Distribution::Normal(0.0, 1.0), &dev);
        let v = Tensor::<B, 4>::random([1, KVH, tk, D], Distribution::Normal(0.0, 1.0), &dev);
        let (out, mass) = crate::attention_with_mass(q.clone(), k.clone(), v.clone(), None)
            .expect("shapes agree");
        let want_out = naive(&to_vec(q.clone()), &to_vec(k.clone()), &to_vec(v), tq, tk);
        assert_close(&to_vec(out), &want_out, &format!("output, {tq} over {tk}"));
        // The window queries of `naive_mass` are the last tq tokens, averaged: × (g · tq).
        let scale = ((QH / KVH) * tq) as f32;
        let want: Vec<f32> = naive_mass(&to_vec(q), &to_vec(k), tq, tk)
            .into_iter()
            .map(|m| m * scale)
            .collect();
        let got: Vec<f32> = mass.into_data().to_vec().expect("f32 data");
        assert_within(&got, &want, 1e-4, &format!("mass, {tq} over {tk}"));
    }
}

/// Naive peak: for each KV head, the largest weight any of the last `tq` queries of any grouped
/// query head pays each key (0 from a query the key lies after).
fn naive_peak(q: &[f32], k: &[f32], tq: usize, tk: usize) -> Vec<f32> {
    let g = QH / KVH;
    let mut peak = vec![0f64; KVH * tk];
    for h in 0..QH {
        for i in 0..tq {
            for (j, p) in naive_probs(q, k, h, i, tq, tk).into_iter().enumerate() {
                let m = &mut peak[(h / g) * tk + j];
                *m = m.max(p);
            }
        }
    }
    peak.into_iter().map(|x| x as f32).collect()
}

#[test]
fn attention_peak_is_the_largest_weight_of_the_same_softmax() {
    let dev = Default::default();
    // One query, a causal square, and more queries than one query chunk holds.
    let long = crate::ATTENTION_QUERY_CHUNK + 9;
    for (tq, tk) in [(1usize, 9usize), (6, 6), (long, long + 14)] {
        let q = Tensor::<B, 4>::random([1, QH, tq, D], Distribution::Normal(0.0, 1.0), &dev);
        let k = Tensor::<B, 4>::random([1, KVH, tk, D], Distribution::Normal(0.0, 1.0), &dev);
        let v = Tensor::<B, 4>::random([1, KVH, tk, D], Distribution::Normal(0.0, 1.0), &dev);
        let (out, peak) = crate::attention_with_peak(q.clone(), k.clone(), v.clone(), None)
            .expect("shapes agree");
        let want_out = naive(&to_vec(q.clone()), &to_vec(k.clone()), &to_vec(v), tq, tk);
        assert_close(&to_vec(out), &want_out, &format!("output, {tq} over {tk}"));
        let want = naive_peak(&to_vec(q), &to_vec(k), tq, tk);
        let got: Vec<f32> = peak.into_data().to_vec().expect("f32 data");
        assert_within(&got, &want, 1e-5, &format!("peak, {tq} over {tk}"));
    }
}

//! `FullCache::attend` against a naive softmax attention written out loop by loop.
use burn::tensor::{Distribution, Tensor};
use burn_ndarray::NdArray;
use kv_tensor::{Bytes, FullCache, LayerCache, LayerShape};

type B = NdArray<f32>;

const QH: usize = 9;
const KVH: usize = 3;
const D: usize = 64;

fn to_vec(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data().to_vec().expect("f32 data")
}

/// Naive attention: for each query head h (reading KV head h / 3) and query token i at
/// absolute position `offset + i`, softmax over keys 0..=offset+i.
fn naive(q: &[f32], k: &[f32], v: &[f32], tq: usize, tk: usize) -> Vec<f32> {
    let offset = tk - tq;
    let mut out = vec![0f32; QH * tq * D];
    for h in 0..QH {
        let kh = h / (QH / KVH);
        for i in 0..tq {
            let qrow = &q[(h * tq + i) * D..(h * tq + i + 1) * D];
            let visible = offset + i + 1;
            let mut scores: Vec<f64> = (0..visible)
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
            let mut sum = 0.0;
            for s in &mut scores {
                *s = (*s - max).exp();
                sum += *s;
            }
            for (j, s) in scores.iter().enumerate() {
                let vrow = &v[(kh * tk + j) * D..(kh * tk + j + 1) * D];
                for c in 0..D {
                    out[(h * tq + i) * D + c] += (s / sum * vrow[c] as f64) as f32;
                }
            }
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-5, "{what}: max abs error {worst}");
}

#[test]
fn full_cache_matches_naive_attention_prefill_and_decode() {
    let device = Default::default();
    let rand =
        |shape: [usize; 4]| Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let mut cache = FullCache::<B>::new();

    // Causal prefill of 37 tokens.
    let (k0, v0, q0) = (
        rand([1, KVH, 37, D]),
        rand([1, KVH, 37, D]),
        rand([1, QH, 37, D]),
    );
    cache.append(k0.clone(), v0.clone()).expect("append");
    let out = cache.attend(q0.clone()).expect("attend");
    assert_eq!(out.dims(), [1, QH, 37, D]);
    let (mut kall, mut vall) = (to_vec(k0.clone()), to_vec(v0.clone()));
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
        kall = to_vec(k_acc.clone());
        vall = to_vec(v_acc.clone());
        let tk = 38 + step;
        assert_eq!(cache.len(), tk);
        let out = cache.attend(q1.clone()).expect("attend");
        assert_close(
            &to_vec(out),
            &naive(&to_vec(q1), &kall, &vall, 1, tk),
            "decode",
        );
    }

    // Footprint: all dense, f32 on this backend, exactly what the tensors hold.
    let shape = LayerShape {
        batch: 1,
        kv_heads: KVH,
        tokens: 42,
        head_dim: D,
    };
    assert_eq!(
        cache.footprint().total(),
        Bytes(2 * 4 * shape.numel() as u64)
    );
    assert_eq!(cache.footprint().ratio_to(shape.fp16_bytes()), 0.5);
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

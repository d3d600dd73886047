//! Decode on the host streams a GGUF's Q4_1/Q8_0 blocks instead of f32 copies, falls back to
//! f32 rows where blocks cannot be used, and computes the same logits as burn's matmul over the
//! dequantised weights.

use super::support::*;
use crate::gguf::Gguf;
use crate::{Llama, LlamaConfig, Logits, PrefillOptions};
use burn::tensor::Tensor;
use burn_ndarray::NdArray;
use kv_tensor::FullCache;

type B = NdArray<f32>;

/// Logits of every decode step after a prefill of `ids[..split]`.
fn decode_logits(m: &Llama<B>, ids: &[u32], split: usize) -> Vec<Vec<f32>> {
    let mut caches: Vec<FullCache<B>> = (0..LAYERS).map(|_| FullCache::new()).collect();
    let first: Tensor<B, 2> = m
        .prefill(&ids[..split], &mut caches, &PrefillOptions::default())
        .expect("prefill");
    let mut out = vec![first.into_data().to_vec().expect("f32")];
    for &id in &ids[split..] {
        let l: Tensor<B, 2> = m.forward(&[id], &mut caches, Logits::Last).expect("decode");
        out.push(l.into_data().to_vec().expect("f32"));
    }
    out
}

#[test]
fn decode_on_quantised_blocks_matches_matmul() {
    let device = Default::default();
    let g = Gguf::parse(tiny_gguf_quantized(9)).expect("gguf");
    let cfg = LlamaConfig::from_gguf(&g).expect("config");
    let blocks = Llama::<B>::load(cfg, &g, &device).expect("load");

    // What the host path streams: Q4_1 blocks as 24 bytes per 32 weights (f32 scale and
    // minimum, 16 bytes of nibbles), Q8_0 as 36; layer 0's Q/K/V mixes Q4_1 and Q8_0 and the
    // FFN down matrices are F32 in the file, so those stay f32 rows.
    let (q4, q8, f32s) = (
        |n: usize| n / 32 * 24,
        |n: usize| n / 32 * 36,
        |n: usize| n * 4,
    );
    let qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM * HIDDEN;
    let per_layer = q4(HIDDEN * HEADS * HEAD_DIM) + q4(2 * FFN * HIDDEN) + f32s(FFN * HIDDEN);
    let want = f32s(qkv) + q4(qkv) + LAYERS * per_layer + q8(VOCAB * HIDDEN);
    assert_eq!(blocks.host_matvec_bytes(), want);

    let mut matmul = blocks.clone();
    matmul.set_host_matvec(false);
    assert_eq!(matmul.host_matvec_bytes(), 0);

    let ids: Vec<u32> = (0..30).map(|i| (i * 13 % VOCAB) as u32).collect();
    let (a, b) = (
        decode_logits(&blocks, &ids, 20),
        decode_logits(&matmul, &ids, 20),
    );
    assert_eq!(a.len(), 11);
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        let (worst, scale) = worst_and_scale(x, y);
        assert!(scale > 0.1, "step {step}: logits vanish");
        assert!(
            worst <= 1e-4 * scale,
            "step {step}: blocks and matmul differ by {worst} (logit scale {scale})"
        );
    }

    // Turned back on, the host copy is rebuilt from the tensors as f32 rows.
    matmul.set_host_matvec(true);
    let all_f32 = LAYERS
        * (f32s(qkv) + per_layer - q4(HIDDEN * HEADS * HEAD_DIM) - q4(2 * FFN * HIDDEN)
            + f32s(HIDDEN * HEADS * HEAD_DIM)
            + f32s(2 * FFN * HIDDEN))
        + f32s(VOCAB * HIDDEN);
    assert_eq!(matmul.host_matvec_bytes(), all_f32);
}

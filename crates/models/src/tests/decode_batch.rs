//! `decode_batch` steps several sequences (caches of different lengths) at once and gives, row
//! for row, the logits of decoding each alone.

use super::support::*;
use crate::gguf::Gguf;
use crate::{Llama, LlamaConfig, Logits};
use burn::tensor::Tensor;
use burn_ndarray::NdArray;
use kv_tensor::FullCache;

type B = NdArray<f32>;

fn prefilled(m: &Llama<B>, ids: &[u32]) -> Vec<FullCache<B>> {
    let mut caches: Vec<FullCache<B>> = (0..LAYERS).map(|_| FullCache::new()).collect();
    m.forward(ids, &mut caches, Logits::Last).expect("prefill");
    caches
}

#[test]
fn decode_batch_matches_one_sequence_at_a_time() {
    let device = Default::default();
    let g = Gguf::parse(tiny_gguf(9)).expect("gguf");
    let cfg = LlamaConfig::from_gguf(&g).expect("config");
    let m = Llama::<B>::load(cfg, &g, &device).expect("load");
    let prompts: [&[u32]; 3] = [&[1, 2, 3], &[4, 5, 6, 7, 8, 9, 10], &[11]];
    let next = [12u32, 13, 14];
    let mut alone = Vec::new();
    for (p, &id) in prompts.iter().zip(&next) {
        let mut caches = prefilled(&m, p);
        let l: Tensor<B, 2> = m.forward(&[id], &mut caches, Logits::Last).expect("decode");
        alone.push(l);
    }
    let alone = Tensor::cat(alone, 0);
    let mut sets: Vec<Vec<FullCache<B>>> = prompts.iter().map(|p| prefilled(&m, p)).collect();
    let mut refs: Vec<&mut [FullCache<B>]> = sets.iter_mut().map(|s| s.as_mut_slice()).collect();
    let together = m.decode_batch(&next, &mut refs).expect("batch");
    assert_eq!(together.dims(), alone.dims());
    let diff: f32 = (together - alone).abs().max().into_scalar();
    assert!(diff < 1e-4, "max |batched − alone| = {diff}");
    // The caches grew by one token each.
    for (s, p) in sets.iter().zip(&prompts) {
        assert!(
            s.iter()
                .all(|c| kv_tensor::LayerCache::<B>::len(c) == p.len() + 1)
        );
    }
    // A cache set per sequence is required.
    let mut one: Vec<&mut [FullCache<B>]> =
        sets.iter_mut().take(1).map(|s| s.as_mut_slice()).collect();
    assert!(m.decode_batch(&next, &mut one).is_err());
}

//! The same tiny model saved as GGUF (llama.cpp's permuted Q/K, interleaved-pair RoPE) and as
//! HF safetensors (rotate-half RoPE) gives the same logits: both pair layouts are right.

use super::support::*;
use crate::gguf::Gguf;
use crate::{Llama, LlamaConfig, Logits, PrefillOptions, RopeLayout, SafetensorsWeights};
use burn::tensor::Tensor;
use burn_ndarray::NdArray;
use kv_tensor::FullCache;

type B = NdArray<f32>;

fn logits(m: &Llama<B>, ids: &[u32]) -> Vec<f32> {
    let mut caches: Vec<FullCache<B>> = (0..LAYERS).map(|_| FullCache::new()).collect();
    let all: Tensor<B, 2> = m.forward(ids, &mut caches, Logits::All).expect("forward");
    all.into_data().to_vec().expect("f32")
}

#[test]
fn gguf_and_safetensors_layouts_agree() {
    let device = Default::default();
    let g = Gguf::parse(tiny_gguf(5)).expect("gguf");
    let cfg = LlamaConfig::from_gguf(&g).expect("config");
    assert_eq!(cfg.rope_layout, RopeLayout::Interleaved);
    let from_gguf = Llama::<B>::load(cfg, &g, &device).expect("load gguf");

    let dir = std::env::temp_dir().join(format!("kvnd-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let weights = tiny_hf_weights(5);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .expect("view"),
            )
        })
        .collect();
    let st = dir.join("model.safetensors");
    safetensors::tensor::serialize_to_file(views, None, &st).expect("write safetensors");
    let cfg = LlamaConfig::from_hf_json(&tiny_config_json(), "config.json").expect("hf config");
    assert_eq!(cfg.rope_layout, RopeLayout::Halves);
    let from_hf = Llama::<B>::load(
        cfg,
        &SafetensorsWeights::open(&[st]).expect("open"),
        &device,
    )
    .expect("load hf");
    std::fs::remove_dir_all(&dir).ok();

    let ids: Vec<u32> = (0..40).map(|i| (i * 7 % VOCAB) as u32).collect();
    let (a, b) = (logits(&from_gguf, &ids), logits(&from_hf, &ids));
    let (worst, scale) = worst_and_scale(&b, &a);
    // f32 sums in a different order: agreement to 1e-3 of the logit scale (a layout bug is O(1)).
    // Measured: up to 2.7e-4 of the scale when the tests run concurrently, < 1e-4 alone.
    assert!(
        worst <= 1e-3 * scale,
        "layouts disagree by {worst} (logit scale {scale})"
    );
    assert!(scale > 0.1);
}

#[test]
fn chunked_prefill_and_decode_match_one_pass() {
    let device = Default::default();
    let g = Gguf::parse(tiny_gguf(6)).expect("gguf");
    let m =
        Llama::<B>::load(LlamaConfig::from_gguf(&g).expect("config"), &g, &device).expect("load");
    let ids: Vec<u32> = (0..50).map(|i| (i * 11 % VOCAB) as u32).collect();
    let one = logits(&m, &ids);
    // Prefill the first 45 in chunks of 16, then decode the last 5 one at a time.
    let mut caches: Vec<FullCache<B>> = (0..LAYERS).map(|_| FullCache::new()).collect();
    let opts = PrefillOptions {
        chunk: 16,
        ..PrefillOptions::default()
    };
    let mut last = m.prefill(&ids[..45], &mut caches, &opts).expect("prefill");
    for (i, &id) in ids[45..].iter().enumerate() {
        let want = &one[(44 + i) * VOCAB..(45 + i) * VOCAB];
        let got: Vec<f32> = last.into_data().to_vec().expect("f32");
        let (worst, scale) = worst_and_scale(&got, want);
        // 1e-3 of the logit scale: a caching or position bug is O(1). Measured 1.3e-4 at
        // position 44 (the last prefill chunk) (already at 60fc257); not yet explained.
        assert!(
            worst <= 1e-3 * scale,
            "position {}: {worst} (logit scale {scale})",
            44 + i
        );
        last = m.forward(&[id], &mut caches, Logits::Last).expect("decode");
    }
}

#[test]
fn over_long_prompt_is_an_error() {
    let device = Default::default();
    let g = Gguf::parse(tiny_gguf(7)).expect("gguf");
    let m =
        Llama::<B>::load(LlamaConfig::from_gguf(&g).expect("config"), &g, &device).expect("load");
    let mut caches: Vec<FullCache<B>> = (0..LAYERS).map(|_| FullCache::new()).collect();
    let ids = vec![1u32; 300];
    let e = m
        .prefill(&ids, &mut caches, &PrefillOptions::default())
        .expect_err("too long");
    assert!(
        matches!(
            e,
            crate::ModelError::PromptTooLong {
                tokens: 300,
                context: 256
            }
        ),
        "{e}"
    );
    assert!(
        m.prefill(&[], &mut caches, &PrefillOptions::default())
            .is_err()
    );
    assert!(
        m.prefill(&[VOCAB as u32], &mut caches, &PrefillOptions::default())
            .is_err()
    );
}

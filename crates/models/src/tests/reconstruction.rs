//! KVzip's reconstruction pass: the peaks it hands the caches are the largest weights the
//! repeat prompt and repeated context pay each context key, exactly as a plain forward pass
//! over `context ++ prompt ++ piece` computes them, piece by piece; the prefilled caches are
//! left as they were; and a prefill that compresses chunk by chunk runs the pass after its
//! last chunk.
use super::support::*;
use crate::gguf::Gguf;
use crate::{Llama, LlamaConfig, PrefillOptions};
use burn::tensor::Tensor;
use burn_ndarray::NdArray;
use kv_tensor::{
    AxisError, Footprint, KvError, LayerCache, ObservationCtx, RecordingCache, attention_with_peak,
};

type B = NdArray<f32>;

fn model() -> Llama<B> {
    let g = Gguf::parse(tiny_gguf(3)).expect("gguf");
    let cfg = LlamaConfig::from_gguf(&g).expect("config");
    let mut m = Llama::<B>::load(cfg, &g, &Default::default()).expect("load");
    m.set_reconstruction_prompt(vec![7, 3, 11]);
    m
}

fn recording(n: usize) -> Vec<RecordingCache<B>> {
    (0..n).map(|_| RecordingCache::new()).collect()
}

fn values(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().to_vec().expect("f32")
}

/// The peaks of one piece, from a plain prefill of `context ++ prompt ++ piece` that records
/// the last queries of every layer: their attention over the whole sequence, cut to the
/// context's keys.
fn reference_peaks(m: &Llama<B>, context: &[u32], piece: &[u32]) -> Vec<Tensor<B, 3>> {
    let prompt = m.reconstruction_prompt().to_vec();
    let ids: Vec<u32> = context
        .iter()
        .chain(&prompt)
        .chain(piece)
        .copied()
        .collect();
    let w = prompt.len() + piece.len();
    let mut caches = recording(LAYERS);
    let opts = PrefillOptions {
        observe_window: w,
        chunk: ids.len(),
        ..Default::default()
    };
    m.prefill(&ids, &mut caches, &opts).expect("prefill");
    caches
        .iter()
        .map(|c| {
            let q = c
                .observed()
                .and_then(|o| o.window_queries.clone())
                .expect("queries");
            let (k, v) = c.keys_values().expect("kv");
            let (_, peak) = attention_with_peak(q, k, v, None).expect("attention");
            peak.slice_dim(2, 0..context.len())
        })
        .collect()
}

/// A recording cache that forks or not: the pass appends its pieces to a fork of a cache that
/// can fork, and holds them beside one that cannot.
struct MaybeFork {
    inner: RecordingCache<B>,
    forks: bool,
}

impl LayerCache<B> for MaybeFork {
    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<(), AxisError> {
        self.inner.append(k, v)
    }

    fn keys_values(&self) -> Result<(Tensor<B, 4>, Tensor<B, 4>), KvError> {
        self.inner.keys_values()
    }

    fn attend(&self, q: Tensor<B, 4>) -> Result<Tensor<B, 4>, KvError> {
        self.inner.attend(q)
    }

    fn finish_prefill(&mut self, ctx: &ObservationCtx<B>) -> Result<(), AxisError> {
        self.inner.finish_prefill(ctx)
    }

    fn footprint(&self) -> Footprint {
        self.inner.footprint()
    }

    fn len(&self) -> usize {
        self.inner.len()
    }

    fn stored(&self) -> usize {
        self.inner.stored()
    }

    fn fork(&self) -> Option<Box<dyn LayerCache<B>>> {
        if self.forks { self.inner.fork() } else { None }
    }
}

#[test]
fn peaks_match_a_plain_forward_pass_piece_by_piece() {
    let m = model();
    let context: Vec<u32> = (0..23).map(|i| (i * 7 % VOCAB) as u32).collect();
    // One piece (the whole context), and three (pieces of 8: 8 + 8 + 7 tokens), through a
    // fork and held beside a cache that cannot fork.
    for (piece, forks) in [(64usize, true), (8, true), (64, false), (8, false)] {
        let mut caches: Vec<MaybeFork> = recording(LAYERS)
            .into_iter()
            .map(|inner| MaybeFork { inner, forks })
            .collect();
        let opts = PrefillOptions {
            chunk: piece,
            reconstruction: true,
            ..Default::default()
        };
        m.prefill(&context, &mut caches, &opts).expect("prefill");
        let mut want: Vec<Vec<f32>> = vec![Vec::new(); LAYERS];
        for part in context.chunks(piece) {
            for (l, p) in reference_peaks(&m, &context, part).into_iter().enumerate() {
                let p = values(p);
                want[l] = if want[l].is_empty() {
                    p
                } else {
                    want[l].iter().zip(&p).map(|(a, b)| a.max(*b)).collect()
                };
            }
        }
        for (l, c) in caches.iter().enumerate() {
            let got = values(
                c.inner
                    .observed()
                    .and_then(|o| o.reconstruction.clone())
                    .expect("peaks handed to the cache"),
            );
            assert_eq!(got.len(), KV_HEADS * context.len());
            // The reference prefill stores the repeated piece's keys in the cache's fp16; the
            // pass keeps its own rows in f32: weights agree to fp16 rounding.
            let (worst, scale) = worst_and_scale(&got, &want[l]);
            assert!(
                scale > 0.0 && worst <= 5e-4,
                "piece {piece}, fork {forks}, layer {l}: off by {worst}"
            );
            // The pass read the cache and left it as it was: only the context is held.
            assert_eq!(c.len(), context.len());
            assert_eq!(c.stored(), context.len());
        }
    }
}

/// A prefill that compresses chunk by chunk still runs the pass, after its last chunk: caches
/// that keep their prompt (as these do, and as a KVzip layer does) receive the same peaks as
/// from a one-shot prefill.
#[test]
fn chunk_by_chunk_prefill_runs_the_pass_after_the_last_chunk() {
    let m = model();
    let ids: Vec<u32> = (0..23).map(|i| 1 + (i * 5) % 29).collect();
    let peaks = |compress_chunks| {
        let mut caches = recording(LAYERS);
        let opts = PrefillOptions {
            reconstruction: true,
            compress_chunks,
            chunk: 8,
            ..Default::default()
        };
        m.prefill(&ids, &mut caches, &opts).expect("prefill");
        caches
            .iter()
            .map(|c| {
                let p = c.observed().and_then(|o| o.reconstruction.clone());
                values(p.expect("the pass ran"))
            })
            .collect::<Vec<_>>()
    };
    let (chunked, one_shot) = (peaks(true), peaks(false));
    for (l, (a, b)) in chunked.iter().zip(&one_shot).enumerate() {
        assert_eq!(a.len(), KV_HEADS * ids.len(), "layer {l}");
        assert_eq!(a, b, "layer {l}");
    }
}

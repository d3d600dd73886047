//! Prefill at 512 and 2048 tokens, one decode step at ~2048 context, and one batched decode step
//! of 16 sequences at ~2048 context (`decode_batch`), on the embedded model with `FullCache`
//! (needs `cargo xtask fetch-model`). Throughput is in tokens.
use burn_ndarray::NdArray;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kv_tensor::FullCache;
use models::{Logits, PrefillOptions};

type B = NdArray<f32>;

/// Prompt tokens before the decode benchmarks' first step.
const DECODE_FROM: usize = 2000;

fn bench(c: &mut Criterion) {
    let path = models::paths::bench_model().expect("cache dir");
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask fetch-model`",
        path.display()
    );
    let m = models::load_gguf::<B>(&path, &Default::default()).expect("model loads");
    let layers = m.model.config.layers;
    let ids: Vec<u32> = (0..2048u32).map(|i| 100 + (i * 37) % 20000).collect();
    let fresh = || -> Vec<FullCache<B>> { (0..layers).map(|_| FullCache::new()).collect() };
    let mut g = c.benchmark_group("smollm2-135m");
    g.sample_size(10);
    for n in [512usize, 2048] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("prefill/{n}"), |b| {
            b.iter(|| {
                let mut caches = fresh();
                m.model
                    .prefill(&ids[..n], &mut caches, &PrefillOptions::default())
                    .expect("prefill")
                    .into_data()
            })
        });
    }
    // Decode steps continue one cache (one cache set per sequence for the batch): cloning a
    // cache in the setup would share its storage, and the copy-on-write of the first append
    // would then be timed as part of every step. Starting at 2000 tokens, the ~80 steps that
    // warm-up and 10 samples take keep the context around 2048 (2000 to ~2080).
    let mut caches = fresh();
    m.model
        .prefill(&ids[..DECODE_FROM], &mut caches, &PrefillOptions::default())
        .expect("prefill");
    const SEQS: usize = 16;
    let mut sets = vec![caches.clone(); SEQS];
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode/at-2048", |b| {
        b.iter(|| {
            m.model
                .forward(&[42], &mut caches, Logits::Last)
                .expect("decode")
                .into_data()
        })
    });
    g.throughput(Throughput::Elements(SEQS as u64));
    g.bench_function(format!("decode-batch{SEQS}/at-2048"), |b| {
        b.iter(|| {
            let mut refs: Vec<&mut [FullCache<B>]> =
                sets.iter_mut().map(|s| s.as_mut_slice()).collect();
            m.model
                .decode_batch(&[42; SEQS], &mut refs)
                .expect("decode")
                .into_data()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

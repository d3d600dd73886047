//! Prefill at 512 and 2048 tokens, one decode step at 2048 context, and one batched decode step
//! of 16 sequences at 2048 context (`decode_batch`), on the embedded model with `FullCache`
//! (needs `cargo xtask fetch-model`). Throughput is in tokens.
use burn_ndarray::NdArray;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kv_tensor::FullCache;
use models::{Logits, PrefillOptions};

type B = NdArray<f32>;

fn bench(c: &mut Criterion) {
    let path = models::paths::default_model().expect("cache dir");
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
    let mut caches = fresh();
    m.model
        .prefill(&ids[..2047], &mut caches, &PrefillOptions::default())
        .expect("prefill");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode/at-2048", |b| {
        b.iter_batched(
            || caches.clone(),
            |mut cs| {
                m.model
                    .forward(&[42], &mut cs, Logits::Last)
                    .expect("decode")
                    .into_data()
            },
            criterion::BatchSize::LargeInput,
        )
    });
    const SEQS: usize = 16;
    g.throughput(Throughput::Elements(SEQS as u64));
    g.bench_function(format!("decode-batch{SEQS}/at-2048"), |b| {
        b.iter_batched(
            || vec![caches.clone(); SEQS],
            |mut sets| {
                let mut refs: Vec<&mut [FullCache<B>]> =
                    sets.iter_mut().map(|s| s.as_mut_slice()).collect();
                m.model
                    .decode_batch(&[42; SEQS], &mut refs)
                    .expect("decode")
                    .into_data()
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

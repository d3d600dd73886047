//! Scoring + selection time for a 4096-token prompt over all 30 layers of SmolLM2-135M's shape
//! (3 KV heads, 9 query heads, head dim 64), per scorer with top-k at keep 0.25; and the
//! selections alone (top-k, head-wise, redundancy greedy) on one layer. Synthetic K/V: timing
//! does not depend on the values.
use axis_evict::trig::{RopePairing, TrigLayerStats};
use axis_evict::{Evict, EvictSetting, Lambda, ScorerKind, Selection, TrigStats};
use burn::tensor::{Distribution, Tensor};
use burn_ndarray::NdArray;
use criterion::{Criterion, criterion_group, criterion_main};
use kv_tensor::{CompressionAxis, ObservationCtx, Ratio, Segment};
use std::sync::Arc;

type B = NdArray<f32>;

const LAYERS: usize = 30;
const T: usize = 4096;

fn normal<const D: usize>(dims: [usize; D]) -> Tensor<B, D> {
    Tensor::random(dims, Distribution::Normal(0.0, 1.0), &Default::default())
}

fn trig_stats() -> TrigStats {
    TrigStats {
        model_sha256: "bench".into(),
        rope_theta: 1e5,
        pairing: RopePairing::Interleaved,
        q_heads: 9,
        kv_heads: 3,
        head_dim: 64,
        samples: 1,
        layers: (0..LAYERS)
            .map(|l| TrigLayerStats {
                centre: (0..9 * 64).map(|i| ((i + l) as f32 * 0.1).sin()).collect(),
                pair_norm: vec![1.0; 9 * 32],
            })
            .collect(),
    }
}

type Layer = (Tensor<B, 4>, Tensor<B, 4>, ObservationCtx<B>);

fn run(axis: &Evict<B>, s: &EvictSetting, layers: &[Layer]) {
    for (k, v, ctx) in layers {
        let seg = Segment::dense(k.clone(), v.clone(), 0).expect("segment");
        let out = axis.compress(seg, s, ctx).expect("evict");
        // Force the lazy work to finish.
        let _ = out.k.decode().expect("k").into_data();
    }
}

fn bench(c: &mut Criterion) {
    let layers: Vec<Layer> = (0..LAYERS)
        .map(|l| {
            let mut ctx = ObservationCtx::bare(l);
            ctx.window_queries = Some(normal([1, 9, 32, 64]));
            ctx.attention_mass = Some(normal([1, 3, T]).abs());
            (normal([1, 3, T, 64]), normal([1, 3, T, 64]), ctx)
        })
        .collect();
    let axis = Evict::with_trig(Arc::new(trig_stats()));
    let keep = Ratio::new(0.25).expect("ratio");
    let mut g = c.benchmark_group("evict-30-layers-4096-tokens-keep0.25");
    g.sample_size(10);
    for scorer in ScorerKind::ALL {
        let s = EvictSetting::new(scorer, keep);
        g.bench_function(format!("{scorer:?}"), |b| {
            b.iter(|| run(&axis, &s, &layers))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("selection-1-layer-4096-tokens-snapkv-keep0.25");
    g.sample_size(10);
    for (name, sel) in [
        ("top-k", Selection::TopK),
        (
            "head-wise",
            Selection::HeadWise {
                min_share: Ratio::new(0.2).expect("ratio"),
            },
        ),
        (
            "redundancy",
            Selection::Redundancy {
                lambda: Lambda::new(0.1).expect("lambda"),
            },
        ),
    ] {
        let s = EvictSetting::new(ScorerKind::Snapkv, keep).with_selection(sel);
        g.bench_function(name, |b| b.iter(|| run(&axis, &s, &layers[..1])));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

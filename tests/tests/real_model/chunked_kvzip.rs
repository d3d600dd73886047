//! Plans with KVzip layers, prefilled chunk by chunk on the embedded model. KVzip's scores come
//! from the reconstruction pass, which needs the whole context, so a KVzip layer keeps its
//! prompt until the pass after the last chunk while the other layers compress as they go.
use axis_evict::{EvictSetting, ScorerKind};
use kv_tensor::{LayerCache, LayerShape, Ratio};
use kvnd_tests::{B, prose_tokens};
use models::{Logits, PrefillOptions};
use router::{Expert, RoutedCache};

const PROMPT: usize = 700;

fn evicting(scorer: ScorerKind) -> Expert {
    Expert {
        evict: Some(EvictSetting::new(scorer, Ratio::new(0.25).expect("ratio"))),
        ..Expert::FULL
    }
}

/// Prefills `ids` through caches routed by `plan`, then returns the next token's logits and
/// the caches.
fn run(plan: &[Expert], ids: &[u32], chunked: bool) -> (Vec<f32>, Vec<Box<dyn LayerCache<B>>>) {
    let m = kvnd_tests::model();
    let mut caches: Vec<Box<dyn LayerCache<B>>> = plan
        .iter()
        .map(|e| Box::new(RoutedCache::<B>::new(e.clone())) as Box<dyn LayerCache<B>>)
        .collect();
    let opts = PrefillOptions {
        chunk: 256,
        compress_chunks: chunked,
        reconstruction: true,
        ..Default::default()
    };
    m.model.prefill(ids, &mut caches, &opts).expect("prefill");
    let logits = m
        .model
        .forward(&ids[..1], &mut caches, Logits::Last)
        .expect("decode");
    (logits.into_data().to_vec().expect("f32"), caches)
}

#[test]
fn kvzip_plans_prefill_chunk_by_chunk() {
    let m = kvnd_tests::model();
    let c = &m.model.config;
    let ids = prose_tokens(40_000, PROMPT);
    // Every layer KVzip: no layer may compress before the pass, so chunked equals one-shot.
    let all = vec![evicting(ScorerKind::Kvzip); c.layers];
    let (chunked, _) = run(&all, &ids, true);
    let (one_shot, _) = run(&all, &ids, false);
    let worst = chunked
        .iter()
        .zip(&one_shot)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-4, "chunked KVzip plan differs by {worst}");
    // KVzip beside SnapKV: the SnapKV layers compress chunk by chunk, the KVzip layers at the
    // end; each holds what its expert predicts.
    let mixed: Vec<Expert> = (0..c.layers)
        .map(|l| evicting([ScorerKind::Kvzip, ScorerKind::Snapkv][l % 2]))
        .collect();
    let (logits, caches) = run(&mixed, &ids, true);
    assert!(logits.iter().all(|x| x.is_finite()));
    let shape = LayerShape {
        batch: 1,
        kv_heads: c.kv_heads,
        tokens: PROMPT,
        head_dim: c.head_dim,
    };
    for (l, (cache, e)) in caches.iter().zip(&mixed).enumerate() {
        // The decode step added one fp16 row to the window.
        assert_eq!(cache.stored(), e.kept(PROMPT) + 1, "layer {l}");
        let f = e.footprint(&shape, PROMPT);
        let row = LayerShape { tokens: 1, ..shape }.fp16_bytes().get();
        assert_eq!(
            cache.footprint().total().get(),
            f.total().get() + row,
            "layer {l}"
        );
    }
}

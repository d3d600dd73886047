//! Eviction scorers on the embedded model. The context is 2048 prose tokens, compressed
//! question-agnostically at the end of prefill; quality is the relative error of the attention
//! outputs of the *next* 64 tokens' queries (held out: no scorer saw them) over the compressed
//! context plus those 64 tokens. Prints the table (`--nocapture`); asserts that at keep 0.25
//! every attention-based scorer beats random.
use axis_evict::{Evict, EvictSetting, ScorerKind};
use burn::tensor::Tensor;
use kv_tensor::{CompressionAxis, LayerCache, Ratio, Segment, attention};
use kvnd_tests::{capture_with, prose_tokens, rel_err};
use models::PrefillOptions;

const CTX: usize = 2048;
const FUTURE: usize = 64;

#[test]
fn scorers_on_real_kv() {
    let ids = prose_tokens(20_000, CTX + FUTURE);
    let ctx_caches = capture_with(
        &ids[..CTX],
        PrefillOptions {
            observe_window: 32,
            attention_mass: true,
            ..Default::default()
        },
    );
    let all_caches = capture_with(
        &ids,
        PrefillOptions {
            observe_window: FUTURE,
            ..Default::default()
        },
    );
    let keeps = [0.5, 0.25, 0.1];
    let mut table: Vec<(ScorerKind, [f64; 3])> = Vec::new();
    for scorer in ScorerKind::ALL {
        let mut sums = [0f64; 3];
        for (layer, (c, a)) in ctx_caches.iter().zip(&all_caches).enumerate() {
            let obs = c.observed().expect("observed").clone();
            let (k, v) = c.keys_values().expect("kv");
            let (ka, va) = a.keys_values().expect("kv");
            let q = a
                .observed()
                .and_then(|o| o.window_queries.clone())
                .expect("future queries");
            let (kf, vf) = (
                ka.clone().slice_dim(2, CTX..CTX + FUTURE),
                va.clone().slice_dim(2, CTX..CTX + FUTURE),
            );
            let reference = attention(q.clone(), ka, va).expect("attention");
            for (i, keep) in keeps.iter().enumerate() {
                let s = EvictSetting::new(scorer, Ratio::new(*keep).expect("ratio"));
                let seg = Segment::dense(k.clone(), v.clone(), 0).expect("segment");
                let out = Evict::new()
                    .compress(seg, &s, &obs)
                    .unwrap_or_else(|e| panic!("{scorer:?} layer {layer}: {e}"));
                let kc = Tensor::cat(vec![out.k.decode().expect("k"), kf.clone()], 2);
                let vc = Tensor::cat(vec![out.v.decode().expect("v"), vf.clone()], 2);
                sums[i] += rel_err(
                    attention(q.clone(), kc, vc).expect("attention"),
                    reference.clone(),
                );
            }
        }
        let n = ctx_caches.len() as f64;
        table.push((scorer, sums.map(|s| s / n)));
    }
    eprintln!(
        "scorer             | keep 0.5 | keep 0.25 | keep 0.1   (mean relative attention-output error over 30 layers)"
    );
    for (s, e) in &table {
        eprintln!(
            "{:18} | {:8.4} | {:9.4} | {:8.4}",
            format!("{s:?}"),
            e[0],
            e[1],
            e[2]
        );
    }
    let err = |k: ScorerKind| {
        table
            .iter()
            .find(|(s, _)| *s == k)
            .map(|(_, e)| e[1])
            .expect("scored")
    };
    let random = err(ScorerKind::Random);
    for s in [
        ScorerKind::Snapkv,
        ScorerKind::H2o,
        ScorerKind::Tova,
        ScorerKind::ExpectedAttention,
    ] {
        assert!(
            err(s) < random,
            "{s:?} ({}) does not beat random ({random}) at keep 0.25",
            err(s)
        );
    }
    // Less kept, more error, for every scorer.
    for (s, e) in &table {
        assert!(e[0] <= e[1] && e[1] <= e[2], "{s:?}: {e:?}");
    }
}

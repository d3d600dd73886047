//! Eviction scorers on the embedded model. The context is 2048 prose tokens, compressed
//! question-agnostically at the end of prefill; quality is the relative error of the attention
//! outputs of the *next* 64 tokens' queries (held out: no scorer saw them) over the compressed
//! context plus those 64 tokens. Prints the table (`--nocapture`); asserts that at keep 0.25
//! every attention-based scorer (and trig, calibrated on another passage, and KVzip) beats random, and
//! that head-wise budgets and the redundancy penalty are measured on the same footing.
use axis_evict::{Evict, EvictSetting, Lambda, ScorerKind, Selection};
use kv_tensor::{CompressionAxis, LayerCache, Ratio, Segment, attention, attention_padded};
use kvnd_tests::{capture_with, prose_tokens, rel_err};
use models::PrefillOptions;
use std::sync::Arc;

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
            reconstruction: true,
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
    // Trig statistics from a different passage than the one evaluated.
    let calib = prose_tokens(200_000, CTX);
    let m = kvnd_tests::model();
    let (trig, _) = solver::fit_axes(&m.model, &[calib], "test", |_, _| {}).expect("fit");
    let axis = Evict::with_trig(Arc::new(trig));
    let keeps = [0.5, 0.25, 0.1];
    let mut rows: Vec<(String, ScorerKind, Selection)> = ScorerKind::ALL
        .iter()
        .map(|&s| (format!("{s:?}"), s, Selection::TopK))
        .collect();
    rows.push((
        "Snapkv+AdaKV".into(),
        ScorerKind::Snapkv,
        Selection::HeadWise {
            min_share: Ratio::new(0.2).expect("ratio"),
        },
    ));
    for lambda in [0.1, 0.3] {
        rows.push((
            format!("Snapkv+redund{lambda}"),
            ScorerKind::Snapkv,
            Selection::Redundancy {
                lambda: Lambda::new(lambda).expect("lambda"),
            },
        ));
    }
    let mut table: Vec<(String, [f64; 3])> = Vec::new();
    for (name, scorer, selection) in rows {
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
                let s = EvictSetting::new(scorer, Ratio::new(*keep).expect("ratio"))
                    .with_selection(selection);
                let seg = Segment::dense(k.clone(), v.clone(), 0).expect("segment");
                let out = axis
                    .compress(seg, &s, &obs)
                    .unwrap_or_else(|e| panic!("{name} layer {layer}: {e}"));
                // Through a compressed layer so ragged (head-wise) segments are padded and
                // masked exactly as at inference.
                let mut cl = kv_tensor::CompressedLayer::new();
                cl.push_segment(out).expect("push");
                cl.push(kf.clone(), vf.clone()).expect("future");
                let (kc, vc) = cl.decode().expect("decode");
                sums[i] += rel_err(
                    attention_padded(q.clone(), kc, vc, cl.padding()).expect("attention"),
                    reference.clone(),
                );
            }
        }
        let n = ctx_caches.len() as f64;
        table.push((name, sums.map(|s| s / n)));
    }
    eprintln!(
        "scorer             | keep 0.5 | keep 0.25 | keep 0.1   (mean relative attention-output error over 30 layers)"
    );
    for (s, e) in &table {
        eprintln!("{s:18} | {:8.4} | {:9.4} | {:8.4}", e[0], e[1], e[2]);
    }
    let err = |k: &str| {
        table
            .iter()
            .find(|(s, _)| s == k)
            .map(|(_, e)| e[1])
            .expect("scored")
    };
    let random = err("Random");
    for s in [
        "Snapkv",
        "H2o",
        "Tova",
        "ExpectedAttention",
        "Trig",
        "Kvzip",
        "Snapkv+AdaKV",
        "Snapkv+redund0.1",
    ] {
        assert!(
            err(s) < random,
            "{s} ({}) does not beat random ({random}) at keep 0.25",
            err(s)
        );
    }
    // Less kept, more error, for every scorer.
    for (s, e) in &table {
        assert!(e[0] <= e[1] && e[1] <= e[2], "{s:?}: {e:?}");
    }
}

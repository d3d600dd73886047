//! The embedded model against logits computed by an independent implementation over the same
//! GGUF (`shared/fixtures/smollm2_reference.json`): token ids identical, top-5 ids identical in
//! order, every listed logit within 0.05.
use burn::tensor::Tensor;
use kv_tensor::FullCache;
use kvnd_tests::{B, fixture, model};
use models::PrefillOptions;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    ids: Vec<u32>,
    top: Vec<Top>,
}

#[derive(Deserialize)]
struct Top {
    id: usize,
    logit: f32,
}

#[test]
fn smollm2_matches_reference_logits() {
    let text =
        std::fs::read_to_string(fixture("smollm2_reference.json")).expect("fixture readable");
    let fx: Fixture = serde_json::from_str(&text).expect("fixture parses");
    assert!(fx.cases.len() >= 3);
    let m = model();
    for case in &fx.cases {
        let ids = m.tokenizer.encode(&case.prompt).expect("encodes");
        assert_eq!(ids, case.ids, "token ids of {:?}", case.prompt);
        let mut caches: Vec<FullCache<B>> = (0..m.model.config.layers)
            .map(|_| FullCache::new())
            .collect();
        let logits: Tensor<B, 2> = m
            .model
            .prefill(&ids, &mut caches, &PrefillOptions::default())
            .expect("prefill");
        let logits: Vec<f32> = logits.into_data().to_vec().expect("f32");
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let want: Vec<usize> = case.top.iter().take(5).map(|t| t.id).collect();
        assert_eq!(&order[..5], &want[..], "top-5 of {:?}", case.prompt);
        for t in &case.top {
            let got = logits[t.id];
            assert!(
                (got - t.logit).abs() <= 0.05,
                "{:?}: logit of {} is {got}, reference {}",
                case.prompt,
                t.id,
                t.logit
            );
        }
    }
}

//! The embedded model against logits computed by an independent implementation over the same
//! GGUF (`shared/fixtures/smollm2_reference.json`): token ids identical, top-5 ids identical in
//! order, every listed logit within 0.05.
use burn::tensor::Tensor;
use kv_tensor::FullCache;
use kvnd_tests::{B, fixture, model};
use models::{Logits, PrefillOptions};
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

/// Checks one case's next-token logits against the reference.
fn check(case: &Case, logits: &[f32], path: &str) {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let want: Vec<usize> = case.top.iter().take(5).map(|t| t.id).collect();
    assert_eq!(&order[..5], &want[..], "{path}: top-5 of {:?}", case.prompt);
    for t in &case.top {
        let got = logits[t.id];
        assert!(
            (got - t.logit).abs() <= 0.05,
            "{path}: {:?}: logit of {} is {got}, reference {}",
            case.prompt,
            t.id,
            t.logit
        );
    }
}

fn fixture_cases() -> Vec<Case> {
    let text =
        std::fs::read_to_string(fixture("smollm2_reference.json")).expect("fixture readable");
    let fx: Fixture = serde_json::from_str(&text).expect("fixture parses");
    assert!(fx.cases.len() >= 3);
    fx.cases
}

fn caches() -> Vec<FullCache<B>> {
    (0..model().model.config.layers)
        .map(|_| FullCache::new())
        .collect()
}

#[test]
fn smollm2_matches_reference_logits() {
    let m = model();
    for case in &fixture_cases() {
        let ids = m.tokenizer.encode(&case.prompt).expect("encodes");
        assert_eq!(ids, case.ids, "token ids of {:?}", case.prompt);
        let logits: Tensor<B, 2> = m
            .model
            .prefill(&ids, &mut caches(), &PrefillOptions::default())
            .expect("prefill");
        check(case, &logits.into_data().to_vec().expect("f32"), "prefill");
    }
}

/// The last prompt token as a decode step: on the CPU this is the host path that streams the
/// file's Q4_1/Q8_0 blocks, so the quantised kernels are held to the reference too.
#[test]
fn smollm2_decode_step_matches_reference_logits() {
    let m = model();
    for case in &fixture_cases() {
        let (last, head) = case.ids.split_last().expect("non-empty prompt");
        let mut caches = caches();
        m.model
            .prefill(head, &mut caches, &PrefillOptions::default())
            .expect("prefill");
        let logits: Tensor<B, 2> = m
            .model
            .forward(&[*last], &mut caches, Logits::Last)
            .expect("decode");
        check(case, &logits.into_data().to_vec().expect("f32"), "decode");
    }
}

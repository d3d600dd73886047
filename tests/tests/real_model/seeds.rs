//! The seeds' rows on the embedded model: MoQAE's learned router trains on the frozen model and
//! λ moves its width, and decode-time compression holds a real generation within its budget.
use axis_evict::{EvictSetting, ScorerKind};
use axis_quant::moqae::learned::{TrainOptions, Voting, train};
use axis_quant::moqae::{ChunkRouter, DEFAULT_CHUNK, MoqaeCache};
use burn::tensor::activation::log_softmax;
use kv_tensor::{Bits, FullCache, LayerCache, Ratio};
use kvnd_tests::{B, model, prose_tokens};
use models::{Logits, PrefillOptions};
use router::{DecodeBudget, Expert, RoutedCache};
use std::sync::Arc;

/// Mean NLL of `ids[1..]` fed after a prefill of `prompt` through `caches`, in blocks of 16.
fn continuation_nll(caches: &mut [Box<dyn LayerCache<B>>], prompt: &[u32], ids: &[u32]) -> f64 {
    let m = &model().model;
    m.prefill(prompt, caches, &PrefillOptions::default())
        .expect("prefill");
    let mut sum = 0.0;
    let mut n = 0;
    for start in (0..ids.len() - 1).step_by(16) {
        let end = (start + 16).min(ids.len() - 1);
        let logits = m
            .forward(&ids[start..end], caches, Logits::All)
            .expect("forward");
        let lp: Vec<f32> = log_softmax(logits, 1).into_data().iter::<f32>().collect();
        let vocab = lp.len() / (end - start);
        for (i, &t) in ids[start + 1..end + 1].iter().enumerate() {
            sum -= lp[i * vocab + t as usize] as f64;
            n += 1;
        }
    }
    sum / n as f64
}

/// Trained on the model's own keys, values and attention, the router routes more bits at a
/// larger λ, and a cache it routes keeps its first chunk at 16 bits and shrinks the rest.
#[test]
fn learned_moqae_router_trains_on_the_frozen_model() {
    let m = model();
    let ids = prose_tokens(300_000, 512 + 64);
    let set = solver::moqae::training_set(
        &m.model,
        std::slice::from_ref(&ids),
        512,
        64,
        DEFAULT_CHUNK,
        |_, _| {},
    )
    .expect("training set");
    assert_eq!(
        set.features,
        2 * m.model.config.kv_heads * m.model.config.head_dim
    );
    assert_eq!(
        set.weight.len(),
        m.model.config.layers * (512 - DEFAULT_CHUNK)
    );
    let experts: Vec<Bits> = [16u8, 4, 2]
        .iter()
        .map(|&b| Bits::try_from(b).expect("bits"))
        .collect();
    let mean_bits = |lambda: f64| {
        let opts = TrainOptions {
            lambda,
            steps: 120,
            ..Default::default()
        };
        let r = train::<B>(&set, &experts, &opts, &Default::default(), |_, _| {}).expect("trains");
        let v = r.vote(0, &set.rows, DEFAULT_CHUNK).expect("routes");
        (
            v.iter().map(|b| b.get() as f64).sum::<f64>() / v.len() as f64,
            r,
        )
    };
    let (low, _) = mean_bits(0.05);
    let (high, router) = mean_bits(0.9);
    assert!(low < high, "λ 0.05: {low} bits, λ 0.9: {high} bits");
    let voting: Arc<dyn ChunkRouter> = Arc::new(Voting {
        router: Arc::new(router),
    });
    let mut caches: Vec<Box<dyn LayerCache<B>>> = (0..m.model.config.layers)
        .map(|l| {
            Box::new(MoqaeCache::<B>::new(voting.clone(), l, DEFAULT_CHUNK))
                as Box<dyn LayerCache<B>>
        })
        .collect();
    let prompt = prose_tokens(900_000, 512);
    m.model
        .prefill(&prompt, &mut caches, &PrefillOptions::default())
        .expect("prefill");
    let fp16 = m.model.config.kv_layout().fp16_bytes(1, 512).get();
    let bytes: u64 = caches.iter().map(|c| c.footprint().total().get()).sum();
    assert!(bytes < fp16, "{bytes} ≥ fp16 {fp16}");
}

/// A routed plan with a decode budget of 64 tokens holds every layer at 64 + 16 tokens while
/// 240 tokens of prose are fed after a 128-token prompt, its bytes under the expert's priced
/// peak, and its continuation NLL stays within one nat of the full cache's (positions kept
/// right through re-evictions).
#[test]
fn decode_budget_holds_a_real_generation() {
    let m = model();
    let ids = prose_tokens(1_200_000, 128 + 240);
    let (prompt, cont) = ids.split_at(128);
    let layers = m.model.config.layers;
    let expert = Expert {
        evict: Some(EvictSetting::new(
            ScorerKind::Snapkv,
            Ratio::new(0.5).expect("ratio"),
        )),
        quant: Some(axis_quant::QuantSetting::new(
            Bits::try_from(4).expect("b"),
            Bits::try_from(4).expect("b"),
        )),
        residual: Some(16),
        decode: Some(DecodeBudget {
            tokens: 64,
            interval: 16,
        }),
        ..Expert::FULL
    };
    expert.validate(m.model.config.head_dim).expect("valid");
    let mut full: Vec<Box<dyn LayerCache<B>>> = (0..layers)
        .map(|_| Box::new(FullCache::<B>::new()) as Box<dyn LayerCache<B>>)
        .collect();
    let reference = continuation_nll(&mut full, prompt, cont);
    let mut caches: Vec<Box<dyn LayerCache<B>>> = (0..layers)
        .map(|_| Box::new(RoutedCache::<B>::new(expert.clone())) as Box<dyn LayerCache<B>>)
        .collect();
    let nll = continuation_nll(&mut caches, prompt, cont);
    let shape = m.model.config.kv_layout().layer_shape(1, 128);
    let peak = expert
        .decode_peak(&shape, 128)
        .expect("budget")
        .total()
        .get();
    for c in &caches {
        assert!(c.stored() <= 64 + 16, "{} tokens held", c.stored());
        assert!(c.footprint().total().get() <= peak);
        assert_eq!(c.len(), 128 + 239);
    }
    assert!(
        nll.is_finite() && nll < reference + 1.0,
        "nll {nll} vs full {reference}"
    );
}

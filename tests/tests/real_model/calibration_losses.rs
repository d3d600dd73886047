//! The calibration losses on the embedded model: a retrieval passage from the calibration split
//! is read as the evaluation reads a task (its answer scored by teacher forcing), the identity
//! expert loses nothing end to end, and `calibrate` with an end-to-end loss reports what
//! `EndToEnd` measures.
use eval::Task;
use eval::tasks::{Sources, fit};
use kv_tensor::FullCache;
use kvnd_tests::model;
use models::{Logits, PrefillOptions};
use router::{Axes, Expert};
use solver::{CalibrationLoss, CalibrationOptions, EndToEnd, Passage};

fn retrieval_passage() -> Passage {
    let m = model();
    let dir = models::paths::sotu_dir().expect("no cache directory: set KVND_HOME");
    let text = eval::data::corpus(&dir).expect("run `cargo xtask fetch-data` first");
    let src = Sources::new(eval::data::calibration_text(&text), None, None);
    let t = fit(
        Task::NiahSingle2,
        &src,
        &m.tokenizer,
        m.chat.as_ref(),
        384,
        11,
    )
    .expect("fits");
    Passage::retrieval(t.context, &t.question, &t.target).expect("passage")
}

/// The reference answer log-probability is the one a plain forward over context, question and
/// answer gives the answer's tokens (so the probe's rows are aligned with its answer).
#[test]
fn end_to_end_scores_the_answer_rows() {
    let m = model();
    let p = retrieval_passage();
    let axes = Axes::default();
    let menu = solver::default_menu(axis_evict::ScorerKind::ExpectedAttention);
    let e2e = EndToEnd::new(&m.model, &p, &menu[..1], &axes, 32).expect("prefill");
    let all = [p.context(), p.probe()].concat();
    let mut caches: Vec<FullCache<kvnd_tests::B>> = (0..m.model.config.layers)
        .map(|_| FullCache::new())
        .collect();
    let c = p.context().len();
    m.model
        .prefill(&all[..c], &mut caches, &PrefillOptions::default())
        .expect("prefill");
    let logits = m
        .model
        .forward(&all[c..all.len() - 1], &mut caches, Logits::All)
        .expect("forward");
    let rows = logits.dims()[0];
    let logp =
        burn::tensor::activation::log_softmax(logits.slice_dim(0, rows - p.answer()..rows), 1);
    let want = -solver::measured::nll(&logp, p.answer_tokens());
    let got = e2e.reference_logp();
    assert!(
        (got - want).abs() < 1e-3,
        "reference {got} vs plain forward {want}"
    );
    assert!(got < 0.0 && got.is_finite(), "log-probability {got}");
}

/// The identity expert loses nothing on either end-to-end loss; the attention loss is refused
/// there; and `calibrate` with an end-to-end loss reports `EndToEnd`'s values.
#[test]
fn end_to_end_losses_match_calibration() {
    let m = model();
    let p = retrieval_passage();
    let axes = Axes::default();
    let full = solver::default_menu(axis_evict::ScorerKind::ExpectedAttention);
    let menu: Vec<Expert> = [0, 37, 95].iter().map(|&i| full[i].clone()).collect();
    let e2e = EndToEnd::new(&m.model, &p, &menu, &axes, 32).expect("prefill");
    let layer = 3;
    let pairs: Vec<(usize, &Expert)> = menu.iter().map(|e| (layer, e)).collect();
    let both = e2e.both(&pairs, |_, _| {}).expect("measure");
    assert!(both[0].kl.abs() < 1e-4, "identity KL {}", both[0].kl);
    assert!(
        both[0].answer_logp_drop.abs() < 1e-3,
        "identity drop {}",
        both[0].answer_logp_drop
    );
    assert!(both[2].kl > both[0].kl, "{both:?}");
    assert!(
        e2e.measure(&pairs, CalibrationLoss::Attention, |_, _| {})
            .is_err()
    );
    for loss in [CalibrationLoss::Kl, CalibrationLoss::AnswerLogp] {
        let opts = CalibrationOptions {
            loss,
            ..Default::default()
        };
        let table = solver::calibrate(
            &m.model,
            std::slice::from_ref(&p),
            &menu,
            &axes,
            &opts,
            |_, _| {},
        )
        .expect("calibrate");
        for (e, b) in both.iter().enumerate() {
            let want = b.get(loss).expect("end to end");
            let got = table[layer][e];
            // Forwards on several cores are not bit-reproducible: 1e-4 is far below any real loss.
            assert!(
                (got - want).abs() < 1e-4,
                "{loss} expert {e}: {got} vs {want}"
            );
        }
    }
}

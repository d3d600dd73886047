//! The calibration proxy (relative attention-output error of one layer) ranks (layer, expert)
//! pairs like the end-to-end KL it stands for: Spearman correlation on the embedded model, a
//! 512-token context, 5 layers × 6 experts. (`cargo xtask validate-proxy` runs it at 2048.)
use kvnd_tests::{model, prose_tokens};
use router::Axes;
use solver::{
    CalibrationLoss, CalibrationOptions, LossPredictor, MeasuredLoss, Passage, SensitivityTable,
    spearman,
};

#[test]
fn proxy_ranks_like_measured_kl() {
    let m = model();
    let full = solver::default_menu(axis_evict::ScorerKind::ExpectedAttention);
    // Spread over the menu: identity, light and heavy eviction and quantization.
    let menu: Vec<router::Expert> = [0, 20, 37, 58, 75, 95]
        .iter()
        .map(|&i| full[i].clone())
        .collect();
    let axes = Axes::default();
    let opts = CalibrationOptions::default();
    let calib = Passage::prose(&prose_tokens(300_000, 512 + 64), 512).expect("passage");
    let loss =
        solver::calibrate(&m.model, &[calib], &menu, &axes, &opts, |_, _| {}).expect("calibrate");
    let table = SensitivityTable {
        model_sha256: "test".into(),
        tokens: 512,
        menu: menu.clone(),
        loss,
        passage_loss: Vec::new(),
    };
    let layers = [0, 7, 14, 21, 29];
    let pairs: Vec<(usize, router::Expert)> = layers
        .iter()
        .flat_map(|&l| menu.iter().map(move |e| (l, e.clone())))
        .collect();
    let held_out = Passage::prose(&prose_tokens(700_000, 512 + 48), 512).expect("passage");
    let measured = MeasuredLoss::measure(
        &m.model,
        &[held_out],
        &pairs,
        &axes,
        CalibrationLoss::Kl,
        |_, _| {},
    )
    .expect("measure");
    let (mut p, mut k) = (Vec::new(), Vec::new());
    for (l, e, kl) in &measured.entries {
        assert!(kl.is_finite() && *kl > -1e-4, "layer {l} {e}: KL {kl}");
        p.push(table.loss(*l, e).expect("in table"));
        k.push(*kl);
        assert_eq!(measured.loss(*l, e), Some(*kl));
    }
    // The identity expert loses (almost) nothing on both measures.
    for &l in &layers {
        assert!(measured.loss(l, &menu[0]).expect("identity") < 1e-4);
    }
    let r = spearman(&p, &k).expect("defined");
    eprintln!("Spearman(proxy, KL) = {r:.3} over {} pairs", k.len());
    assert!(r > 0.5, "proxy and KL disagree: Spearman {r}");
}

//! Low-rank projection on the embedded model: bases calibrated on one 1024-token passage,
//! measured on another. Prints explained variance of K and V at ranks {16, 32, 48} per layer and
//! the relative attention-output error vs rank (`--nocapture`); checks the composition
//! evict → project → quantize on real K/V.
use axis_evict::{Evict, EvictSetting, ScorerKind};
use axis_lowrank::{LowRank, LowRankSetting, PcaAccumulator};
use axis_quant::{Kivi, QuantSetting};
use kv_tensor::{Bits, CompressionAxis, Encoded, LayerCache, Ratio, Segment, attention};
use kvnd_tests::{B, capture, prose_tokens, rel_err};

#[test]
fn lowrank_on_real_kv() {
    let calib = capture(&prose_tokens(60_000, 1024), 64);
    let eval = capture(&prose_tokens(120_000, 1024), 64);
    let layers = calib.len();
    let mut acc = PcaAccumulator::new(layers, 3, 64);
    for (l, c) in calib.iter().enumerate() {
        let (k, v) = c.keys_values().expect("kv");
        acc.add(l, &k, &v).expect("accumulate");
    }
    let bases = acc.finish("test");
    let axis = LowRank::<B>::new(&bases, &Default::default()).expect("bases");
    let ranks = [16usize, 32, 48, 64];
    let mut mean_err = [0f64; 4];
    eprintln!(
        "layer | K expl 16/32/48      | V expl 16/32/48      | attn err r16 / r32 / r48 / r64 (K and V projected)"
    );
    for (l, c) in eval.iter().enumerate() {
        let (k, v) = c.keys_values().expect("kv");
        let q = c
            .observed()
            .and_then(|o| o.window_queries.clone())
            .expect("queries");
        let reference = attention(q.clone(), k.clone(), v.clone()).expect("attention");
        let mut errs = Vec::new();
        for (i, &r) in ranks.iter().enumerate() {
            let s = LowRankSetting {
                k_rank: Some(r),
                v_rank: Some(r),
            };
            let seg = axis
                .compress(
                    Segment::dense(k.clone(), v.clone(), 0).expect("seg"),
                    &s,
                    &kv_tensor::ObservationCtx::bare(l),
                )
                .expect("project");
            let e = rel_err(
                attention(
                    q.clone(),
                    seg.k.decode().expect("k"),
                    seg.v.decode().expect("v"),
                )
                .expect("attention"),
                reference.clone(),
            );
            mean_err[i] += e / layers as f64;
            errs.push(e);
        }
        let ex = |side: usize| [16, 32, 48].map(|r| bases.explained(l, side, r));
        let (ke, ve) = (ex(0), ex(1));
        for side in [ke, ve] {
            assert!(
                side[0] <= side[1] && side[1] <= side[2] && side[2] <= 1.0 + 1e-9,
                "{side:?}"
            );
        }
        eprintln!(
            "{l:5} | {:.3} {:.3} {:.3}    | {:.3} {:.3} {:.3}    | {:.4} {:.4} {:.4} {:.6}",
            ke[0], ke[1], ke[2], ve[0], ve[1], ve[2], errs[0], errs[1], errs[2], errs[3]
        );
        assert!(errs[3] < 1e-3, "full rank must reconstruct: {}", errs[3]);
    }
    eprintln!(
        "mean attention error r16 {:.4} r32 {:.4} r48 {:.4} r64 {:.6}",
        mean_err[0], mean_err[1], mean_err[2], mean_err[3]
    );
    assert!(mean_err[0] > mean_err[1] && mean_err[1] > mean_err[2] && mean_err[2] > mean_err[3]);

    // Composition on real K/V of one layer: evict (keep 0.5) → project (rank 32) → quantize the
    // coefficients (4 bits); the error stays bounded and each stage is what it claims.
    let (k, v) = eval[10].keys_values().expect("kv");
    let obs = eval[10].observed().expect("observed").clone();
    let seg = Evict::new()
        .compress(
            Segment::dense(k.clone(), v.clone(), 0).expect("seg"),
            &EvictSetting::new(ScorerKind::Snapkv, Ratio::new(0.5).expect("r")),
            &obs,
        )
        .expect("evict");
    assert_eq!(seg.len(), 512);
    let seg = axis
        .compress(
            seg,
            &LowRankSetting {
                k_rank: Some(32),
                v_rank: Some(32),
            },
            &obs,
        )
        .expect("project");
    let four = Bits::try_from(4).expect("bits");
    let seg = Kivi
        .compress(seg, &QuantSetting::new(four, four), &obs)
        .expect("quantize");
    let Encoded::Projected { coeffs, .. } = &seg.k else {
        panic!("keys should be projected")
    };
    assert!(
        matches!(**coeffs, Encoded::Quantized(_)),
        "coefficients should be quantized"
    );
    let q = obs.window_queries.clone().expect("queries");
    let reference = attention(q.clone(), k, v).expect("attention");
    let e = rel_err(
        attention(q, seg.k.decode().expect("k"), seg.v.decode().expect("v")).expect("attention"),
        reference,
    );
    eprintln!("layer 10, evict 0.5 → rank 32 → 4-bit: relative attention error {e:.4}");
    assert!(e.is_finite() && e < 1.0, "{e}");
}

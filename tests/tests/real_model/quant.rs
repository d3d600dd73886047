//! KIVI on the embedded model: K/V of a 1k-token prose prompt, relative attention-output
//! error of the last 64 queries per layer for K/V bits {8, 4, 3, 2}, and per-channel vs
//! per-token keys. Prints the table (run with `--nocapture`) and asserts sane bounds.
use axis_quant::quantize;
use kv_tensor::{CodeBits, GroupAxis, LayerCache, attention};
use kvnd_tests::{capture, prose_tokens, rel_err};

#[test]
fn kivi_attention_error_on_real_kv() {
    let ids = prose_tokens(0, 1024);
    let caches = capture(&ids, 64);
    let bits = [CodeBits::B8, CodeBits::B4, CodeBits::B3, CodeBits::B2];
    let mut sums = [0f64; 4];
    let (mut chan, mut tok) = ([0f64; 2], [0f64; 2]);
    eprintln!(
        "layer |   K8V8 |   K4V4 |   K3V3 |   K2V2 | K4 per-chan | K4 per-tok | K2 per-chan | K2 per-tok"
    );
    for (l, c) in caches.iter().enumerate() {
        let (k, v) = c.keys_values().expect("kv");
        let q = c
            .observed()
            .and_then(|o| o.window_queries.clone())
            .expect("window queries");
        let reference = attention(q.clone(), k.clone(), v.clone()).expect("attention");
        let mut row = Vec::new();
        for (i, b) in bits.iter().enumerate() {
            let kq = quantize(k.clone(), *b, 32, GroupAxis::Tokens, "keys")
                .expect("q")
                .decode()
                .expect("d");
            let vq = quantize(v.clone(), *b, 32, GroupAxis::Channels, "values")
                .expect("q")
                .decode()
                .expect("d");
            let e = rel_err(
                attention(q.clone(), kq, vq).expect("attention"),
                reference.clone(),
            );
            sums[i] += e;
            row.push(e);
        }
        for (i, b) in [CodeBits::B4, CodeBits::B2].iter().enumerate() {
            for (along, acc) in [
                (GroupAxis::Tokens, &mut chan),
                (GroupAxis::Channels, &mut tok),
            ] {
                let kq = quantize(k.clone(), *b, 32, along, "keys")
                    .expect("q")
                    .decode()
                    .expect("d");
                let e = rel_err(
                    attention(q.clone(), kq, v.clone()).expect("attention"),
                    reference.clone(),
                );
                acc[i] += e;
                row.push(e);
            }
        }
        eprintln!(
            "{l:5} | {}",
            row.iter()
                .map(|e| format!("{e:6.4}"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    let n = caches.len() as f64;
    let mean: Vec<f64> = sums.iter().map(|s| s / n).collect();
    eprintln!(
        "mean  | {}",
        mean.iter()
            .map(|e| format!("{e:6.4}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    eprintln!(
        "keys only, mean over layers: 4-bit per-channel {:.4} vs per-token {:.4}; 2-bit per-channel {:.4} vs per-token {:.4}",
        chan[0] / n,
        tok[0] / n,
        chan[1] / n,
        tok[1] / n
    );
    // More bits, less error, and 8 bits is nearly lossless.
    assert!(mean[0] < 0.01, "8-bit error {}", mean[0]);
    assert!(
        mean[0] < mean[1] && mean[1] < mean[2] && mean[2] < mean[3],
        "{mean:?}"
    );
    assert!(mean[3] < 1.0, "2-bit error {}", mean[3]);
    // KIVI's finding: keys have outlier channels, so per-channel grouping beats per-token.
    assert!(
        chan[1] < tok[1],
        "2-bit keys: per-channel {} vs per-token {}",
        chan[1] / n,
        tok[1] / n
    );
}

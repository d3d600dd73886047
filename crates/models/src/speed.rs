//! Prefill and decode speed of a model with the full fp16 cache, and the host's memory read
//! bandwidth: the figures of `cargo xtask bench`'s speed table, where each decode speed is set
//! against its ceiling (bandwidth ÷ the bytes one step reads: weights plus the KV cache).
//!
//! Why single timed runs next to criterion: a prefill of 4k tokens on the 0.5B model takes
//! minutes, and criterion's minimum of ten samples would make the table an hour's work. The
//! token ids are the criterion bench's (`100 + 37·i mod 20000`, below the vocabulary).
use crate::{Llama, Logits, ModelError, PrefillOptions};
use kv_tensor::{FullCache, KvBackend, LayerCache};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::time::Instant;

/// Prompt lengths the table prefills.
pub const PREFILL_LENGTHS: [usize; 3] = [512, 2048, 4096];

/// Contexts the table decodes at (2k and 8k, left below an 8192-token window with room for the
/// timed steps).
pub const DECODE_CONTEXTS: [usize; 2] = [2048, 8000];

/// Decode steps timed at each context (after a quarter as many untimed ones).
pub const DECODE_STEPS: usize = 32;

/// Untimed decode steps before the timed ones, as criterion warms up: the first appends after a
/// fill grow every head's buffers.
const WARM_STEPS: usize = DECODE_STEPS / 4;

/// One decode measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeSpeed {
    /// Tokens in the cache before the first timed step.
    pub context: usize,
    /// Tokens per second over [`DECODE_STEPS`] steps.
    pub tok_s: f64,
    /// Bytes one step reads: the host copy of the weights and the cache's counted bytes (at the
    /// middle of the timed steps).
    pub step_bytes: u64,
}

impl DecodeSpeed {
    /// Tokens per second a step could reach if reading its bytes at `bandwidth` (bytes/s) were
    /// all it did.
    pub fn ceiling(&self, bandwidth: f64) -> f64 {
        bandwidth / self.step_bytes.max(1) as f64
    }
}

/// What [`measure`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeedReport {
    /// `(prompt tokens, tokens per second)` of a prefill into an empty cache.
    pub prefill: Vec<(usize, f64)>,
    /// Decode at each context of [`DECODE_CONTEXTS`] that fits the model's window.
    pub decode: Vec<DecodeSpeed>,
}

impl SpeedReport {
    /// The table as markdown: kvnd's figures, a reference's where `reference` has them (keys
    /// `prefill/N` and `decode/at-N`, tokens per second; llama.cpp's in `cargo xtask bench`)
    /// with the ratio, and each decode speed as a share of its bandwidth ceiling.
    pub fn markdown(&self, bandwidth: f64, reference: &BTreeMap<String, f64>) -> String {
        let mut out = String::from(
            "| | kvnd tok/s | reference tok/s | kvnd ÷ reference | decode ceiling tok/s (share reached) |\n|---|---:|---:|---:|---:|\n",
        );
        let cell = |key: &str, ours: f64| match reference.get(key) {
            Some(r) => format!("{r:.1} | {:.2}×", ours / r),
            None => "– | –".into(),
        };
        for &(n, tok_s) in &self.prefill {
            let key = format!("prefill/{n}");
            out += &format!("| {key} | {tok_s:.1} | {} | |\n", cell(&key, tok_s));
        }
        for d in &self.decode {
            let key = format!("decode/at-{}", d.context);
            let ceiling = d.ceiling(bandwidth);
            out += &format!(
                "| {key} | {:.1} | {} | {ceiling:.0} ({:.0} %) |\n",
                d.tok_s,
                cell(&key, d.tok_s),
                100.0 * d.tok_s / ceiling
            );
        }
        out
    }
}

/// Parses a reference's figures from lines `NAME prefill/N: X tok/s` (what
/// `scripts/llama_cpp_bench.py` prints); other lines are ignored.
pub fn parse_reference(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|l| {
            let (key, rest) = l.split_once(": ")?;
            let key = key.split_whitespace().last()?;
            let value = rest.strip_suffix(" tok/s")?.trim().parse().ok()?;
            Some((key.to_string(), value))
        })
        .collect()
}

/// The bench's token ids: `n` ids cycling below `vocab` (and below 20 000 + 100).
pub fn bench_ids(n: usize, vocab: usize) -> Vec<u32> {
    let span = vocab.saturating_sub(100).clamp(1, 20_000) as u32;
    (0..n as u32).map(|i| 100 + (i * 37) % span).collect()
}

/// Times prefills at [`PREFILL_LENGTHS`] and decode at [`DECODE_CONTEXTS`] with the full fp16
/// cache, calling `progress` before each piece. Contexts beyond the model's window are skipped.
pub fn measure<B: KvBackend>(
    model: &Llama<B>,
    progress: &mut dyn FnMut(&str),
) -> Result<SpeedReport, ModelError> {
    let c = &model.config;
    let window = model.context();
    let fresh = || -> Vec<FullCache<B>> { (0..c.layers).map(|_| FullCache::new()).collect() };
    let opts = PrefillOptions::default();
    let mut prefill = Vec::new();
    let longest = DECODE_CONTEXTS.iter().chain(&PREFILL_LENGTHS).max();
    let ids = bench_ids(*longest.unwrap_or(&0), c.vocab);
    for n in PREFILL_LENGTHS.into_iter().filter(|&n| n < window) {
        progress(&format!("prefill {n} tokens"));
        let mut caches = fresh();
        let t = Instant::now();
        model.prefill(&ids[..n], &mut caches, &opts)?;
        prefill.push((n, n as f64 / t.elapsed().as_secs_f64()));
    }
    let mut decode = Vec::new();
    let mut caches = fresh();
    for ctx in DECODE_CONTEXTS
        .into_iter()
        .filter(|&n| n + WARM_STEPS + DECODE_STEPS <= window)
    {
        progress(&format!(
            "fill the cache to {ctx} tokens, then decode {DECODE_STEPS}"
        ));
        let have = caches[0].len();
        for piece in ids[have..ctx].chunks(opts.chunk) {
            model.forward(piece, &mut caches, Logits::Last)?;
        }
        for _ in 0..WARM_STEPS {
            model.forward(&[42], &mut caches, Logits::Last)?;
        }
        let mut step_bytes = 0;
        let t = Instant::now();
        for i in 0..DECODE_STEPS {
            model.forward(&[42], &mut caches, Logits::Last)?;
            if i == DECODE_STEPS / 2 {
                let kv: u64 = caches.iter().map(|c| c.footprint().total().get()).sum();
                step_bytes = kv + model.host_matvec_bytes() as u64;
            }
        }
        decode.push(DecodeSpeed {
            context: ctx,
            tok_s: DECODE_STEPS as f64 / t.elapsed().as_secs_f64(),
            step_bytes,
        });
    }
    Ok(SpeedReport { prefill, decode })
}

/// The host's memory read bandwidth in bytes per second: the best of three parallel sums over
/// 512 MiB (a read-only stream, the access pattern of a decode step's weights and cache).
pub fn read_bandwidth() -> f64 {
    let data = vec![1.0f32; 128 << 20];
    let bytes = (data.len() * 4) as f64;
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let total: f32 = data.par_chunks(1 << 20).map(lane_sum).sum();
        let secs = t.elapsed().as_secs_f64();
        // The sum is used, so the reads cannot be optimised away.
        if total > 0.0 {
            best = best.max(bytes / secs);
        }
    }
    best
}

/// `Σ x` over sixteen lanes (one running sum would be a chain of dependent adds that does not
/// vectorise and could not keep up with memory).
fn lane_sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_ids_stay_below_the_vocabulary() {
        for vocab in [120usize, 5000, 49_152, 151_936] {
            let ids = bench_ids(3000, vocab);
            assert_eq!(ids.len(), 3000);
            assert!(ids.iter().all(|&i| (i as usize) < vocab), "vocab {vocab}");
        }
        // The criterion bench's ids on a large vocabulary.
        assert_eq!(bench_ids(3, 49_152), vec![100, 137, 174]);
    }

    #[test]
    fn ceiling_is_bandwidth_over_step_bytes() {
        let d = DecodeSpeed {
            context: 2048,
            tok_s: 40.0,
            step_bytes: 100_000_000,
        };
        assert!((d.ceiling(20e9) - 200.0).abs() < 1e-9);
    }

    #[test]
    fn the_table_sets_figures_against_the_reference() {
        let text = "llama_context: noise\nllama.cpp prefill/512: 250.0 tok/s\nllama.cpp decode/at-2048: 40.0 tok/s\nbad line: x tok/s\n";
        let reference = parse_reference(text);
        assert_eq!(reference.len(), 2);
        assert_eq!(reference["prefill/512"], 250.0);
        let report = SpeedReport {
            prefill: vec![(512, 275.0), (2048, 100.0)],
            decode: vec![DecodeSpeed {
                context: 2048,
                tok_s: 44.0,
                step_bytes: 200_000_000,
            }],
        };
        let md = report.markdown(20e9, &reference);
        assert!(
            md.contains("| prefill/512 | 275.0 | 250.0 | 1.10× | |"),
            "{md}"
        );
        assert!(md.contains("| prefill/2048 | 100.0 | – | – | |"), "{md}");
        assert!(
            md.contains("| decode/at-2048 | 44.0 | 40.0 | 1.10× | 100 (44 %) |"),
            "{md}"
        );
    }

    #[test]
    fn lane_sum_adds_every_value() {
        let x: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert_eq!(lane_sum(&x), 499_500.0);
    }
}

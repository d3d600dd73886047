//! The generation loop over any [`LayerCache`]: prefill (with the cache's end-of-prefill
//! compression), then one token at a time, greedy or with temperature sampling.
use crate::{Llama, Logits, ModelError, PrefillOptions, Tokenizer};
use burn::tensor::Tensor;
use kv_tensor::KvBackend;
use kv_tensor::{Bytes, Footprint, LayerCache};
use std::time::Instant;

/// How the next token is picked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// Softmax sampling at a temperature (> 0), reproducible from a seed.
    Temperature {
        /// Temperature.
        t: f32,
        /// RNG seed.
        seed: u64,
    },
}

/// How to generate: how many tokens, how to pick them, how to prefill the prompt.
#[derive(Debug, Clone, Copy)]
pub struct GenerateOptions {
    /// Most new tokens.
    pub max_new: usize,
    /// How the next token is picked.
    pub sampling: Sampling,
    /// How the prompt is prefilled (chunk size, what scorers observe, whether caches
    /// compress chunk by chunk).
    pub prefill: PrefillOptions,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new: 128,
            sampling: Sampling::Greedy,
            prefill: PrefillOptions::default(),
        }
    }
}

/// The result of one generation, with timings.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New token ids (without the stop token).
    pub ids: Vec<u32>,
    /// Their text.
    pub text: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Seconds spent in prefill (including end-of-prefill compression).
    pub prefill_secs: f64,
    /// Seconds spent decoding.
    pub decode_secs: f64,
    /// Bytes the caches held right after the prefill (with its compression), as counted.
    pub prefill_footprint: Footprint,
    /// Bytes the caches had allocated at that moment (spare capacity included).
    pub prefill_resident: Bytes,
}

impl Generation {
    /// Prompt tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }

    /// Generated tokens per second (the first token comes from the prefill).
    pub fn decode_tps(&self) -> f64 {
        self.ids.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Generates up to `opts.max_new` tokens after `prompt`, stopping at an end-of-sequence token.
/// `on_token` sees each new token as it is produced (for streaming output).
pub fn generate<B: KvBackend, C: LayerCache<B>>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    caches: &mut [C],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Generation, ModelError> {
    let (max_new, sampling) = (opts.max_new, opts.sampling);
    let t0 = Instant::now();
    let mut logits = model.prefill(prompt, caches, &opts.prefill)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let prefill_footprint = caches.iter().map(LayerCache::footprint).sum();
    let prefill_resident = Bytes(caches.iter().map(|c| c.resident().get()).sum());
    let t1 = Instant::now();
    let mut rng = sampling_seed(sampling);
    let mut ids = Vec::new();
    for step in 0..max_new {
        let next = pick(logits, sampling, &mut rng)?;
        if tokenizer.eos.contains(&next) {
            break;
        }
        ids.push(next);
        on_token(next);
        if step + 1 == max_new
            || caches
                .first()
                .is_some_and(|c| c.len() + 1 > model.config.context)
        {
            break;
        }
        logits = model.forward(&[next], caches, Logits::Last)?;
    }
    let decode_secs = t1.elapsed().as_secs_f64();
    let text = tokenizer.decode(&ids)?;
    Ok(Generation {
        ids,
        text,
        prompt_tokens: prompt.len(),
        prefill_secs,
        decode_secs,
        prefill_footprint,
        prefill_resident,
    })
}

fn sampling_seed(s: Sampling) -> u64 {
    match s {
        Sampling::Greedy => 0,
        Sampling::Temperature { seed, .. } => seed ^ 0x9E37_79B9_7F4A_7C15,
    }
}

/// Picks a token from `[1, vocab]` logits.
pub fn pick<B: KvBackend>(
    logits: Tensor<B, 2>,
    sampling: Sampling,
    rng: &mut u64,
) -> Result<u32, ModelError> {
    let v: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| ModelError::Tokenizer(format!("reading logits: {e:?}")))?;
    let argmax = || {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32)
    };
    match sampling {
        Sampling::Greedy => Ok(argmax()),
        Sampling::Temperature { t, .. } if t <= 0.0 => Ok(argmax()),
        Sampling::Temperature { t, .. } => {
            let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f64> = v.iter().map(|x| (((x - max) / t) as f64).exp()).collect();
            let total: f64 = w.iter().sum();
            let mut u = next_uniform(rng) * total;
            for (i, wi) in w.iter().enumerate() {
                u -= wi;
                if u <= 0.0 {
                    return Ok(i as u32);
                }
            }
            Ok(argmax())
        }
    }
}

/// splitmix64 → uniform in [0, 1).
fn next_uniform(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

//! Evaluation inputs, generated deterministically from a seed over the prose data set:
//! calibration passages and evaluation samples come from disjoint parts of the text.
use anyhow::{Context, Result};
use models::Tokenizer;
use std::path::Path;

/// Characters of the corpus reserved for calibration (evaluation starts after them).
pub const CALIBRATION_CHARS: usize = 2_000_000;

/// The addresses, concatenated in file-name order.
pub fn corpus(dir: &Path) -> Result<String> {
    let text =
        models::paths::read_sotu(dir).with_context(|| format!("reading {}", dir.display()))?;
    anyhow::ensure!(
        text.len() > CALIBRATION_CHARS * 2,
        "the prose data set in {} is too small",
        dir.display()
    );
    Ok(text)
}

/// `n` tokens of prose starting near character `at` (snapped to a char boundary).
pub fn tokens_at(tok: &Tokenizer, text: &str, at: usize, n: usize) -> Result<Vec<u32>> {
    let mut start = at.min(text.len() - 1);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let mut end = (start + n * 8).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let ids = tok.encode(&text[start..end])?;
    anyhow::ensure!(
        ids.len() >= n,
        "not enough prose at offset {at} for {n} tokens"
    );
    Ok(ids[..n].to_vec())
}

/// splitmix64: the seeded generator of every random choice in the suite.
pub struct Rng(pub u64);

impl Rng {
    /// Next value.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One evaluation sample: a context compressed question-agnostically, then a probe appended.
pub enum Sample {
    /// Prose continuation: teacher-forced NLL of `continuation` and KL to the full cache.
    Prose {
        /// The context.
        context: Vec<u32>,
        /// The held-out continuation.
        continuation: Vec<u32>,
    },
    /// Passkey retrieval (RULER's NIAH single, number value): a 5-digit key hidden in prose.
    Passkey {
        /// Haystack with the needle.
        context: Vec<u32>,
        /// The question, appended after compression.
        question: Vec<u32>,
        /// Gold answer tokens (teacher-forced).
        answer: Vec<u32>,
        /// Gold answer text (free-generation string match).
        key: String,
    },
}

impl Sample {
    /// The context tokens.
    pub fn context(&self) -> &[u32] {
        match self {
            Sample::Prose { context, .. } | Sample::Passkey { context, .. } => context,
        }
    }
}

/// `n` prose samples and `n` passkey samples of `ctx` context tokens from the evaluation part
/// of the corpus.
pub fn samples(
    tok: &Tokenizer,
    text: &str,
    n: usize,
    ctx: usize,
    continuation: usize,
    seed: u64,
) -> Result<Vec<Sample>> {
    let mut rng = Rng(seed);
    let span = text.len() - CALIBRATION_CHARS - ctx * 10;
    let mut out = Vec::new();
    for _ in 0..n {
        let at = CALIBRATION_CHARS + rng.below(span);
        let ids = tokens_at(tok, text, at, ctx + continuation)?;
        out.push(Sample::Prose {
            context: ids[..ctx].to_vec(),
            continuation: ids[ctx..].to_vec(),
        });
    }
    for _ in 0..n {
        let key = format!("{:05}", 10000 + rng.below(90000));
        let needle = tok.encode(&format!(
            " The pass key is {key}. Remember it. {key} is the pass key. "
        ))?;
        let question = tok.encode("\nWhat is the pass key? The pass key is")?;
        // RULER's passkey template: an instruction, then the haystack with the needle.
        let preamble = tok.encode("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.\n")?;
        let hay = tokens_at(
            tok,
            text,
            CALIBRATION_CHARS + rng.below(span),
            ctx - needle.len() - preamble.len(),
        )?;
        // Depth between 10% and 90% of the haystack.
        let depth = hay.len() / 10 + rng.below(hay.len() * 8 / 10);
        let mut context = preamble;
        context.extend(&hay[..depth]);
        context.extend(&needle);
        context.extend(&hay[depth..]);
        let answer = tok.encode(&format!(" {key}"))?;
        out.push(Sample::Passkey {
            context,
            question,
            answer,
            key,
        });
    }
    Ok(out)
}

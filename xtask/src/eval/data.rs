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
    /// A RULER task instance.
    Task(super::tasks::TaskSample),
}

impl Sample {
    /// The context tokens.
    pub fn context(&self) -> &[u32] {
        match self {
            Sample::Prose { context, .. } => context,
            Sample::Task(t) => &t.context,
        }
    }

    /// The task's name (`prose` for continuations).
    pub fn task(&self) -> &'static str {
        match self {
            Sample::Prose { .. } => "prose",
            Sample::Task(t) => t.task.name(),
        }
    }
}

/// The evaluation part of the corpus (after the calibration characters).
pub fn evaluation_text(text: &str) -> &str {
    let mut at = CALIBRATION_CHARS.min(text.len());
    while !text.is_char_boundary(at) {
        at += 1;
    }
    &text[at..]
}

/// `n` prose samples of `ctx` context tokens and a `continuation`, from the evaluation part.
pub fn prose_samples(
    tok: &Tokenizer,
    text: &str,
    n: usize,
    ctx: usize,
    continuation: usize,
    seed: u64,
) -> Result<Vec<Sample>> {
    let mut rng = Rng(seed);
    let eval = evaluation_text(text);
    let span = eval.len().saturating_sub(ctx * 10).max(1);
    (0..n)
        .map(|_| {
            let ids = tokens_at(tok, eval, rng.below(span), ctx + continuation)?;
            Ok(Sample::Prose {
                context: ids[..ctx].to_vec(),
                continuation: ids[ctx..].to_vec(),
            })
        })
        .collect()
}

/// A sample's seed: the run's seed mixed with the task, the length and the sample index, so a
/// sample does not change when other tasks, lengths or counts are added.
pub fn sample_seed(seed: u64, task: usize, length: usize, index: usize) -> u64 {
    let mut r = Rng(seed ^ ((task as u64) << 48) ^ ((length as u64) << 16) ^ index as u64);
    r.next()
}

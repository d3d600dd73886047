//! Evaluation inputs, generated deterministically from a seed over the prose data set:
//! calibration passages and evaluation samples come from disjoint parts of the text.
use crate::error::{EvalError, IoContext, Result};
use crate::rng::Rng;
use models::Tokenizer;
use std::path::Path;

/// Characters of the corpus reserved for calibration (evaluation starts after them).
pub const CALIBRATION_CHARS: usize = 2_000_000;

/// The addresses, concatenated in file-name order.
pub fn corpus(dir: &Path) -> Result<String> {
    let text = models::paths::read_sotu(dir).at(dir)?;
    if text.len() <= CALIBRATION_CHARS * 2 {
        return Err(EvalError::Data {
            what: dir.display().to_string(),
            why: format!(
                "the prose data set holds {} characters; calibration and evaluation need more than {}",
                text.len(),
                CALIBRATION_CHARS * 2
            ),
        });
    }
    Ok(text)
}

/// `n` tokens of prose starting near character `at` (snapped to a char boundary).
pub fn tokens_at(tok: &Tokenizer, text: &str, at: usize, n: usize) -> Result<Vec<u32>> {
    let mut start = at.min(text.len().saturating_sub(1));
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let mut end = (start + n * 8).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let ids = tok.encode(&text[start..end])?;
    if ids.len() < n {
        return Err(EvalError::Data {
            what: "prose".into(),
            why: format!("not enough text at offset {at} for {n} tokens"),
        });
    }
    Ok(ids[..n].to_vec())
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
    Task(crate::tasks::TaskSample),
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
            Sample::Task(t) => t.name,
        }
    }
}

/// Where calibration ends and evaluation starts: [`CALIBRATION_CHARS`], moved forward to a
/// char boundary.
fn split_point(text: &str) -> usize {
    let mut at = CALIBRATION_CHARS.min(text.len());
    while !text.is_char_boundary(at) {
        at += 1;
    }
    at
}

/// The calibration part of the corpus (its first [`CALIBRATION_CHARS`] characters).
pub fn calibration_text(text: &str) -> &str {
    &text[..split_point(text)]
}

/// The evaluation part of the corpus (after the calibration characters).
pub fn evaluation_text(text: &str) -> &str {
    &text[split_point(text)..]
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
    r.next_u64()
}

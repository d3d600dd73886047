//! What a sensitivity table is calibrated on and with: prose passages and synthetic retrieval
//! passages, both from the calibration split of the corpus (never the evaluation's text or
//! seeds), and the loss measured on them ([`CalibrationLoss`]).
//!
//! Why retrieval passages: a table measured on prose alone ranks experts by how well they keep
//! the next words of an essay, while the tasks ask for one needle's value. A retrieval passage's
//! probe is a question and its gold answer, so its queries are the ones a task sends.
//! [`validate`] ranks the choices against what the evaluation scores.
use crate::data;
use crate::error::Result;
use crate::session::Session;
use crate::tasks::{self as task_suite, Task};
use kv_tensor::KvBackend;
use solver::{CalibrationLoss, Passage};

/// Seed of the calibration retrieval passages. The evaluation refuses it as its own seed, so a
/// calibration needle is never an evaluated one.
pub const CALIBRATION_SEED: u64 = 0x6b76_6e64_6361_6c31;

/// The retrieval tasks calibration passages cycle through: needles in prose (a number, four
/// keys, four values) and variable tracking. None needs the QA documents, and every haystack is
/// drawn from the calibration split.
pub const RETRIEVAL_TASKS: [Task; 4] = [
    Task::NiahSingle2,
    Task::NiahMultikey1,
    Task::Vt,
    Task::NiahMultivalue,
];

/// Continuation tokens read after a prose passage's context.
pub const PROSE_PROBE: usize = 64;

/// Characters between the starts of two prose calibration passages.
const PROSE_STRIDE: usize = 200_000;

/// What a sensitivity table is measured on, and which loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalibrationSpec {
    /// Context tokens of every passage (plans are costed at this length).
    pub context: usize,
    /// Prose passages (a context and its continuation).
    pub prose: usize,
    /// Synthetic retrieval passages (a context, then a question and its gold answer).
    pub retrieval: usize,
    /// The loss measured on them.
    pub loss: CalibrationLoss,
}

impl Default for CalibrationSpec {
    fn default() -> Self {
        Self::default_at(Self::DEFAULT_CONTEXT)
    }
}

impl CalibrationSpec {
    /// Context tokens of the default table. Three 1,024-token passages cost what one of 2,048
    /// did (every expert compresses each passage), and one table serves every prompt length.
    pub const DEFAULT_CONTEXT: usize = 1024;

    /// The default at `context` tokens, chosen by [`validate`] and by evaluations against the
    /// prose-only and two-retrieval tables: one prose and four retrieval passages (one of every
    /// kind in [`RETRIEVAL_TASKS`]), attention-output loss (README, "Calibration that predicts
    /// the tasks").
    pub fn default_at(context: usize) -> Self {
        Self {
            context,
            prose: 1,
            retrieval: RETRIEVAL_TASKS.len(),
            loss: CalibrationLoss::Attention,
        }
    }

    /// Prose passages only, attention-output loss: the first slice's table.
    pub fn prose_only(context: usize, passages: usize) -> Self {
        Self {
            context,
            prose: passages,
            retrieval: 0,
            loss: CalibrationLoss::Attention,
        }
    }

    /// The part of a cache file's name that tells tables apart.
    pub fn file_stem(&self) -> String {
        format!(
            "ctx{}-p{}-r{}-{}",
            self.context, self.prose, self.retrieval, self.loss
        )
    }

    /// Refuses a spec with no passage.
    pub fn check(&self) -> Result<()> {
        if self.prose + self.retrieval == 0 {
            return Err(crate::EvalError::Options(
                "calibration needs at least one passage (prose or retrieval)".into(),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for CalibrationSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} prose + {} retrieval passages of {} tokens, {} loss",
            self.prose, self.retrieval, self.context, self.loss
        )
    }
}

/// The passages of `spec`, from the calibration split: prose first, then retrieval.
pub fn passages<B: KvBackend>(s: &Session<B>, spec: &CalibrationSpec) -> Result<Vec<Passage>> {
    spec.check()?;
    let mut out = prose_passages(s, spec.prose, spec.context)?;
    out.extend(retrieval_passages(
        s,
        data::calibration_text(&s.text),
        &RETRIEVAL_TASKS,
        spec.retrieval,
        spec.context,
        CALIBRATION_SEED,
    )?);
    Ok(out)
}

/// `n` prose passages of `context` tokens and a [`PROSE_PROBE`]-token continuation from the
/// calibration split.
pub fn prose_passages<B: KvBackend>(
    s: &Session<B>,
    n: usize,
    context: usize,
) -> Result<Vec<Passage>> {
    (0..n)
        .map(|i| {
            let ids = s.passage(i * PROSE_STRIDE, context + PROSE_PROBE)?;
            Ok(Passage::prose(&ids, context)?)
        })
        .collect()
}

/// `n` retrieval passages of at most `context` tokens built over `text`, cycling through
/// `tasks` (none may need the QA documents), each seeded from `seed` as the evaluation seeds
/// its samples.
pub fn retrieval_passages<B: KvBackend>(
    s: &Session<B>,
    text: &str,
    tasks: &[Task],
    n: usize,
    context: usize,
    seed: u64,
) -> Result<Vec<Passage>> {
    if n > 0 && (tasks.is_empty() || tasks.iter().any(|t| t.needs_qa())) {
        return Err(crate::EvalError::Options(
            "retrieval passages need at least one task, none of them a QA task".into(),
        ));
    }
    let src = crate::tasks::Sources::new(text, None, None);
    let m = &s.model;
    (0..n)
        .map(|i| {
            let task = tasks[i % tasks.len().max(1)];
            let ti = Task::ALL.iter().position(|t| *t == task).unwrap_or(0);
            let seed = data::sample_seed(seed, ti, context, i);
            let t = task_suite::fit(task, &src, &m.tokenizer, m.chat.as_ref(), context, seed)?;
            Ok(Passage::retrieval(t.context, &t.question, &t.target)?)
        })
        .collect()
}

mod validate;
pub use validate::{Candidate, ProxyReport, ValidateOptions, validate};

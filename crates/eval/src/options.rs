//! What an evaluation runs: inputs, methods, budgets, where results go.
use crate::tasks::Task;
use solver::Method;
use std::path::PathBuf;

/// What [`crate::run`] measures. [`EvalOptions::default_run`] is `cargo xtask eval`,
/// [`EvalOptions::quick`] its CI-sized version.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// CI-sized run: one short context, one budget, few methods, no MoQAE.
    pub quick: bool,
    /// Budgets as fractions of fp16 bytes (`1/8`).
    pub budgets: Vec<String>,
    /// The budgeted methods compared (besides full, KIVI-4 and KIVI-2, and MoQAE unless
    /// `quick`).
    pub methods: Vec<Method>,
    /// Context lengths (tokens) of the task samples.
    pub lengths: Vec<usize>,
    /// The RULER tasks.
    pub tasks: Vec<Task>,
    /// Every task at every length; otherwise task i runs at length i mod the number of
    /// lengths (every task and every length appear, at a third of the cost with three lengths).
    pub grid: bool,
    /// Samples per task at its length(s).
    pub samples: SampleCounts,
    /// Prose-continuation samples.
    pub prose_samples: usize,
    /// Context tokens of the prose samples.
    pub prose_context: usize,
    /// Continuation tokens scored after the prose context.
    pub continuation: usize,
    /// What the sensitivity table is calibrated on (one table serves every length: budgets
    /// are fractions, and the solver sizes each plan for the sample's length).
    pub calibration: crate::CalibrationSpec,
    /// Plain-text prompts instead of the model's chat template.
    pub raw: bool,
    /// Seed of the task generator.
    pub seed: u64,
    /// Each method prefills every sample itself, compressing chunk by chunk, instead of
    /// compressing one shared full prefill at its end.
    pub chunked_prefill: bool,
    /// The QA documents (`squad.json`, `hotpotqa.json`), needed by `qa_1` and `qa_2`.
    pub qa_dir: Option<PathBuf>,
    /// A user's data set in RULER's jsonl format, measured beside the built-in suite (or
    /// instead of it, with no `tasks` and no prose samples).
    pub dataset: Option<crate::dataset::Dataset>,
    /// Also run the long-generation task ([`crate::longgen`]) and append it to the report.
    pub long_generation: Option<crate::longgen::LongGenOptions>,
    /// Where results.md, results.json and the plots go.
    pub out: PathBuf,
}

impl EvalOptions {
    /// The main job: every task over 1k/2k contexts ([`SampleCounts::default_design`] samples
    /// each), four 2k prose passages, budgets 1/4, 1/8 and 1/14, hetero against the baselines
    /// that win somewhere (sized to stay under 30 minutes on a 2-core CPU; the README gives the
    /// intervals it resolves).
    pub fn default_run(out: PathBuf) -> Self {
        Self {
            quick: false,
            budgets: ["1/4", "1/8", "1/14"].map(String::from).to_vec(),
            methods: crate::methods::default_methods(false),
            lengths: vec![1024, 2048],
            tasks: Task::ALL.to_vec(),
            grid: false,
            samples: SampleCounts::default_design(),
            prose_samples: 4,
            prose_context: 2048,
            continuation: 256,
            calibration: crate::CalibrationSpec::default(),
            raw: false,
            seed: 1,
            chunked_prefill: false,
            qa_dir: None,
            dataset: None,
            long_generation: None,
            out,
        }
    }

    /// A few samples at 512 tokens, one budget (1/4), hetero against a few baselines.
    pub fn quick(out: PathBuf) -> Self {
        Self {
            quick: true,
            budgets: vec!["1/4".into()],
            methods: crate::methods::default_methods(true),
            lengths: vec![512],
            tasks: vec![Task::NiahSingle1, Task::Vt, Task::Qa1],
            grid: true,
            samples: SampleCounts::uniform(1),
            prose_samples: 3,
            prose_context: 512,
            continuation: 32,
            calibration: crate::CalibrationSpec::default_at(512),
            ..Self::default_run(out)
        }
    }
}

/// How many samples each task draws at its context length: the design of the eval's cells.
///
/// Every reported mean weighs the cells equally (the mean of per-cell means, as RULER averages
/// its tasks), so a task's sample count sets only how precisely its cell is known, not how much
/// it weighs. That lets the noisiest cells draw more samples than the quiet ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleCounts {
    every: usize,
    more: Vec<(Task, usize)>,
}

impl SampleCounts {
    /// `n` samples of every task.
    pub fn uniform(n: usize) -> Self {
        Self {
            every: n,
            more: Vec::new(),
        }
    }

    /// The default run's allocation. The paired differences between methods spread 2–4× more
    /// within the free-text QA cells, frequent-words extraction and variable tracking than
    /// within the needle cells (per-sample SDs of the 2026-12-03 five-per-cell run, README), so
    /// those draw more samples, roughly in proportion to that spread (Neyman allocation), and
    /// the quiet cells four each. The first samples of a cell are the same under any count.
    pub fn default_design() -> Self {
        Self {
            every: 4,
            more: vec![
                (Task::Qa1, 16),
                (Task::Qa2, 16),
                (Task::Fwe, 10),
                (Task::Vt, 6),
            ],
        }
    }

    /// Samples of `task`.
    pub fn of(&self, task: Task) -> usize {
        self.more
            .iter()
            .find(|(t, _)| *t == task)
            .map_or(self.every, |(_, n)| *n)
    }

    /// Every task's count, by RULER name (for results.json).
    pub fn by_name(&self, tasks: &[Task]) -> std::collections::BTreeMap<&'static str, usize> {
        tasks.iter().map(|&t| (t.name(), self.of(t))).collect()
    }
}

impl std::fmt::Display for SampleCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.every)?;
        if !self.more.is_empty() {
            let more: Vec<String> = self
                .more
                .iter()
                .map(|(t, n)| format!("{} {n}", t.name()))
                .collect();
            write!(f, " ({})", more.join(", "))?;
        }
        Ok(())
    }
}

impl EvalOptions {
    /// Refuses a calibration with no passage, and the seed the calibration's retrieval
    /// passages are drawn with: an evaluated sample must never be a calibrated one.
    pub fn check_calibration(&self) -> crate::Result<()> {
        if self.seed == crate::calibration::CALIBRATION_SEED {
            return Err(crate::EvalError::Options(
                "that seed draws the calibration's retrieval passages: pick another".into(),
            ));
        }
        self.calibration.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_counts_default_to_the_uniform_count() {
        let d = SampleCounts::default_design();
        assert_eq!(d.of(Task::Qa1), 16);
        assert_eq!(d.of(Task::NiahSingle1), 4);
        assert_eq!(SampleCounts::uniform(3).of(Task::Qa1), 3);
        assert_eq!(d.to_string(), "4 (qa_1 16, qa_2 16, fwe 10, vt 6)");
        assert_eq!(d.by_name(&[Task::Vt, Task::Cwe])["vt"], 6);
    }

    #[test]
    fn the_calibration_seed_and_an_empty_calibration_are_refused() {
        let mut o = EvalOptions::quick(PathBuf::from("/nowhere"));
        assert!(o.check_calibration().is_ok());
        o.seed = crate::calibration::CALIBRATION_SEED;
        assert!(o.check_calibration().is_err());
        o.seed = 1;
        o.calibration.prose = 0;
        o.calibration.retrieval = 0;
        assert!(o.check_calibration().is_err());
    }
}

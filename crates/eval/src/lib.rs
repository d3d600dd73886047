//! kvnd's evaluation harness as a library: every method at matched bytes on identical inputs.
//!
//! A [`Session`] holds a model, its sha256, its prose corpus and its calibrated axes; it serves
//! evaluation, generation with a plan, solving and proxy validation alike. [`run()`] compares
//! the methods of [`EvalOptions`] on RULER-style tasks ([`tasks`]) and prose continuations and
//! writes `results.md`, `results.json` and the Pareto plots. Progress goes through a callback
//! ([`Progress`]); paths come in as arguments, nothing is downloaded. Generic over the burn
//! backend.
//!
//! Modules: [`tasks`] (one file per RULER task), [`data`] (corpus, prose samples, seeds),
//! [`methods`] (the registry of compared methods), [`measure`] (one method on one sample),
//! [`decode`] (batched free generation), [`stats`] (summaries, matched-bytes check),
//! [`report`] (markdown, JSON), [`plot`], [`session`], [`run()`](run::run).
#![warn(missing_docs)]

pub mod calibration;
pub mod data;
pub mod dataset;
pub mod decode;
mod error;
pub mod longgen;
pub mod measure;
pub mod methods;
pub mod moqae;
mod options;
pub mod paired;
pub mod plot;
pub mod progress;
pub mod report;
pub mod rng;
pub mod run;
pub mod session;
pub mod stats;
pub mod tasks;

pub use calibration::CalibrationSpec;
pub use error::{EvalError, Result};
pub use options::{EvalOptions, SampleCounts};
pub use progress::{Event, Progress, Silent};
pub use run::{Outcome, run};
pub use session::{
    MENU_SCORER, SHARE_GROUP, Session, SessionPaths, calibrated_axes, menu, register_axes,
    sha256_file, share_stage,
};
pub use tasks::Task;

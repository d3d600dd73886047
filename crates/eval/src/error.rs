//! What can go wrong in an evaluation, typed.
use std::path::PathBuf;
use thiserror::Error;

/// An evaluation failure. Each variant says what was being done; nothing is lost on the way
/// (the source error is kept).
#[derive(Debug, Error)]
pub enum EvalError {
    /// The model failed (prefill, forward, tokenizer).
    #[error(transparent)]
    Model(#[from] models::ModelError),
    /// A plan could not be made (bad budget, solver failure).
    #[error(transparent)]
    Solver(#[from] solver::SolverError),
    /// A cache rejected its input or failed to compress.
    #[error(transparent)]
    Axis(#[from] kv_tensor::AxisError),
    /// A cache could not hand back what it holds.
    #[error(transparent)]
    Kv(#[from] kv_tensor::KvError),
    /// The low-rank bases do not fit the model.
    #[error(transparent)]
    LowRank(#[from] axis_lowrank::LowRankError),
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A data set or cached file that does not hold what it should (malformed line, missing
    /// field, too little text).
    #[error("{what}: {why}")]
    Data {
        /// The data (a path, or a data set's name).
        what: String,
        /// What is wrong.
        why: String,
    },
    /// A task sample could not be generated.
    #[error("{task}: {why}")]
    Task {
        /// RULER's task name.
        task: &'static str,
        /// Why.
        why: String,
    },
    /// A line of a user's data set is malformed (line 0: the file as a whole).
    #[error("{}:{line}: {why}", path.display())]
    Dataset {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// Options that cannot run (a context longer than the model's window, no methods).
    #[error("invalid evaluation options: {0}")]
    Options(String),
    /// A method held more bytes than its budget after the context: the comparison would not
    /// be at matched memory.
    #[error(
        "{method} at {budget} holds {bytes} bytes after {tokens} tokens, over its budget of {cap}"
    )]
    OverBudget {
        /// The method.
        method: String,
        /// Its budget label.
        budget: String,
        /// Bytes held.
        bytes: u64,
        /// Context tokens.
        tokens: usize,
        /// The budget in bytes.
        cap: u64,
    },
    /// A score came out NaN or infinite.
    #[error("{0} produced a non-finite score")]
    NonFinite(String),
    /// The statistics a run must report are missing or malformed (a non-finite interval, a
    /// row without a paired interval in the CI-sized run, identical plans shown as two rows).
    #[error("the run's statistics are incomplete: {0}")]
    Evidence(String),
    /// Serialising results.
    #[error("serialising results: {0}")]
    Json(#[from] serde_json::Error),
    /// Drawing a plot.
    #[error("plot {path}: {why}")]
    Plot {
        /// The image.
        path: PathBuf,
        /// What the plotting library said.
        why: String,
    },
    /// A worker stopped without a result (another one failed first).
    #[error("internal: {0}")]
    Internal(&'static str),
}

/// Results of this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

/// Attaches the path to an I/O error.
pub(crate) trait IoContext<T> {
    /// The error as [`EvalError::Io`] for `path`.
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| EvalError::Io {
            path: path.into(),
            source,
        })
    }
}

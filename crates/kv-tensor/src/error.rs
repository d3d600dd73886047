//! The typed errors of the KV vocabulary.
use thiserror::Error;

/// What went wrong while building, combining or reading KV-cache tensors.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum KvError {
    /// A value is outside the range its type allows (bits, ratio, layout field…).
    #[error("invalid {what}: {value} ({allowed})")]
    InvalidValue {
        /// Which quantity.
        what: &'static str,
        /// The offending value, printed.
        value: String,
        /// What would have been accepted.
        allowed: &'static str,
    },
    /// Two tensors (or a tensor and a layout) disagree on a shape.
    #[error("shape mismatch in {context}: expected {expected:?}, got {got:?}")]
    Shape {
        /// Where the mismatch was found.
        context: &'static str,
        /// The shape that was required.
        expected: Vec<usize>,
        /// The shape that was given.
        got: Vec<usize>,
    },
    /// The queries of an `attend` call ask for more tokens than the cache holds.
    #[error("attend with {queries} query tokens but the cache only holds {cached} tokens")]
    QueriesExceedCache {
        /// Query tokens asked for.
        queries: usize,
        /// Tokens present in the cache.
        cached: usize,
    },
    /// Attention on an empty cache.
    #[error("the cache is empty")]
    Empty,
    /// The backend could not hand a tensor's values over to the host as f32.
    #[error("reading tensor data from the backend: {0}")]
    Backend(String),
}

/// The error a [`crate::CompressionAxis`] returns. Axis crates convert their own error enums
/// into [`AxisError::Method`] so the router can treat every axis alike.
#[derive(Debug, Error)]
pub enum AxisError {
    /// The KV tensors themselves were malformed.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// The input holds NaN or infinite values, which no compression can represent.
    #[error("{what} holds NaN or infinite values")]
    NonFinite {
        /// Which tensor (e.g. "keys of layer 3").
        what: String,
    },
    /// A scorer needs an observation the model did not provide.
    #[error("{method} needs {what}, which the observation context does not carry")]
    MissingObservation {
        /// The method asking.
        method: &'static str,
        /// The missing observation.
        what: &'static str,
    },
    /// An expert's stage cannot run: its axis is not among the calibrated axes, or the
    /// setting belongs to another axis.
    #[error("stage `{axis}`: {why}")]
    Stage {
        /// The axis the stage names.
        axis: String,
        /// What is missing.
        why: String,
    },
    /// A method-specific failure.
    #[error("{method}: {source}")]
    Method {
        /// The method that failed.
        method: &'static str,
        /// Its own error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

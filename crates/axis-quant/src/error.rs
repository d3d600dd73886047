//! The typed errors of quantization.
use kv_tensor::{AxisError, KvError};
use thiserror::Error;

/// What went wrong quantizing.
#[derive(Debug, Error)]
pub enum QuantError {
    /// The input holds NaN or infinite values.
    #[error("cannot quantize {what}: it holds NaN or infinite values")]
    NonFinite {
        /// Which tensor.
        what: &'static str,
    },
    /// Values beyond the fp16 range of the scales and minimums.
    #[error(
        "cannot quantize {what}: values reach {max_abs}, beyond the fp16 range (65504) of scales"
    )]
    OutOfRange {
        /// Which tensor.
        what: &'static str,
        /// Largest magnitude found.
        max_abs: f32,
    },
    /// The grouped axis is not a multiple of the group size.
    #[error(
        "cannot quantize {what}: {len} along the grouped axis is not a multiple of the group size {group}"
    )]
    Ragged {
        /// Which tensor.
        what: &'static str,
        /// Length of the grouped axis.
        len: usize,
        /// Group size.
        group: usize,
    },
    /// A tensor error.
    #[error(transparent)]
    Kv(#[from] KvError),
}

impl From<QuantError> for AxisError {
    fn from(e: QuantError) -> Self {
        match e {
            QuantError::Kv(k) => AxisError::Kv(k),
            QuantError::NonFinite { what } => AxisError::NonFinite { what: what.into() },
            other => AxisError::Method {
                method: "kivi",
                source: Box::new(other),
            },
        }
    }
}

//! The head-dimension axis: project K and V of each KV head onto the top principal directions
//! calibrated offline, store the coefficients, and decode as `coeffs · P_rᵀ`.
//!
//! - [`PcaAccumulator`] / [`PcaBases`]: per layer and KV head, the second-moment matrix of
//!   post-RoPE keys and of values accumulated in f64 over calibration prose, diagonalised with
//!   nalgebra's symmetric eigendecomposition, saved to JSON with the model's sha256 and
//!   validated on load.
//! - [`LowRank`]: the `CompressionAxis` with setting `{ k_rank, v_rank }`, which prices itself
//!   as a stage (`PlanStage`). Attention scores projected keys in the reduced space,
//!   `(P_rᵀq)·c`, in kv-tensor's host attention.
#![warn(missing_docs)]

mod axis;
mod pca;
// The crate's invariants (proptest), in the unit-test binary like every crate's tests: a
// separate integration binary would compile burn's CPU backend once more.
#[cfg(test)]
mod invariants;

pub use axis::{BASIS_BYTES, LowRank, LowRankSetting};
pub use pca::{HeadBasis, LowRankError, PcaAccumulator, PcaBases};

//! Which expert each layer gets: calibrate how much quality each layer loses under each expert,
//! then pick the per-layer routing with the least predicted loss under a byte budget.
//!
//! - [`LossPredictor`]: the pluggable loss model; [`SensitivityTable`] is the stored result of
//!   calibration ([`calibrate()`]: the MoE-nD proxy, relative L2 error of one layer's attention
//!   output with only that layer compressed).
//! - [`Budget`]: bytes, or a fraction of the fp16 cache (`1/14`).
//! - [`greedy`] (the paper's rule) and [`exact`] (multiple-choice knapsack by dynamic
//!   programming) over a [`Problem`]: per layer, each expert's bytes and predicted loss.
//! - [`Method`]: every named method: `2d`, `hetero` and `hetero+rank` as menu restrictions
//!   solved against the predictor, and the budgeted baselines (`1d`, `2d_uniform`, one scorer's
//!   uniform keep, AdaKV, PyramidKV) matched to the budget by one shared search ([`baselines`]).
#![warn(missing_docs)]

pub mod baselines;
mod budget;
pub mod calibrate;
mod credit;
pub mod exact;
pub mod greedy;
pub mod measured;
mod menu;
mod method;
pub mod moqae;
mod problem;
mod table;
// The crate's invariants (proptest), in the unit-test binary like every crate's tests: a
// separate integration binary would compile burn's CPU backend once more.
#[cfg(test)]
mod invariants;

pub use budget::Budget;
pub use calibrate::{
    CalibrationLoss, CalibrationOptions, OBSERVE_WINDOW, Passage, calibrate, calibrate_each,
    fit_axes, mean_over_passages, observing,
};
pub use credit::{credited_losses, menu_scorer};
pub use measured::{EndToEnd, EndToEndLoss, MeasuredLoss, spearman};
pub use menu::{
    KEY_RANK, ROUTED_SCORERS, SMALL_WINDOWS, default_menu, rank_menu, scorer_menu, stage_menu,
    window_menu,
};
pub use method::{Geometry, Method, Planned};
pub use problem::{Problem, Solution, SolverError};
pub use table::{LossPredictor, SensitivityTable};

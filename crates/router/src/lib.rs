//! Per-layer experts and routing plans.
//!
//! An [`Expert`] is one layer's recipe: optional eviction, low-rank projection and
//! quantization settings (absent = that axis untouched). A [`RoutingPlan`] gives every layer an
//! expert and is stored as TOML, validated on load. [`RoutedCache`] is the single attention
//! patch: a `LayerCache` that applies its layer's expert at the end of prefill (eviction, then
//! the expert's stages in order: projection, stages of axes other crates register,
//! quantization), and compresses residual-window overflow during decode. [`Axes`] carries the
//! calibrated axes (trig statistics, low-rank bases, registered axes); [`stage`] says how a
//! crate adds an axis without editing the router.
#![warn(missing_docs)]

mod cache;
mod decoding;
mod expert;
mod plan;
pub mod stage;
// The crate's invariants (proptest), in the unit-test binary like every crate's tests: a
// separate integration binary would compile burn's CPU backend once more.
#[cfg(test)]
mod invariants;

pub use cache::{Axes, RoutedCache};
pub use expert::{DECODE_OBSERVE, DecodeBudget, Expert, RESIDUAL};
pub use plan::{Needs, RouterError, RoutingPlan, SizedFor};
pub use stage::{CustomStage, StageAxis, StageSetting, register_stage, registered_stages};

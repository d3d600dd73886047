//! Per-layer experts and routing plans.
//!
//! An [`Expert`] is one layer's recipe: optional eviction, low-rank projection and
//! quantization settings (absent = that axis untouched). A [`RoutingPlan`] gives every layer an
//! expert and is stored as TOML, validated on load. [`RoutedCache`] is the single attention
//! patch: a `LayerCache` that applies its layer's expert in the fixed order
//! evict → project → quantize at the end of prefill, and compresses residual-window overflow
//! during decode. [`Axes`] carries the calibrated axes (trig statistics, low-rank bases).
#![warn(missing_docs)]

mod cache;
mod expert;
mod plan;
// The crate's invariants (proptest), in the unit-test binary like every crate's tests: a
// separate integration binary would compile burn's CPU backend once more.
#[cfg(test)]
mod invariants;

pub use cache::{Axes, RoutedCache};
pub use expert::{Expert, RESIDUAL};
pub use plan::{Needs, RouterError, RoutingPlan, SizedFor};

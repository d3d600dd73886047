//! Per-layer experts and routing plans.
//!
//! An [`Expert`] is one layer's recipe: an optional eviction setting and an optional
//! quantization setting (absent = that axis untouched). A [`RoutingPlan`] gives every layer an
//! expert and is stored as TOML, validated on load. [`RoutedCache`] is the single attention
//! patch: a `LayerCache` that applies its layer's expert in the fixed order evict → quantize at
//! the end of prefill, and quantizes residual-window overflow during decode.
#![warn(missing_docs)]

mod cache;
mod expert;
mod plan;

pub use cache::RoutedCache;
pub use expert::{Expert, RESIDUAL};
pub use plan::{RouterError, RoutingPlan};

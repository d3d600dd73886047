//! Cross-layer KV sharing, as a user's crate would add an axis to kvnd.
//!
//! xKV (Chang et al., "xKV: Cross-Layer SVD for KV-Cache Compression", 2025) observes that the
//! dominant singular directions of adjacent layers' keys and values are well aligned, so a group
//! of adjacent layers can share one low-rank basis. This crate takes that observation with an
//! offline-calibrated basis: each group of `layers` adjacent layers pools its per-head second
//! moments (from the low-rank axis' PCA calibration) and keeps the top directions of the pool;
//! each layer stores its own coefficients on that shared basis, and the basis is held once for
//! the group, each member charged its share of the bytes. (xKV itself factors the group's
//! concatenated cache per prompt, sharing the token-side factors; that needs state across
//! layers' caches that kvnd's per-layer `LayerCache` seam does not carry.)
//!
//! It is written only against public traits, following ARCHITECTURE.md's "Adding an axis":
//! - [`ShareSetting`] is the per-layer knob. It prices itself through
//!   [`kv_tensor::PlanStage`] and names its axis through [`router::StageSetting`].
//! - [`Share`] implements [`kv_tensor::CompressionAxis`].
//! - [`register`] lets plan files name the setting, and `Axes::with_stage` routes it.
#![warn(missing_docs)]

mod axis;
mod calibrate;
#[cfg(test)]
mod invariants;
mod setting;

pub use axis::Share;
pub use calibrate::{ShareError, pooled_bases};
pub use setting::ShareSetting;

/// The axis name plan files use: `axis = "share"`.
pub const AXIS: &str = "share";

/// Lets plan files name [`ShareSetting`]s (idempotent).
pub fn register() {
    router::register_stage::<ShareSetting>(AXIS);
}

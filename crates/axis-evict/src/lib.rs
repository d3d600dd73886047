//! The token axis: evict the cached tokens that matter least.
//!
//! As in NVIDIA's kvpress, a method is a *scorer* (one [`Scorer`] per file: [`streaming`],
//! [`knorm`], [`snapkv`], [`h2o`], [`tova`], [`expected_attention`], [`random`], [`trig`], [`kvzip`],
//! registered by one line in `scorer.rs`) that gives every cached token an importance per KV
//! head and declares what it reads ([`ScorerNeeds`]), and a *selection* (one file each: [`select`] keeps
//! the best `ceil(keep × tokens)` of every head, [`headwise`] shares the layer's budget across
//! heads AdaKV-style and stores them ragged, [`redundancy`] penalises near-duplicate values, [`facility`] is α's facility-location
//! retention).
//! [`decoding`] compresses again during long generations. The first `sinks` tokens and the most recent `window`
//! tokens are always kept. Kept tokens keep their original positions, stored with the segment:
//! keys are cached after RoPE, so nothing needs re-rotation and decoding continues at the right
//! positions.
#![warn(missing_docs)]

pub mod chunks;
pub mod decoding;
mod evict;
pub mod expected_attention;
pub mod facility;
pub mod h2o;
pub mod headwise;
pub mod knorm;
pub mod kvzip;
mod mass;
pub mod random;
pub mod redundancy;
mod scorer;
pub mod select;
mod setting;
pub mod snapkv;
pub mod streaming;
pub mod tova;
pub mod trig;
// Tests of the eviction invariants (proptest), kept in the unit-test binary: a separate integration
// binary would compile burn's CPU backend once more.
#[cfg(test)]
mod invariants;

pub use decoding::{DecodingEvictCache, DecodingSetting, RecentQueries};
pub use evict::Evict;
pub use mass::MassLedger;
pub use scorer::{ScoreInput, Scorer, ScorerKind, ScorerNeeds, ScorerType};
pub use setting::{EvictSetting, Lambda, Selection};
pub use trig::{TrigAccumulator, TrigStats};

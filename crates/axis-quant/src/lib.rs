//! The precision axis: asymmetric integer quantization of the KV cache.
//!
//! - [`Kivi`] (KIVI, Liu et al. 2024): keys per-channel (groups run along tokens), values
//!   per-token (groups run along the head dimension), K and V bits chosen independently, codes
//!   bit-packed through `kv_tensor::PackedCodes`, fp16 scales and minimums.
//!   KIVI's residual window (the newest tokens dense, older ones quantized a whole group at a
//!   time, history never re-quantized) is the router's: `router::RoutedCache` runs it for every
//!   expert that quantizes.
//! - [`moqae`] (MoQAE): chunk-level mixed precision, a bit width per chunk of tokens chosen by a
//!   pluggable [`moqae::ChunkRouter`], with the first chunk kept at 16 bits.
#![warn(missing_docs)]

mod error;
mod kivi;
mod kivi_host;
pub mod moqae;
mod setting;
// Tests of the quantization invariants (proptest), kept in the unit-test binary: a separate
// integration binary would compile burn's CPU backend once more.
#[cfg(test)]
mod invariants;

pub use error::QuantError;
pub use kivi::{Kivi, quantize};
pub use setting::{GroupSize, QuantSetting};

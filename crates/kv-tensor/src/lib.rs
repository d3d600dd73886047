//! The KV-cache vocabulary every kvnd crate speaks.
//!
//! Tensors are `[batch, kv_heads, tokens, head_dim]`, keys are stored *after* RoPE. A layer's
//! cache is a list of compressed [`Segment`]s followed by a dense full-precision residual window
//! ([`CompressedLayer`]). Every way of storing one side (K or V) of a segment is an [`Encoded`]
//! value that decodes back to a float tensor, and every storage reports its exact [`Footprint`]
//! in bytes, counted from what is allocated. Compression methods implement [`CompressionAxis`];
//! the model talks to a cache only through [`LayerCache`].
#![warn(missing_docs)]

mod attention;
mod axis;
mod backend;
mod cache;
mod encoded;
mod error;
mod footprint;
mod fp16;
mod host;
mod host_attention;
pub mod host_gemm;
mod host_kernels;
mod host_segment;
#[cfg(target_arch = "x86_64")]
mod host_wide;
mod layer;
mod layout;
mod packing;
mod partial_attention;
mod segment;
mod stage;
mod units;
// Tests of the host attention against a naive loop-by-loop softmax, kept in the unit-test binary: a
// separate integration binary would compile burn's CPU backend once more.
#[cfg(test)]
mod attention_reference;
#[cfg(test)]
mod compressed_reference;

pub use attention::{
    ATTENTION_QUERY_CHUNK, Reduce, accumulate_mass, attention, attention_padded,
    attention_with_mass, attention_with_peak, window_attention,
};
pub use axis::{CompressionAxis, ObservationCtx};
pub use backend::KvBackend;
pub use cache::{FullCache, LayerCache, RecordingCache};
pub use encoded::{Basis, Encoded, GroupAxis, Quantized, basis_bytes_per_layer};
pub use error::{AxisError, KvError};
pub use footprint::Footprint;
pub use fp16::{Fp16Tensor, f16_ceil_bits, f16_floor_bits, f16_value};
pub use host::{DensePrecision, Prefetch, dot, host_copy};
pub use host_kernels::exp as exp_nonpositive;
pub use layer::CompressedLayer;
pub use layout::{KvLayout, LayerShape};
pub use packing::{CodeBits, PackedCodes};
pub use segment::{Positions, Segment};
pub use stage::{Configured, PlanStage, Side, SidePlan, Stage, compose_footprint, output_shape};
pub use units::{Bits, Bytes, Ratio};

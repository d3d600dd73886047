//! The trait every compression axis implements, and what the model observed for scorers.
use crate::KvBackend;
use crate::{AxisError, Footprint, LayerShape, Segment};
use burn::tensor::Tensor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

/// What the model saw while prefilling one layer, handed to scorers without a second forward
/// pass. Each field is optional: a scorer that needs a missing one returns
/// [`AxisError::MissingObservation`].
#[derive(Debug, Clone)]
pub struct ObservationCtx<B: KvBackend> {
    /// The layer index.
    pub layer: usize,
    /// Post-RoPE queries of the last observation window `[b, q_heads, w, d]` (SnapKV, TOVA).
    pub window_queries: Option<Tensor<B, 4>>,
    /// Attention mass each cached token received during prefill, summed over queries and
    /// grouped query heads `[b, kv_heads, tokens]` (H2O).
    pub attention_mass: Option<Tensor<B, 3>>,
    /// Pre-RoPE queries of the observation window `[b, q_heads, w, d]` (TriAttention-style).
    pub pre_rope_queries: Option<Tensor<B, 4>>,
    /// The largest attention each cached token received from any query of a second pass
    /// that makes the model repeat the context `[b, kv_heads, tokens]` (KVzip).
    pub reconstruction: Option<Tensor<B, 3>>,
}

impl<B: KvBackend> ObservationCtx<B> {
    /// The window queries, or the typed error naming the scorer that needed them.
    pub fn require_window_queries(&self, method: &'static str) -> Result<Tensor<B, 4>, AxisError> {
        self.window_queries
            .clone()
            .ok_or(AxisError::MissingObservation {
                method,
                what: "window queries",
            })
    }

    /// A context that carries nothing but the layer index.
    pub fn bare(layer: usize) -> Self {
        Self {
            layer,
            window_queries: None,
            attention_mass: None,
            pre_rope_queries: None,
            reconstruction: None,
        }
    }
}

/// One axis of KV compression (tokens, precision, head dimension…), generic over the backend.
///
/// `compress` receives a segment of cached tokens (dense or already compressed by an earlier
/// axis of the same expert) and returns it compressed along this axis. `footprint` predicts the
/// bytes of a dense segment of `shape` compressed with `setting`; the prediction must equal
/// what `compress` allocates, so that solvers can plan without compressing anything.
///
/// A user's own axis implements this trait in their own crate and plugs into the router.
pub trait CompressionAxis<B: KvBackend>: Send + Sync {
    /// The per-layer knob of this axis (a keep ratio, bit widths, ranks…).
    type Setting: Clone + Send + Sync + Debug + PartialEq + Serialize + DeserializeOwned;

    /// Compresses `segment` along this axis.
    fn compress(
        &self,
        segment: Segment<B>,
        setting: &Self::Setting,
        ctx: &ObservationCtx<B>,
    ) -> Result<Segment<B>, AxisError>;

    /// Bytes of a dense segment of `shape` once compressed (equal to what `compress` allocates).
    fn footprint(&self, shape: &LayerShape, setting: &Self::Setting) -> Footprint;
}

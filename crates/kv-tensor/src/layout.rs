//! Shapes: the whole model's KV layout and the shape of one layer's cached tensors.
use crate::{Bytes, KvError};
use serde::{Deserialize, Serialize};

/// The KV geometry of a model. Query heads are grouped over KV heads (GQA): query head `h`
/// reads KV head `h / (q_heads / kv_heads)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    /// Decoder layers.
    pub layers: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Query heads per layer (a multiple of `kv_heads`).
    pub q_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
}

impl KvLayout {
    /// Validates that every count is positive and query heads group evenly over KV heads.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        q_heads: usize,
        head_dim: usize,
    ) -> Result<Self, KvError> {
        if layers == 0 || kv_heads == 0 || q_heads == 0 || head_dim == 0 {
            return Err(KvError::InvalidValue {
                what: "KV layout",
                value: format!(
                    "layers={layers} kv_heads={kv_heads} q_heads={q_heads} head_dim={head_dim}"
                ),
                allowed: "all counts positive",
            });
        }
        if !q_heads.is_multiple_of(kv_heads) {
            return Err(KvError::InvalidValue {
                what: "KV layout",
                value: format!("{q_heads} query heads over {kv_heads} KV heads"),
                allowed: "q_heads a multiple of kv_heads",
            });
        }
        Ok(Self {
            layers,
            kv_heads,
            q_heads,
            head_dim,
        })
    }

    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    /// The shape of one layer's cache holding `tokens` tokens.
    pub fn layer_shape(&self, batch: usize, tokens: usize) -> LayerShape {
        LayerShape {
            batch,
            kv_heads: self.kv_heads,
            tokens,
            head_dim: self.head_dim,
        }
    }

    /// The fp16 reference: K and V of every token of every layer at two bytes per value.
    pub fn fp16_bytes(&self, batch: usize, tokens: usize) -> Bytes {
        Bytes(self.layers as u64 * self.layer_shape(batch, tokens).fp16_bytes().get())
    }
}

/// Shape of one layer's K (or V): `[batch, kv_heads, tokens, head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerShape {
    /// Batch size.
    pub batch: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Tokens.
    pub tokens: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl LayerShape {
    /// From a tensor's dims.
    pub fn from_dims(d: [usize; 4]) -> Self {
        Self {
            batch: d[0],
            kv_heads: d[1],
            tokens: d[2],
            head_dim: d[3],
        }
    }

    /// As tensor dims.
    pub fn dims(&self) -> [usize; 4] {
        [self.batch, self.kv_heads, self.tokens, self.head_dim]
    }

    /// Values in one side (K or V).
    pub fn numel(&self) -> usize {
        self.batch * self.kv_heads * self.tokens * self.head_dim
    }

    /// fp16 bytes of K and V together: the reference every compression ratio divides.
    pub fn fp16_bytes(&self) -> Bytes {
        Bytes(2 * 2 * self.numel() as u64)
    }
}

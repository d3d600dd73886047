//! One layer's recipe and its exact byte cost.
use axis_evict::EvictSetting;
use axis_quant::{Kivi, QuantSetting};
use kv_tensor::{Bits, Footprint, GroupAxis, LayerShape};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Full-precision residual window (tokens) kept by a layer whose expert quantizes.
pub const RESIDUAL: usize = 64;

/// A layer's expert: each axis optional.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expert {
    /// Token eviction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evict: Option<EvictSetting>,
    /// Quantization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<QuantSetting>,
}

impl Expert {
    /// The identity expert (full cache).
    pub const FULL: Expert = Expert {
        evict: None,
        quant: None,
    };

    /// Tokens kept of `t` prompt tokens.
    pub fn kept(&self, t: usize) -> usize {
        self.evict.map_or(t, |e| e.kept(t))
    }

    /// Kept tokens split into (quantized, dense residual) at the end of a `t`-token prefill.
    pub fn split(&self, t: usize) -> (usize, usize) {
        let n = self.kept(t);
        match self.quant {
            Some(q) if !q.is_identity() => {
                let g = q.group.get();
                let quantized = n.saturating_sub(RESIDUAL) / g * g;
                (quantized, n - quantized)
            }
            _ => (0, n),
        }
    }

    /// Exact bytes of one layer after a `t`-token prefill of `shape` (tokens ignored): what
    /// [`crate::RoutedCache`] allocates, so solvers can plan without compressing. Unquantized
    /// sides are stored in fp16.
    pub fn footprint(&self, shape: &LayerShape, t: usize) -> Footprint {
        let (quantized, dense) = self.split(t);
        const HALF: usize = 2;
        let at = |n: usize| LayerShape {
            tokens: n,
            ..*shape
        };
        let mut f = Footprint::dense(kv_tensor::Bytes((2 * at(dense).numel() * HALF) as u64));
        if let Some(q) = self.quant.filter(|_| quantized > 0) {
            let g = q.group.get();
            f += Kivi::side_footprint(&at(quantized), q.k_bits, g, GroupAxis::Tokens, HALF);
            f += Kivi::side_footprint(&at(quantized), q.v_bits, g, GroupAxis::Channels, HALF);
        }
        if self.kept(t) < t {
            // Kept positions (i32) for every kept token and head.
            f.indices = kv_tensor::Bytes((shape.batch * shape.kv_heads * self.kept(t) * 4) as u64);
        }
        f
    }
}

impl fmt::Display for Expert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.evict {
            Some(e) => write!(f, "keep {:.2} ({:?})", e.keep.get(), e.scorer)?,
            None => write!(f, "keep 1.00")?,
        }
        let (k, v) = self
            .quant
            .map_or((Bits::Full, Bits::Full), |q| (q.k_bits, q.v_bits));
        write!(f, " K{k}V{v}")
    }
}

//! One layer's recipe and its exact byte cost.
use axis_evict::{EvictSetting, Selection};
use axis_lowrank::LowRankSetting;
use axis_quant::{Kivi, QuantSetting};
use kv_tensor::{Bits, Footprint, GroupAxis, LayerShape};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Full-precision residual window (tokens) kept by a layer whose expert quantizes or projects.
pub const RESIDUAL: usize = 64;

/// Tokens projected at a time by an expert that projects without quantizing (the flush
/// granularity of its residual window).
pub const PROJECT_GROUP: usize = 32;

/// Bytes per value of a low-rank basis: bases stay in the backend's f32 (they are tiny:
/// `kv_heads × head_dim × rank` per layer) and are counted once per layer.
pub const BASIS_BYTES: usize = 4;

/// A layer's expert: each axis optional.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expert {
    /// Token eviction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evict: Option<EvictSetting>,
    /// Low-rank projection of keys and/or values (needs calibrated bases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lowrank: Option<LowRankSetting>,
    /// Quantization (of the coefficients when the side is projected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<QuantSetting>,
}

impl Expert {
    /// The identity expert (full cache).
    pub const FULL: Expert = Expert {
        evict: None,
        lowrank: None,
        quant: None,
    };

    /// Checks what types alone cannot: ranks within the head dimension, quantization groups
    /// that divide projected value coefficients, and head-wise (ragged) eviction only on its
    /// own (its ragged segments are not split into residual windows).
    pub fn validate(&self, head_dim: usize) -> Result<(), String> {
        if let Some(l) = self.lowrank {
            for (side, r) in [("k_rank", l.k_rank), ("v_rank", l.v_rank)] {
                if let Some(r) = r
                    && (r == 0 || r > head_dim)
                {
                    return Err(format!("{side} = {r} is not in 1..={head_dim}"));
                }
            }
            if let (Some(r), Some(q)) = (l.v_rank, self.quant.filter(|q| !q.is_identity()))
                && r % q.group.get() != 0
            {
                return Err(format!(
                    "v_rank = {r} is not a multiple of the quantization group {} (values are grouped along channels)",
                    q.group.get()
                ));
            }
        }
        if let Some(e) = self.evict
            && matches!(e.selection, Selection::HeadWise { .. })
            && self.compresses_history()
        {
            return Err(
                "head-wise eviction cannot be combined with projection or quantization".into(),
            );
        }
        Ok(())
    }

    /// Whether old tokens are projected or quantized (then a residual window stays dense).
    pub fn compresses_history(&self) -> bool {
        self.quant.is_some_and(|q| !q.is_identity())
            || self
                .lowrank
                .is_some_and(|l| l.k_rank.is_some() || l.v_rank.is_some())
    }

    /// Tokens flushed from the residual window at a time.
    pub fn group(&self) -> usize {
        self.quant
            .filter(|q| !q.is_identity())
            .map_or(PROJECT_GROUP, |q| q.group.get())
    }

    /// Tokens kept of `t` prompt tokens.
    pub fn kept(&self, t: usize) -> usize {
        self.evict.map_or(t, |e| e.kept(t))
    }

    /// Kept tokens split into (quantized, dense residual) at the end of a `t`-token prefill.
    pub fn split(&self, t: usize) -> (usize, usize) {
        let n = self.kept(t);
        if self.compresses_history() {
            let g = self.group();
            let quantized = n.saturating_sub(RESIDUAL) / g * g;
            (quantized, n - quantized)
        } else {
            (0, n)
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
        if quantized > 0 {
            let ranks = self.lowrank.map_or((None, None), |l| (l.k_rank, l.v_rank));
            let sides = [
                (ranks.0, GroupAxis::Tokens, self.quant.map(|q| q.k_bits)),
                (ranks.1, GroupAxis::Channels, self.quant.map(|q| q.v_bits)),
            ];
            for (rank, along, bits) in sides {
                let side = LayerShape {
                    tokens: quantized,
                    head_dim: rank.unwrap_or(shape.head_dim),
                    ..*shape
                };
                f += match (self.quant, bits) {
                    (Some(q), Some(b)) => {
                        Kivi::side_footprint(&side, b, q.group.get(), along, HALF)
                    }
                    _ => Footprint::dense(kv_tensor::Bytes((side.numel() * HALF) as u64)),
                };
                if let Some(r) = rank {
                    f.basis += kv_tensor::Bytes(
                        (shape.kv_heads * shape.head_dim * r * BASIS_BYTES) as u64,
                    );
                }
            }
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
        if let Some(l) = self.lowrank {
            let r = |x: Option<usize>| x.map_or("-".to_string(), |r| r.to_string());
            write!(f, " rank K{}V{}", r(l.k_rank), r(l.v_rank))?;
        }
        let (k, v) = self
            .quant
            .map_or((Bits::Full, Bits::Full), |q| (q.k_bits, q.v_bits));
        write!(f, " K{k}V{v}")
    }
}

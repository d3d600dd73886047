//! Exact byte accounting of a cache, split by what the bytes hold.
use crate::Bytes;
use serde::{Deserialize, Serialize};
use std::ops::{Add, AddAssign};

/// Bytes a cache holds, by kind. Every field is counted from what is allocated (element count
/// × element size of the stored tensor), never from nominal bit widths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footprint {
    /// Packed integer codes.
    pub codes: Bytes,
    /// Quantization scales and zero-points (fp16).
    pub scales: Bytes,
    /// Kept-token bookkeeping: original positions of evicted caches.
    pub indices: Bytes,
    /// Dense float tensors (full-precision segments, the residual window, projected coefficients
    /// left unquantized), at the element size of the backend's float type.
    pub dense: Bytes,
    /// Low-rank bases, counted once per layer and side.
    pub basis: Bytes,
}

impl Footprint {
    /// All bytes.
    pub fn total(&self) -> Bytes {
        self.codes + self.scales + self.indices + self.dense + self.basis
    }

    /// `reference / total`: how many times smaller than `reference` (usually fp16 K+V).
    pub fn ratio_to(&self, reference: Bytes) -> f64 {
        reference.get() as f64 / self.total().get().max(1) as f64
    }

    /// Only dense bytes.
    pub fn dense(bytes: Bytes) -> Self {
        Self {
            dense: bytes,
            ..Self::default()
        }
    }
}

impl Add for Footprint {
    type Output = Footprint;
    fn add(self, o: Footprint) -> Footprint {
        Footprint {
            codes: self.codes + o.codes,
            scales: self.scales + o.scales,
            indices: self.indices + o.indices,
            dense: self.dense + o.dense,
            basis: self.basis + o.basis,
        }
    }
}

impl AddAssign for Footprint {
    fn add_assign(&mut self, o: Footprint) {
        *self = *self + o;
    }
}

impl std::iter::Sum for Footprint {
    fn sum<I: Iterator<Item = Footprint>>(iter: I) -> Footprint {
        iter.fold(Footprint::default(), Add::add)
    }
}

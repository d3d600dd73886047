//! How one side (K or V) of a cache segment is stored: dense floats, low-rank coefficients with
//! a basis, or packed integer codes with fp16 scales and zero-points.
use crate::KvBackend;
use crate::{Bytes, Footprint, Fp16Tensor, KvError, PackedCodes};
use burn::tensor::Tensor;
use std::sync::{Arc, OnceLock};

/// Which axis a quantization group runs along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupAxis {
    /// Groups of `g` consecutive tokens share a scale per channel (KIVI keys: per-channel).
    Tokens,
    /// Groups of `g` consecutive channels share a scale per token (KIVI values: per-token).
    Channels,
}

/// Asymmetric integer quantization: `x ≈ code · scale + min`, one `(scale, min)` per group.
///
/// # Shapes
/// codes unpack to `[b, h, t, d]`; scales and mins are `[b, h, t/g, d]` for
/// [`GroupAxis::Tokens`] and `[b, h, t, d/g]` for [`GroupAxis::Channels`].
#[derive(Debug, Clone)]
pub struct Quantized<B: KvBackend> {
    codes: PackedCodes<B>,
    scales: Fp16Tensor<B, 4>,
    mins: Fp16Tensor<B, 4>,
    group: usize,
    along: GroupAxis,
}

impl<B: KvBackend> Quantized<B> {
    /// Assembles a quantized tensor, checking that codes, scales and mins agree on the grouping.
    pub fn new(
        codes: PackedCodes<B>,
        scales: Fp16Tensor<B, 4>,
        mins: Fp16Tensor<B, 4>,
        group: usize,
        along: GroupAxis,
    ) -> Result<Self, KvError> {
        let s = codes.shape().to_vec();
        if s.len() != 4 || group == 0 {
            return Err(KvError::Shape {
                context: "quantized codes",
                expected: vec![0; 4],
                got: s,
            });
        }
        let expected = match along {
            GroupAxis::Tokens if s[2].is_multiple_of(group) => vec![s[0], s[1], s[2] / group, s[3]],
            GroupAxis::Channels if s[3].is_multiple_of(group) => {
                vec![s[0], s[1], s[2], s[3] / group]
            }
            _ => {
                return Err(KvError::InvalidValue {
                    what: "quantization group",
                    value: format!("group {group} over shape {s:?}"),
                    allowed: "a group size dividing the grouped axis",
                });
            }
        };
        for (what, t) in [("scales", &scales), ("mins", &mins)] {
            if t.dims().to_vec() != expected {
                let _ = what;
                return Err(KvError::Shape {
                    context: "quantization scales/mins",
                    expected,
                    got: t.dims().to_vec(),
                });
            }
        }
        Ok(Self {
            codes,
            scales,
            mins,
            group,
            along,
        })
    }

    /// Dequantizes to floats `[b, h, t, d]`.
    pub fn decode(&self) -> Result<Tensor<B, 4>, KvError> {
        let [b, h, t, d] = self.dims();
        let g = self.group;
        let x = self.codes.unpack::<4>()?.float();
        let (scales, mins) = (self.scales.decode(), self.mins.decode());
        Ok(match self.along {
            GroupAxis::Tokens => {
                let x = x.reshape([b, h, t / g, g, d]);
                let s = scales.reshape([b, h, t / g, 1, d]);
                let m = mins.reshape([b, h, t / g, 1, d]);
                (x * s + m).reshape([b, h, t, d])
            }
            GroupAxis::Channels => {
                let x = x.reshape([b, h, t, d / g, g]);
                let s = scales.reshape([b, h, t, d / g, 1]);
                let m = mins.reshape([b, h, t, d / g, 1]);
                (x * s + m).reshape([b, h, t, d])
            }
        })
    }

    /// Shape of the decoded tensor.
    pub fn dims(&self) -> [usize; 4] {
        let s = self.codes.shape();
        [s[0], s[1], s[2], s[3]]
    }

    /// The packed codes.
    pub fn codes(&self) -> &PackedCodes<B> {
        &self.codes
    }

    /// The fp16 scales.
    pub fn scales(&self) -> &Fp16Tensor<B, 4> {
        &self.scales
    }

    /// The fp16 minimums (zero-points).
    pub fn mins(&self) -> &Fp16Tensor<B, 4> {
        &self.mins
    }

    /// Group size.
    pub fn group(&self) -> usize {
        self.group
    }

    /// Grouping axis.
    pub fn along(&self) -> GroupAxis {
        self.along
    }

    /// Bytes by kind: codes, and scales + mins.
    pub fn footprint(&self) -> Footprint {
        Footprint {
            codes: self.codes.bytes(),
            scales: self.scales.bytes() + self.mins.bytes(),
            ..Footprint::default()
        }
    }
}

/// An orthonormal projection basis `[h, d, r]`. Every segment of a layer that projects a side
/// holds the same basis, and layers that share one (cross-layer sharing) hold the same
/// `Arc<Basis>`: each of the `layers` layers counts its share of the bytes, and the host copy
/// is made once for all of them.
#[derive(Debug)]
pub struct Basis<B: KvBackend> {
    tensor: Tensor<B, 3>,
    layers: usize,
    host: OnceLock<Arc<Vec<f32>>>,
}

impl<B: KvBackend> Basis<B> {
    /// A basis held by one layer.
    pub fn new(tensor: Tensor<B, 3>) -> Arc<Self> {
        Self::shared(tensor, 1)
    }

    /// A basis shared by `layers` layers (at least one).
    pub fn shared(tensor: Tensor<B, 3>, layers: usize) -> Arc<Self> {
        Arc::new(Self {
            tensor,
            layers: layers.max(1),
            host: OnceLock::new(),
        })
    }

    /// The basis `[h, d, r]`.
    pub fn tensor(&self) -> &Tensor<B, 3> {
        &self.tensor
    }

    /// Layers sharing it.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// This layer's share of the basis bytes: `Basis::bytes_per_layer` of its shape.
    pub fn bytes(&self) -> Bytes {
        let [h, d, r] = self.tensor.dims();
        basis_bytes_per_layer(h * d * r * self.tensor.dtype().size(), self.layers)
    }

    /// The host copy, made on first use and shared by every holder.
    pub(crate) fn host(&self) -> Result<Arc<Vec<f32>>, KvError> {
        if let Some(h) = self.host.get() {
            return Ok(h.clone());
        }
        let values = Arc::new(crate::host_segment::floats(self.tensor.clone())?);
        Ok(self.host.get_or_init(|| values).clone())
    }
}

/// Bytes each of `layers` layers is charged for a basis of `bytes` bytes (rounded up, so the
/// shares never undercount).
pub fn basis_bytes_per_layer(bytes: usize, layers: usize) -> Bytes {
    Bytes(bytes.div_ceil(layers.max(1)) as u64)
}

/// One side of a segment as stored.
#[derive(Debug, Clone)]
pub enum Encoded<B: KvBackend> {
    /// Plain floats `[b, h, t, d]`.
    Dense(Tensor<B, 4>),
    /// Low-rank coefficients `[b, h, t, r]` (themselves dense or quantized) and the layer's
    /// orthonormal basis `[h, d, r]`; the value is `coeffs · basisᵀ`.
    Projected {
        /// The coefficients.
        coeffs: Box<Encoded<B>>,
        /// The basis, shared by every segment of the layer (counted once per layer, or its
        /// share when layers share it).
        basis: Arc<Basis<B>>,
    },
    /// Packed integer codes.
    Quantized(Quantized<B>),
    /// Half precision (binary16 bits in a `u16` tensor): the "16-bit" of a compressed layer,
    /// two bytes per value on every backend.
    Half(Fp16Tensor<B, 4>),
    /// One entry per KV head (`[b, 1, t_h, d]` each), heads holding different numbers of
    /// tokens (head-wise eviction budgets). Stored compactly: no padding is allocated; decoding
    /// pads every head to the longest with zeros, and [`Segment::padding`](crate::Segment::padding)
    /// says which rows attention must ignore.
    Ragged(Vec<Encoded<B>>),
}

impl<B: KvBackend> Encoded<B> {
    /// `x` `[b, h, t, d]` projected onto `basis` `[h, d, r]`: its coefficients `x · basis`
    /// (dense, per head as one batched matmul) with the basis, which [`Encoded::decode`] maps
    /// back.
    pub fn project(x: Tensor<B, 4>, basis: Arc<Basis<B>>) -> Self {
        let [b, h, t, d] = x.dims();
        let r = basis.tensor().dims()[2];
        let coeffs = x
            .swap_dims(0, 1)
            .reshape([h, b * t, d])
            .matmul(basis.tensor().clone())
            .reshape([h, b, t, r])
            .swap_dims(0, 1);
        Encoded::Projected {
            coeffs: Box::new(Encoded::Dense(coeffs)),
            basis,
        }
    }

    /// Decodes to floats `[b, h, t, d]`.
    pub fn decode(&self) -> Result<Tensor<B, 4>, KvError> {
        match self {
            Encoded::Dense(t) => Ok(t.clone()),
            Encoded::Half(h) => Ok(h.decode()),
            Encoded::Quantized(q) => q.decode(),
            Encoded::Ragged(heads) => {
                let [b, _, t, d] = self.dims();
                let mut parts = Vec::with_capacity(heads.len());
                for h in heads {
                    let x = h.decode()?;
                    let n = x.dims()[2];
                    parts.push(if n < t {
                        let pad = Tensor::zeros([b, 1, t - n, d], &x.device());
                        Tensor::cat(vec![x, pad], 2)
                    } else {
                        x
                    });
                }
                Ok(Tensor::cat(parts, 1))
            }
            Encoded::Projected { coeffs, basis } => {
                let c = coeffs.decode()?;
                let basis = basis.tensor();
                let [h, d, r] = basis.dims();
                let [b, ch, t, cr] = c.dims();
                if ch != h || cr != r {
                    return Err(KvError::Shape {
                        context: "projected coefficients vs basis",
                        expected: vec![b, h, t, r],
                        got: vec![b, ch, t, cr],
                    });
                }
                // [b·h… ] as a batch of per-head matmuls: [h, b·t, r] × [h, r, d].
                let c = c.swap_dims(0, 1).reshape([h, b * t, r]);
                let out = c.matmul(basis.clone().swap_dims(1, 2));
                Ok(out.reshape([h, b, t, d]).swap_dims(0, 1))
            }
        }
    }

    /// The device holding the data.
    pub fn device(&self) -> B::Device {
        match self {
            Encoded::Dense(t) => t.device(),
            Encoded::Half(h) => h.device(),
            Encoded::Quantized(q) => q.codes.words().device(),
            Encoded::Projected { basis, .. } => basis.tensor().device(),
            Encoded::Ragged(heads) => heads.first().map(Encoded::device).unwrap_or_default(),
        }
    }

    /// Decoded shape `[b, h, t, d]`.
    pub fn dims(&self) -> [usize; 4] {
        match self {
            Encoded::Dense(t) => t.dims(),
            Encoded::Half(h) => h.dims(),
            Encoded::Quantized(q) => q.dims(),
            Encoded::Projected { coeffs, basis } => {
                let [b, h, t, _] = coeffs.dims();
                [b, h, t, basis.tensor().dims()[1]]
            }
            Encoded::Ragged(heads) => {
                let [b, _, _, d] = heads.first().map_or([0; 4], Encoded::dims);
                let t = heads.iter().map(|h| h.dims()[2]).max().unwrap_or(0);
                [b, heads.len(), t, d]
            }
        }
    }

    /// Bytes of this side, excluding any basis (a basis belongs to the layer: see
    /// [`Encoded::basis`]).
    pub fn footprint(&self) -> Footprint {
        match self {
            Encoded::Dense(t) => Footprint::dense(dense_bytes(t)),
            Encoded::Half(h) => Footprint::dense(h.bytes()),
            Encoded::Quantized(q) => q.footprint(),
            Encoded::Projected { coeffs, .. } => coeffs.footprint(),
            Encoded::Ragged(heads) => heads.iter().map(Encoded::footprint).sum(),
        }
    }

    /// Stores dense floats (also inside projections) as half precision; other encodings are
    /// kept as they are.
    pub fn into_half(self) -> Self {
        match self {
            Encoded::Dense(t) => Encoded::Half(Fp16Tensor::encode(t)),
            Encoded::Projected { coeffs, basis } => Encoded::Projected {
                coeffs: Box::new(coeffs.into_half()),
                basis,
            },
            Encoded::Ragged(heads) => {
                Encoded::Ragged(heads.into_iter().map(Encoded::into_half).collect())
            }
            other => other,
        }
    }

    /// The low-rank basis, if this side is projected.
    pub fn basis(&self) -> Option<&Arc<Basis<B>>> {
        match self {
            Encoded::Projected { basis, .. } => Some(basis),
            _ => None,
        }
    }
}

/// Bytes allocated by a dense float tensor.
pub(crate) fn dense_bytes<B: KvBackend, const D: usize>(t: &Tensor<B, D>) -> Bytes {
    Bytes((t.shape().num_elements() * t.dtype().size()) as u64)
}

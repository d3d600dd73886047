//! Compressed segments in host memory, in the form the host attention kernels read.
//!
//! On host backends (burn-ndarray) a [`CompressedLayer`](crate::CompressedLayer) moves every
//! segment it is given out of burn tensors into plain vectors once: the packed codes as the
//! little-endian bytes of their `u32` words, scales and minimums as binary16 bits, fp16 values as
//! binary16 bits, low-rank bases as the `r` columns in use. Nothing is widened: the bytes held
//! are the bytes the footprint counts, and the attention kernels
//! ([`host_attention`](crate::host_attention)) read them in place every decode step.
use crate::KvBackend;
use crate::encoded::Encoded;
use crate::{Bytes, CodeBits, Footprint, GroupAxis, KvError, Positions, Segment};
use burn::tensor::{Int, IntDType, Tensor, TensorData};
use std::sync::Arc;

/// Binary16 bits to f32, exactly. Written without branches or table lookups so that loops over
/// rows vectorise (pulp's safe intrinsics have no F16C conversion).
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let h = i32::from(h);
    let sign = (h & 0x8000) << 16;
    let normal = f32::from_bits((((h & 0x7fff) << 13) + (112 << 23)) as u32);
    // Exponent field 0: zero or subnormal, `mantissa · 2^-24`.
    let sub = (h & 0x3ff) as f32 * 5.960_464_5e-8;
    let mag = if h & 0x7c00 == 0 { sub } else { normal };
    f32::from_bits(mag.to_bits() | sign as u32)
}

/// f32 to binary16 bits, rounding to nearest even (the window's storage).
#[inline]
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// Host copy of a tensor's values (`f32` backends hand theirs over directly).
///
/// Takes the tensor by value: burn-ndarray hands over an unshared contiguous tensor's buffer
/// without a copy, but copies a shared one element by element (a tenth of a prefill's time
/// when every chunk's queries, keys and values went that way).
pub(crate) fn floats<B: KvBackend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>, KvError> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| KvError::Backend(format!("{e:?}")))
}

/// Host copy of an integer tensor's values as `i64`.
///
/// The clone shares its buffer with `t`, and burn-ndarray copies a shared array element by
/// element through a dynamic-rank iterator (about 20 ns a value); multiplying by one first
/// makes an unshared copy in one vectorised pass, which `into_data` then hands over.
fn ints<B: KvBackend, const D: usize>(t: &Tensor<B, D, Int>) -> Result<Vec<i64>, KvError> {
    t.clone()
        .mul_scalar(1)
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .map_err(|e| KvError::Backend(format!("{e:?}")))
}

/// Packed codes with their scales and minimums, for `heads` heads of `t` rows of `w` codes.
#[derive(Debug)]
pub(crate) struct HostQuant {
    /// The packed `u32` words as little-endian bytes: code `i` of the flat `[heads][t][w]`
    /// order sits in word `i / per` at bit `bits · (i % per)`.
    pub(crate) bytes: Vec<u8>,
    pub(crate) bits: CodeBits,
    /// Binary16 scales and minimums: `[heads][t / group][w]` along tokens, `[heads][t][w /
    /// group]` along channels.
    pub(crate) scales: Vec<u16>,
    pub(crate) mins: Vec<u16>,
    pub(crate) group: usize,
    pub(crate) along: GroupAxis,
}

/// One side (K or V) of a host segment.
#[derive(Debug)]
pub(crate) enum HostSide {
    /// Floats `[heads][t][w]`.
    F32(Vec<f32>),
    /// Binary16 bits `[heads][t][w]`.
    F16(Vec<u16>),
    /// Packed integer codes.
    Quant(HostQuant),
    /// Coefficients `[heads][t][r]` (any of the above) and each head's basis `[d][r]`
    /// (`[heads_h][d][r]`, shared by every segment of the layer).
    Projected {
        coeffs: Box<HostSide>,
        basis: Arc<Vec<f32>>,
        /// Layers sharing the basis (each counts its share of the bytes).
        layers: usize,
        d: usize,
        r: usize,
    },
    /// One side per KV head (batch 1), heads holding different numbers of rows.
    Ragged(Vec<HostSide>),
}

/// Where a host segment's tokens came from.
#[derive(Debug, Clone)]
pub(crate) enum HostPositions {
    /// `start..start + len`.
    Contiguous { start: usize, len: usize },
    /// `[b·h][t]` kept positions.
    Explicit(Vec<i32>),
    /// Per KV head its own kept positions.
    Ragged(Vec<Vec<i32>>),
}

/// A segment moved to host memory.
#[derive(Debug)]
pub(crate) struct HostSegment {
    pub(crate) positions: HostPositions,
    pub(crate) k: HostSide,
    pub(crate) v: HostSide,
    /// `[b, h, t, d]` of the decoded segment (ragged: `t` of the longest head).
    pub(crate) dims: [usize; 4],
    /// Rows held by each of the `b·h` heads.
    pub(crate) rows: Vec<usize>,
}

impl HostSide {
    /// Moves one side to the host. `heads` is `b·h`; a projected side's basis is shared with
    /// `basis` when that already holds the same values (the layer's basis, counted once).
    fn from_encoded<B: KvBackend>(
        e: &Encoded<B>,
        basis: &mut Option<Arc<Vec<f32>>>,
    ) -> Result<Self, KvError> {
        Ok(match e {
            Encoded::Dense(t) => HostSide::F32(floats(t.clone())?),
            Encoded::Half(h) => {
                HostSide::F16(ints(h.bits())?.into_iter().map(|x| x as u16).collect())
            }
            Encoded::Quantized(q) => {
                let words = ints(q.codes().words())?;
                let mut bytes = Vec::with_capacity(words.len() * 4);
                for w in words {
                    bytes.extend_from_slice(&(w as u32).to_le_bytes());
                }
                let half = |t: &crate::Fp16Tensor<B, 4>| -> Result<Vec<u16>, KvError> {
                    Ok(ints(t.bits())?.into_iter().map(|x| x as u16).collect())
                };
                HostSide::Quant(HostQuant {
                    bytes,
                    bits: q.codes().bits(),
                    scales: half(q.scales())?,
                    mins: half(q.mins())?,
                    group: q.group(),
                    along: q.along(),
                })
            }
            Encoded::Projected { coeffs, basis: b } => {
                if matches!(**coeffs, Encoded::Projected { .. } | Encoded::Ragged(_)) {
                    return Err(KvError::InvalidValue {
                        what: "projected coefficients",
                        value: "projected or ragged coefficients".into(),
                        allowed: "dense, half or quantized coefficients",
                    });
                }
                let [_, d, r] = b.tensor().dims();
                let values = b.host()?;
                let shared = match basis {
                    Some(old) if Arc::ptr_eq(old, &values) || **old == *values => old.clone(),
                    _ => {
                        *basis = Some(values.clone());
                        values
                    }
                };
                HostSide::Projected {
                    coeffs: Box::new(Self::from_encoded(coeffs, basis)?),
                    basis: shared,
                    layers: b.layers(),
                    d,
                    r,
                }
            }
            Encoded::Ragged(heads) => HostSide::Ragged(
                heads
                    .iter()
                    .map(|h| Self::from_encoded(h, basis))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    /// Bytes held, excluding any basis (counted once per layer).
    pub(crate) fn footprint(&self) -> Footprint {
        match self {
            HostSide::F32(x) => Footprint::dense(Bytes((x.len() * 4) as u64)),
            HostSide::F16(x) => Footprint::dense(Bytes((x.len() * 2) as u64)),
            HostSide::Quant(q) => Footprint {
                codes: Bytes(q.bytes.len() as u64),
                scales: Bytes(((q.scales.len() + q.mins.len()) * 2) as u64),
                ..Footprint::default()
            },
            HostSide::Projected { coeffs, .. } => coeffs.footprint(),
            HostSide::Ragged(heads) => heads.iter().map(HostSide::footprint).sum(),
        }
    }

    /// Bytes allocated, capacities included (what the process really holds), excluding bases.
    pub(crate) fn resident(&self) -> usize {
        match self {
            HostSide::F32(x) => x.capacity() * 4,
            HostSide::F16(x) => x.capacity() * 2,
            HostSide::Quant(q) => {
                q.bytes.capacity() + (q.scales.capacity() + q.mins.capacity()) * 2
            }
            HostSide::Projected { coeffs, .. } => coeffs.resident(),
            HostSide::Ragged(heads) => heads.iter().map(HostSide::resident).sum(),
        }
    }

    /// This layer's share of the basis bytes of a projected side.
    pub(crate) fn basis_bytes(&self) -> Option<Bytes> {
        match self {
            HostSide::Projected { basis, layers, .. } => {
                Some(crate::basis_bytes_per_layer(basis.len() * 4, *layers))
            }
            _ => None,
        }
    }
}

impl HostSegment {
    /// Moves `s` to host memory; `bases` holds the layer's key and value bases (shared).
    pub(crate) fn from_segment<B: KvBackend>(
        s: &Segment<B>,
        bases: &mut [Option<Arc<Vec<f32>>>; 2],
    ) -> Result<Self, KvError> {
        let dims = s.k.dims();
        let [b, h, t, _] = dims;
        let (kb, vb) = bases.split_at_mut(1);
        let k = HostSide::from_encoded(&s.k, &mut kb[0])?;
        let v = HostSide::from_encoded(&s.v, &mut vb[0])?;
        let (positions, rows) = match &s.positions {
            Positions::Contiguous { start, len } => (
                HostPositions::Contiguous {
                    start: *start,
                    len: *len,
                },
                vec![t; b * h],
            ),
            Positions::Explicit(p) => (
                HostPositions::Explicit(ints(p)?.into_iter().map(|x| x as i32).collect()),
                vec![t; b * h],
            ),
            Positions::Ragged(parts) => {
                let heads: Vec<Vec<i32>> = parts
                    .iter()
                    .map(|p| Ok(ints(p)?.into_iter().map(|x| x as i32).collect()))
                    .collect::<Result<_, KvError>>()?;
                let rows = heads.iter().map(Vec::len).collect();
                (HostPositions::Ragged(heads), rows)
            }
        };
        if matches!(positions, HostPositions::Ragged(_)) && b != 1 {
            return Err(KvError::InvalidValue {
                what: "ragged segment",
                value: format!("batch {b}"),
                allowed: "batch 1 (head-wise budgets are per sequence)",
            });
        }
        Ok(Self {
            positions,
            k,
            v,
            dims,
            rows,
        })
    }

    /// Bytes held, excluding bases; kept positions are counted at their stored width.
    pub(crate) fn footprint(&self) -> Footprint {
        let mut f = self.k.footprint() + self.v.footprint();
        f.indices += Bytes(match &self.positions {
            HostPositions::Contiguous { .. } => 0,
            HostPositions::Explicit(p) => (p.len() * 4) as u64,
            HostPositions::Ragged(p) => p.iter().map(|h| h.len() * 4).sum::<usize>() as u64,
        });
        f
    }

    /// Bytes allocated (capacities), excluding bases.
    pub(crate) fn resident(&self) -> usize {
        self.k.resident()
            + self.v.resident()
            + match &self.positions {
                HostPositions::Contiguous { .. } => 0,
                HostPositions::Explicit(p) => p.capacity() * 4,
                HostPositions::Ragged(p) => p.iter().map(|h| h.capacity() * 4).sum(),
            }
    }

    /// Tokens per head (ragged: the longest head).
    pub(crate) fn len(&self) -> usize {
        self.dims[2]
    }

    /// Dense keys and values `[b, h, t, d]` as f32 (ragged heads padded with zero rows).
    pub(crate) fn decode(&self) -> (Vec<f32>, Vec<f32>) {
        let [b, h, t, d] = self.dims;
        let mut k = vec![0f32; b * h * t * d];
        let mut v = vec![0f32; b * h * t * d];
        for bh in 0..b * h {
            let n = self.rows[bh];
            let span = bh * t * d..bh * t * d + n * d;
            crate::host_attention::side_view(&self.k, bh, n, h, d).decode(&mut k[span.clone()]);
            crate::host_attention::side_view(&self.v, bh, n, h, d).decode(&mut v[span]);
        }
        (k, v)
    }

    /// Positions `[b·h][t]` (ragged heads padded with `-1`).
    pub(crate) fn positions(&self) -> Vec<i32> {
        let [b, h, t, _] = self.dims;
        match &self.positions {
            HostPositions::Contiguous { start, len } => (0..b * h)
                .flat_map(|_| (*start..start + len).map(|p| p as i32))
                .collect(),
            HostPositions::Explicit(p) => p.clone(),
            HostPositions::Ragged(heads) => heads
                .iter()
                .flat_map(|p| {
                    p.iter()
                        .copied()
                        .chain(std::iter::repeat_n(-1, t - p.len()))
                })
                .collect(),
        }
    }

    /// The segment back as dense burn tensors (f32 values; positions explicit unless
    /// contiguous), for an axis to compress again. Ragged segments cannot be re-compressed.
    pub(crate) fn to_dense<B: KvBackend>(&self, device: &B::Device) -> Result<Segment<B>, KvError> {
        let [b, h, t, d] = self.dims;
        let positions = match &self.positions {
            HostPositions::Contiguous { start, len } => Positions::Contiguous {
                start: *start,
                len: *len,
            },
            HostPositions::Explicit(p) => Positions::Explicit(
                Tensor::<B, 3, Int>::from_data(TensorData::new(p.clone(), [b, h, t]), device)
                    .cast(IntDType::I32),
            ),
            HostPositions::Ragged(_) => {
                return Err(KvError::InvalidValue {
                    what: "segment to re-compress",
                    value: "a ragged (head-wise) segment".into(),
                    allowed: "segments whose heads hold the same tokens",
                });
            }
        };
        let (k, v) = self.decode();
        let tensor =
            |x: Vec<f32>| Tensor::<B, 4>::from_data(TensorData::new(x, [b, h, t, d]), device);
        Ok(Segment {
            positions,
            k: Encoded::Dense(tensor(k)),
            v: Encoded::Dense(tensor(v)),
        })
    }
}

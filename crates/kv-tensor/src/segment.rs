//! A run of cached tokens stored one way, and where its tokens came from.
use crate::KvBackend;
use crate::{Bytes, Encoded, Footprint, KvError};
use burn::tensor::{Bool, Int, IntDType, Tensor};

/// Original sequence positions of the tokens a segment holds.
#[derive(Debug, Clone)]
pub enum Positions<B: KvBackend> {
    /// Tokens `start..start + len`, implicit: costs no bytes.
    Contiguous {
        /// First position.
        start: usize,
        /// Number of tokens.
        len: usize,
    },
    /// Per head, the kept positions `[b, h, t]` (strictly increasing along `t`), stored as
    /// integers and counted in the footprint.
    Explicit(Tensor<B, 3, Int>),
    /// Per KV head, its own kept positions `[b, 1, t_h]` (head-wise budgets; see
    /// [`Encoded::Ragged`]).
    Ragged(Vec<Tensor<B, 3, Int>>),
}

impl<B: KvBackend> Positions<B> {
    /// Tokens per head.
    pub fn len(&self) -> usize {
        match self {
            Positions::Contiguous { len, .. } => *len,
            Positions::Explicit(t) => t.dims()[2],
            Positions::Ragged(heads) => heads.iter().map(|p| p.dims()[2]).max().unwrap_or(0),
        }
    }

    /// True when no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of bookkeeping.
    pub fn bytes(&self) -> Bytes {
        match self {
            Positions::Contiguous { .. } => Bytes(0),
            Positions::Explicit(t) => Bytes((t.shape().num_elements() * t.dtype().size()) as u64),
            Positions::Ragged(heads) => heads
                .iter()
                .map(|t| Bytes((t.shape().num_elements() * t.dtype().size()) as u64))
                .sum(),
        }
    }

    /// Positions as one `[b, h, t]` tensor for `heads` KV heads and batch `b` (ragged heads
    /// padded with `-1`, which never names a real token).
    pub fn to_tensor(&self, batch: usize, heads: usize, device: &B::Device) -> Tensor<B, 3, Int> {
        let t = match self {
            Positions::Contiguous { start, len } => {
                Tensor::<B, 1, Int>::arange(*start as i64..(*start + *len) as i64, device)
                    .reshape([1, 1, *len])
                    .expand([batch, heads, *len])
            }
            Positions::Explicit(t) => t.clone(),
            Positions::Ragged(parts) => {
                let t = self.len();
                let parts = parts
                    .iter()
                    .map(|p| {
                        let n = p.dims()[2];
                        if n < t {
                            let pad = Tensor::<B, 3, Int>::full([batch, 1, t - n], -1, device);
                            Tensor::cat(
                                vec![p.clone().cast(IntDType::I32), pad.cast(IntDType::I32)],
                                2,
                            )
                        } else {
                            p.clone().cast(IntDType::I32)
                        }
                    })
                    .collect();
                Tensor::cat(parts, 1)
            }
        };
        t.cast(IntDType::I32)
    }
}

/// A run of cached tokens stored one way. Keys are cached after RoPE, so a segment never needs
/// re-rotation: evicting tokens only drops rows, and the kept rows keep their original positions.
#[derive(Debug, Clone)]
pub struct Segment<B: KvBackend> {
    /// Where the tokens came from.
    pub positions: Positions<B>,
    /// Keys `[b, h, t, d]` as stored.
    pub k: Encoded<B>,
    /// Values `[b, h, t, d]` as stored.
    pub v: Encoded<B>,
}

impl<B: KvBackend> Segment<B> {
    /// A dense segment of contiguous tokens starting at `start`, checking K/V shapes agree.
    pub fn dense(k: Tensor<B, 4>, v: Tensor<B, 4>, start: usize) -> Result<Self, KvError> {
        if k.dims() != v.dims() {
            return Err(KvError::Shape {
                context: "keys vs values",
                expected: k.dims().to_vec(),
                got: v.dims().to_vec(),
            });
        }
        let len = k.dims()[2];
        Ok(Self {
            positions: Positions::Contiguous { start, len },
            k: Encoded::Dense(k),
            v: Encoded::Dense(v),
        })
    }

    /// Tokens held per head (for ragged segments: by the longest head).
    pub fn len(&self) -> usize {
        self.k.dims()[2]
    }

    /// Which rows of the decoded `[b, h, len]` tensors are padding (true) rather than tokens:
    /// `Some` only for ragged segments, whose heads hold different numbers of tokens.
    pub fn padding(&self) -> Option<Tensor<B, 3, Bool>> {
        let Positions::Ragged(parts) = &self.positions else {
            return None;
        };
        let t = self.len();
        let first = parts.first()?;
        let device = first.device();
        let b = first.dims()[0];
        let rows = parts
            .iter()
            .map(|p| {
                let n = p.dims()[2] as i64;
                Tensor::<B, 1, Int>::arange(0..t as i64, &device)
                    .greater_equal_elem(n)
                    .reshape([1, 1, t])
                    .expand([b, 1, t])
            })
            .collect();
        Some(Tensor::cat(rows, 1))
    }

    /// The segment with dense sides stored as half precision (see [`Encoded::into_half`]).
    pub fn into_half(self) -> Self {
        Segment {
            positions: self.positions,
            k: self.k.into_half(),
            v: self.v.into_half(),
        }
    }

    /// Splits a dense segment into its first `n` tokens and the rest (positions follow).
    pub fn split_at(self, n: usize) -> Result<(Segment<B>, Segment<B>), KvError> {
        let t = self.len();
        let (Encoded::Dense(k), Encoded::Dense(v)) = (self.k, self.v) else {
            return Err(KvError::InvalidValue {
                what: "segment split",
                value: "an encoded segment".into(),
                allowed: "dense segments only",
            });
        };
        let n = n.min(t);
        let (p0, p1) = match self.positions {
            Positions::Contiguous { start, .. } => (
                Positions::Contiguous { start, len: n },
                Positions::Contiguous {
                    start: start + n,
                    len: t - n,
                },
            ),
            Positions::Explicit(p) => (
                Positions::Explicit(p.clone().slice_dim(2, 0..n)),
                Positions::Explicit(p.slice_dim(2, n..t)),
            ),
            Positions::Ragged(_) => {
                return Err(KvError::InvalidValue {
                    what: "segment split",
                    value: "a ragged (head-wise) segment".into(),
                    allowed: "segments whose heads hold the same tokens",
                });
            }
        };
        Ok((
            Segment {
                positions: p0,
                k: Encoded::Dense(k.clone().slice_dim(2, 0..n)),
                v: Encoded::Dense(v.clone().slice_dim(2, 0..n)),
            },
            Segment {
                positions: p1,
                k: Encoded::Dense(k.slice_dim(2, n..t)),
                v: Encoded::Dense(v.slice_dim(2, n..t)),
            },
        ))
    }

    /// This segment followed by `later` as one dense segment (both sides decoded; positions
    /// stay implicit when the two runs are adjacent). Ragged segments cannot be joined.
    pub fn join(self, later: Segment<B>) -> Result<Segment<B>, KvError> {
        let [b, h, _, _] = self.k.dims();
        let ragged = |s: &Segment<B>| matches!(s.positions, Positions::Ragged(_));
        if ragged(&self) || ragged(&later) {
            return Err(KvError::InvalidValue {
                what: "segment join",
                value: "a ragged (head-wise) segment".into(),
                allowed: "segments whose heads hold the same tokens",
            });
        }
        if later.k.dims()[..2] != [b, h] || later.k.dims()[3] != self.k.dims()[3] {
            return Err(KvError::Shape {
                context: "joined segments",
                expected: self.k.dims().to_vec(),
                got: later.k.dims().to_vec(),
            });
        }
        let positions = match (&self.positions, &later.positions) {
            (
                Positions::Contiguous { start, len },
                Positions::Contiguous {
                    start: next,
                    len: more,
                },
            ) if start + len == *next => Positions::Contiguous {
                start: *start,
                len: len + more,
            },
            (a, c) => {
                let device = self.k.device();
                Positions::Explicit(Tensor::cat(
                    vec![a.to_tensor(b, h, &device), c.to_tensor(b, h, &device)],
                    2,
                ))
            }
        };
        Ok(Segment {
            positions,
            k: Encoded::Dense(Tensor::cat(vec![self.k.decode()?, later.k.decode()?], 2)),
            v: Encoded::Dense(Tensor::cat(vec![self.v.decode()?, later.v.decode()?], 2)),
        })
    }

    /// True when the segment holds no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes, excluding low-rank bases (counted per layer by [`CompressedLayer`]).
    pub fn footprint(&self) -> Footprint {
        let mut f = self.k.footprint() + self.v.footprint();
        f.indices += self.positions.bytes();
        f
    }
}

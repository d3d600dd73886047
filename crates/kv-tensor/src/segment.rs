//! A layer's compressed cache: compressed segments followed by a full-precision residual window.
use crate::encoded::dense_bytes;
use crate::{Bytes, Encoded, Footprint, KvError};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, IntDType, Tensor};

/// Original sequence positions of the tokens a segment holds.
#[derive(Debug, Clone)]
pub enum Positions<B: Backend> {
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

impl<B: Backend> Positions<B> {
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
pub struct Segment<B: Backend> {
    /// Where the tokens came from.
    pub positions: Positions<B>,
    /// Keys `[b, h, t, d]` as stored.
    pub k: Encoded<B>,
    /// Values `[b, h, t, d]` as stored.
    pub v: Encoded<B>,
}

impl<B: Backend> Segment<B> {
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

static DECODE_MEMO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Keeps each layer's decoded segments between attention calls (process-wide; off by default).
///
/// Segments never change once written, so decoding them at every decode step repeats work;
/// with the memo on, a layer decodes its segments once per change. The price is memory: the
/// dense copy lives beside the compressed one, so resident memory no longer shrinks (reported
/// footprints still count only the compressed bytes, which is what a fused dequantize-attention
/// kernel would read). `cargo xtask eval` turns it on because it measures quality, not RSS.
pub fn set_decode_memo(on: bool) {
    DECODE_MEMO.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// One layer's cache: compressed segments (oldest first) and a dense residual window holding
/// the most recent tokens at full precision. New tokens land in the window; the owner decides
/// when to turn the window (or part of it) into a segment.
#[derive(Debug, Clone)]
pub struct CompressedLayer<B: Backend> {
    segments: Vec<Segment<B>>,
    /// Decoded segments (keys, values), kept while [`set_decode_memo`] is on.
    memo: std::sync::OnceLock<(Tensor<B, 4>, Tensor<B, 4>)>,
    window: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    window_start: usize,
    seen: usize,
}

impl<B: Backend> Default for CompressedLayer<B> {
    fn default() -> Self {
        Self {
            segments: Vec::new(),
            memo: std::sync::OnceLock::new(),
            window: None,
            window_start: 0,
            seen: 0,
        }
    }
}

impl<B: Backend> CompressedLayer<B> {
    /// An empty layer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends new tokens `[b, h, t, d]` to the residual window.
    pub fn push(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<(), KvError> {
        if k.dims() != v.dims() {
            return Err(KvError::Shape {
                context: "appended keys vs values",
                expected: k.dims().to_vec(),
                got: v.dims().to_vec(),
            });
        }
        if let Some((wk, _)) = &self.window {
            let [b, h, _, d] = wk.dims();
            let [nb, nh, _, nd] = k.dims();
            if (b, h, d) != (nb, nh, nd) {
                return Err(KvError::Shape {
                    context: "appended keys vs cache",
                    expected: vec![b, h, 0, d],
                    got: k.dims().to_vec(),
                });
            }
        }
        self.seen += k.dims()[2];
        self.window = Some(match self.window.take() {
            None => (k, v),
            Some((wk, wv)) => (Tensor::cat(vec![wk, k], 2), Tensor::cat(vec![wv, v], 2)),
        });
        Ok(())
    }

    /// Takes the oldest `n` tokens of the window out as a dense segment (all of it if `n` is
    /// larger than the window). Returns `None` when the window is empty.
    pub fn take_window(&mut self, n: usize) -> Option<Segment<B>> {
        let (wk, wv) = self.window.take()?;
        let len = wk.dims()[2];
        let n = n.min(len);
        let start = self.window_start;
        if n < len {
            self.window = Some((
                wk.clone().slice_dim(2, n..len),
                wv.clone().slice_dim(2, n..len),
            ));
        }
        self.window_start += n;
        let (k, v) = if n < len {
            (wk.slice_dim(2, 0..n), wv.slice_dim(2, 0..n))
        } else {
            (wk, wv)
        };
        Some(Segment {
            positions: Positions::Contiguous { start, len: n },
            k: Encoded::Dense(k),
            v: Encoded::Dense(v),
        })
    }

    /// Takes the oldest tokens of the window in whole multiples of `group`, leaving at least
    /// `residual` tokens in it (the flush rule of residual-window quantization); `None` when
    /// fewer than `residual + group` tokens wait.
    pub fn take_overflow(&mut self, residual: usize, group: usize) -> Option<Segment<B>> {
        let ready = self.window_len().saturating_sub(residual) / group.max(1) * group.max(1);
        if ready == 0 {
            None
        } else {
            self.take_window(ready)
        }
    }

    /// Appends a compressed segment after the existing ones. The caller keeps order: segments
    /// hold tokens older than the window.
    pub fn push_segment(&mut self, s: Segment<B>) {
        self.segments.push(s);
        self.memo = std::sync::OnceLock::new();
    }

    /// The compressed segments.
    pub fn segments(&self) -> &[Segment<B>] {
        &self.segments
    }

    /// Tokens in the residual window.
    pub fn window_len(&self) -> usize {
        self.window.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Tokens appended so far (the logical sequence length).
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Tokens actually held (per head).
    pub fn stored(&self) -> usize {
        self.segments.iter().map(Segment::len).sum::<usize>() + self.window_len()
    }

    /// Decodes everything into dense `[b, h, stored, d]` keys and values, oldest first.
    pub fn decode(&self) -> Result<(Tensor<B, 4>, Tensor<B, 4>), KvError> {
        let mut ks = Vec::with_capacity(self.segments.len() + 1);
        let mut vs = Vec::with_capacity(self.segments.len() + 1);
        if !self.segments.is_empty() {
            let (k, v) = if DECODE_MEMO.load(std::sync::atomic::Ordering::Relaxed) {
                match self.memo.get() {
                    Some(kv) => kv.clone(),
                    None => {
                        let kv = self.decode_segments()?;
                        self.memo.get_or_init(|| kv).clone()
                    }
                }
            } else {
                self.decode_segments()?
            };
            ks.push(k);
            vs.push(v);
        }
        if let Some((k, v)) = &self.window {
            ks.push(k.clone());
            vs.push(v.clone());
        }
        if ks.is_empty() {
            return Err(KvError::Empty);
        }
        if ks.len() == 1 {
            return Ok((ks.remove(0), vs.remove(0)));
        }
        Ok((Tensor::cat(ks, 2), Tensor::cat(vs, 2)))
    }

    fn decode_segments(&self) -> Result<(Tensor<B, 4>, Tensor<B, 4>), KvError> {
        let mut ks = Vec::with_capacity(self.segments.len());
        let mut vs = Vec::with_capacity(self.segments.len());
        for s in &self.segments {
            ks.push(s.k.decode()?);
            vs.push(s.v.decode()?);
        }
        if ks.len() == 1 {
            return Ok((ks.remove(0), vs.remove(0)));
        }
        Ok((Tensor::cat(ks, 2), Tensor::cat(vs, 2)))
    }

    /// Which decoded rows are padding (see [`Segment::padding`]): `[b, h, stored]`, `None` when
    /// no segment is ragged.
    pub fn padding(&self) -> Option<Tensor<B, 3, Bool>> {
        if self.segments.iter().all(|s| s.padding().is_none()) {
            return None;
        }
        let mut parts = Vec::with_capacity(self.segments.len() + 1);
        for s in &self.segments {
            parts.push(s.padding().unwrap_or_else(|| {
                let [b, h, t, _] = s.k.dims();
                Tensor::<B, 3, Int>::zeros([b, h, t], &s.k.device()).equal_elem(1)
            }));
        }
        if let Some((k, _)) = &self.window {
            let [b, h, t, _] = k.dims();
            parts.push(Tensor::<B, 3, Int>::zeros([b, h, t], &k.device()).equal_elem(1));
        }
        Some(Tensor::cat(parts, 2))
    }

    /// Replaces everything held (segments and window) by one segment: used when a decoding
    /// cache re-compresses its whole history.
    pub fn replace_all(&mut self, segment: Segment<B>) {
        self.segments = vec![segment];
        self.memo = std::sync::OnceLock::new();
        self.window = None;
        self.window_start = self.seen;
    }

    /// The positions of every stored token `[b, h, stored]`, oldest first (ragged heads padded
    /// with `-1`).
    pub fn positions(&self) -> Option<Tensor<B, 3, Int>> {
        let mut parts = Vec::with_capacity(self.segments.len() + 1);
        let mut device = None;
        for s in &self.segments {
            let [b, h, _, _] = s.k.dims();
            let dev = s.k.device();
            parts.push(s.positions.to_tensor(b, h, &dev));
            device = Some(dev);
        }
        if let Some((k, _)) = &self.window {
            let [b, h, t, _] = k.dims();
            let dev = device.unwrap_or_else(|| k.device());
            parts.push(
                Positions::<B>::Contiguous {
                    start: self.window_start,
                    len: t,
                }
                .to_tensor(b, h, &dev),
            );
        }
        if parts.is_empty() {
            return None;
        }
        Some(Tensor::cat(parts, 2))
    }

    /// Exact bytes: segments, the window, and each side's low-rank basis once.
    pub fn footprint(&self) -> Footprint {
        let mut f: Footprint = self.segments.iter().map(Segment::footprint).sum();
        if let Some((k, v)) = &self.window {
            f.dense += dense_bytes(k) + dense_bytes(v);
        }
        let k_basis = self.segments.iter().find_map(|s| s.k.basis());
        let v_basis = self.segments.iter().find_map(|s| s.v.basis());
        for b in [k_basis, v_basis].into_iter().flatten() {
            f.basis += dense_bytes(b);
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tensor};
    type B = burn_ndarray::NdArray<f32>;

    /// The decode memo returns what decoding returns, and a new segment invalidates it.
    #[test]
    fn decode_memo_matches_and_invalidates() {
        let dev = Default::default();
        let kv = |t: usize| Tensor::<B, 4>::random([1, 2, t, 4], Distribution::Default, &dev);
        let mut layer = CompressedLayer::<B>::new();
        layer.push(kv(6), kv(6)).expect("push");
        let seg = layer.take_window(4).expect("segment").into_half();
        layer.push_segment(seg);
        let plain = layer.decode().expect("decode");
        set_decode_memo(true);
        let first = layer.decode().expect("decode");
        let again = layer.decode().expect("decode");
        let seg = layer.take_window(2).expect("segment");
        layer.push_segment(seg);
        layer.push(kv(1), kv(1)).expect("push");
        let after = layer.decode().expect("decode");
        set_decode_memo(false);
        let after_plain = layer.decode().expect("decode");
        for (a, b) in [(&plain, &first), (&plain, &again), (&after_plain, &after)] {
            a.0.clone()
                .into_data()
                .assert_eq(&b.0.clone().into_data(), true);
            a.1.clone()
                .into_data()
                .assert_eq(&b.1.clone().into_data(), true);
        }
        assert_eq!(after.0.dims(), [1, 2, 7, 4]);
    }
}

//! A layer's cache as stored: compressed segments followed by a dense residual window, and the
//! attention that reads them where they are.
use crate::KvBackend;
use crate::attention::attention_inner;
use crate::encoded::dense_bytes;
use crate::host::{HostWindow, host_backend, is_host};
use crate::host_attention::{Part, side_view};
use crate::host_segment::{HostSegment, floats};
use crate::partial_attention::{TensorPart, attend_parts};
use crate::{Bytes, DensePrecision, Encoded, Footprint, KvError, Positions, Reduce, Segment};
use burn::tensor::{Bool, Int, IntDType, Tensor, TensorData};
use std::sync::Arc;

/// A stored segment: as burn tensors (device backends), or moved to host memory in the form the
/// host kernels read (host backends; see [`HostSegment`]).
#[derive(Debug, Clone)]
enum Stored<B: KvBackend> {
    Tensors(Segment<B>),
    Host(Arc<HostSegment>),
}

impl<B: KvBackend> Stored<B> {
    fn len(&self) -> usize {
        match self {
            Stored::Tensors(s) => s.len(),
            Stored::Host(s) => s.len(),
        }
    }

    fn footprint(&self) -> Footprint {
        match self {
            Stored::Tensors(s) => s.footprint(),
            Stored::Host(s) => s.footprint(),
        }
    }

    /// Keys and values decoded to `[b, h, t, d]` and each head's real rows.
    fn decoded(&self, device: &B::Device) -> Result<TensorPart<B>, KvError> {
        match self {
            Stored::Tensors(s) => {
                let [b, h, t, _] = s.k.dims();
                let rows = match &s.positions {
                    Positions::Ragged(parts) => parts.iter().map(|p| p.dims()[2]).collect(),
                    _ => vec![t; b * h],
                };
                Ok(TensorPart {
                    k: s.k.decode()?,
                    v: s.v.decode()?,
                    rows,
                })
            }
            Stored::Host(s) => {
                let (k, v) = s.decode();
                let tensor = |x| Tensor::from_data(TensorData::new(x, s.dims), device);
                Ok(TensorPart {
                    k: tensor(k),
                    v: tensor(v),
                    rows: s.rows.clone(),
                })
            }
        }
    }
}

/// The residual window: nothing yet, burn tensors, or a host store.
#[derive(Debug, Clone)]
enum Window<B: KvBackend> {
    Empty,
    Tensors(Tensor<B, 4>, Tensor<B, 4>),
    Host(HostWindow, B::Device),
}

/// One layer's cache: compressed segments (oldest first) and a dense residual window holding
/// the most recent tokens. New tokens land in the window; the owner decides when to turn the
/// window (or part of it) into a segment.
///
/// On host backends (burn-ndarray) the window is a [`HostWindow`] at [`DensePrecision`] (fp16
/// unless asked otherwise) and every pushed segment moves to host memory once; few-query
/// attention then reads the stored form directly ([`host_attention`](crate::host_attention)).
/// Elsewhere segments stay burn tensors and attention decodes one part at a time. Either way the
/// layer is never held dense as a whole: [`CompressedLayer::decode`] builds a dense copy only for
/// callers that ask for one.
#[derive(Debug, Clone)]
pub struct CompressedLayer<B: KvBackend> {
    segments: Vec<Stored<B>>,
    window: Window<B>,
    window_start: usize,
    seen: usize,
    precision: DensePrecision,
    /// The layer's low-rank bases (keys, values) on the host, shared by its segments.
    bases: [Option<Arc<Vec<f32>>>; 2],
    /// Where the layer's tensors live (known once anything was stored).
    device: Option<B::Device>,
}

impl<B: KvBackend> Default for CompressedLayer<B> {
    fn default() -> Self {
        Self::with_precision(DensePrecision::default())
    }
}

impl<B: KvBackend> CompressedLayer<B> {
    /// An empty layer whose host window stores fp16.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty layer whose host window stores `precision` (device backends keep their float).
    pub fn with_precision(precision: DensePrecision) -> Self {
        Self {
            segments: Vec::new(),
            window: Window::Empty,
            window_start: 0,
            seen: 0,
            precision,
            bases: [None, None],
            device: None,
        }
    }

    /// `[b, h, d]` of what is stored, if anything was.
    fn dims(&self) -> Option<[usize; 3]> {
        match &self.window {
            Window::Tensors(k, _) => {
                let [b, h, _, d] = k.dims();
                return Some([b, h, d]);
            }
            Window::Host(w, _) => return Some(w.dims()),
            Window::Empty => {}
        }
        self.segments.first().map(|s| match s {
            Stored::Tensors(s) => {
                let [b, h, _, d] = s.k.dims();
                [b, h, d]
            }
            Stored::Host(s) => [s.dims[0], s.dims[1], s.dims[3]],
        })
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
        let [nb, nh, t, nd] = k.dims();
        if let Some([b, h, d]) = self.dims()
            && (b, h, d) != (nb, nh, nd)
        {
            return Err(KvError::Shape {
                context: "appended keys vs cache",
                expected: vec![b, h, t, d],
                got: k.dims().to_vec(),
            });
        }
        self.device.get_or_insert_with(|| k.device());
        if matches!(self.window, Window::Empty) && is_host(&k) {
            self.window = Window::Host(HostWindow::new(nb, nh, nd, self.precision), k.device());
        }
        self.window = match std::mem::replace(&mut self.window, Window::Empty) {
            Window::Host(mut w, device) => {
                w.append(&floats(k)?, &floats(v)?, t);
                Window::Host(w, device)
            }
            Window::Empty => Window::Tensors(k, v),
            Window::Tensors(wk, wv) => {
                Window::Tensors(Tensor::cat(vec![wk, k], 2), Tensor::cat(vec![wv, v], 2))
            }
        };
        self.seen += t;
        Ok(())
    }

    /// Takes the oldest `n` tokens of the window out as a dense segment of f32 tensors (all of
    /// it if `n` is larger than the window). Returns `None` when the window is empty.
    pub fn take_window(&mut self, n: usize) -> Option<Segment<B>> {
        let len = self.window_len();
        if len == 0 {
            return None;
        }
        let n = n.min(len);
        let start = self.window_start;
        self.window_start += n;
        let (k, v) = match &mut self.window {
            Window::Empty => return None,
            Window::Host(w, device) => {
                let [b, h, d] = w.dims();
                let (k, v) = w.take_front(n);
                let tensor = |x| Tensor::from_data(TensorData::new(x, [b, h, n, d]), &*device);
                (tensor(k), tensor(v))
            }
            Window::Tensors(wk, wv) => {
                let out = (wk.clone().slice_dim(2, 0..n), wv.clone().slice_dim(2, 0..n));
                if n < len {
                    *wk = wk.clone().slice_dim(2, n..len);
                    *wv = wv.clone().slice_dim(2, n..len);
                } else {
                    self.window = Window::Empty;
                }
                out
            }
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
    /// hold tokens older than the window. On host backends the segment moves to host memory
    /// (its tensors are dropped).
    pub fn push_segment(&mut self, s: Segment<B>) -> Result<(), KvError> {
        self.device.get_or_insert_with(|| s.k.device());
        let stored = if host_backend::<B>(&s.k.device()) {
            Stored::Host(Arc::new(HostSegment::from_segment(&s, &mut self.bases)?))
        } else {
            Stored::Tensors(s)
        };
        self.segments.push(stored);
        Ok(())
    }

    /// Removes the newest segment and returns it as dense f32 tensors (for an owner that
    /// compresses it again together with newer tokens). `None` without segments.
    pub fn pop_segment(&mut self) -> Option<Result<Segment<B>, KvError>> {
        let device = self.device()?;
        Some(match self.segments.pop()? {
            Stored::Tensors(s) => Ok(s),
            Stored::Host(s) => s.to_dense(&device),
        })
    }

    /// Tokens per head of each segment, oldest first.
    pub fn segment_lens(&self) -> Vec<usize> {
        self.segments.iter().map(Stored::len).collect()
    }

    /// Tokens in the residual window.
    pub fn window_len(&self) -> usize {
        match &self.window {
            Window::Empty => 0,
            Window::Tensors(k, _) => k.dims()[2],
            Window::Host(w, _) => w.len(),
        }
    }

    /// Tokens appended so far (the logical sequence length).
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Tokens actually held (per head; ragged segments count their longest head).
    pub fn stored(&self) -> usize {
        self.segments.iter().map(Stored::len).sum::<usize>() + self.window_len()
    }

    fn device(&self) -> Option<B::Device> {
        self.device.clone()
    }

    /// The window as a decoded part.
    fn window_part(&self) -> Option<TensorPart<B>> {
        let (k, v) = match &self.window {
            Window::Empty => return None,
            Window::Tensors(k, v) => (k.clone(), v.clone()),
            Window::Host(w, device) => {
                let [b, h, d] = w.dims();
                let (k, v) = w.to_vecs();
                let shape = [b, h, w.len(), d];
                (
                    Tensor::from_data(TensorData::new(k, shape), device),
                    Tensor::from_data(TensorData::new(v, shape), device),
                )
            }
        };
        let [b, h, n, _] = k.dims();
        Some(TensorPart {
            k,
            v,
            rows: vec![n; b * h],
        })
    }

    /// Decodes everything into dense `[b, h, stored, d]` keys and values, oldest first
    /// (ragged heads padded with zero rows; see [`CompressedLayer::padding`]). A copy made for
    /// the caller: attention never needs it.
    pub fn decode(&self) -> Result<(Tensor<B, 4>, Tensor<B, 4>), KvError> {
        let device = self.device().ok_or(KvError::Empty)?;
        let mut ks = Vec::with_capacity(self.segments.len() + 1);
        let mut vs = Vec::with_capacity(self.segments.len() + 1);
        for s in &self.segments {
            let p = s.decoded(&device)?;
            ks.push(p.k);
            vs.push(p.v);
        }
        if let Some(p) = self.window_part() {
            ks.push(p.k);
            vs.push(p.v);
        }
        if ks.is_empty() {
            return Err(KvError::Empty);
        }
        Ok((Tensor::cat(ks, 2), Tensor::cat(vs, 2)))
    }

    /// Which decoded rows are padding (see [`Segment::padding`]): `[b, h, stored]`, `None` when
    /// no segment is ragged.
    pub fn padding(&self) -> Option<Tensor<B, 3, Bool>> {
        let [b, h, _] = self.dims()?;
        let device = self.device()?;
        let ragged = |s: &Stored<B>| match s {
            Stored::Tensors(s) => matches!(s.positions, Positions::Ragged(_)),
            Stored::Host(s) => s.rows.iter().any(|&r| r != s.len()),
        };
        if !self.segments.iter().any(ragged) {
            return None;
        }
        let mut mask = Vec::with_capacity(b * h * self.stored());
        let parts: Vec<(Vec<usize>, usize)> = self
            .segments
            .iter()
            .map(|s| match s {
                Stored::Tensors(t) => (
                    match &t.positions {
                        Positions::Ragged(p) => p.iter().map(|p| p.dims()[2]).collect(),
                        _ => vec![t.len(); b * h],
                    },
                    t.len(),
                ),
                Stored::Host(s) => (s.rows.clone(), s.len()),
            })
            .chain(std::iter::once((
                vec![self.window_len(); b * h],
                self.window_len(),
            )))
            .collect();
        for bh in 0..b * h {
            for (rows, n) in &parts {
                mask.extend((0..*n).map(|j| j >= rows[bh]));
            }
        }
        Some(Tensor::from_data(
            TensorData::new(mask, [b, h, self.stored()]),
            &device,
        ))
    }

    /// Replaces everything held (segments and window) by one segment: used when a decoding
    /// cache re-compresses its whole history.
    pub fn replace_all(&mut self, segment: Segment<B>) -> Result<(), KvError> {
        self.segments.clear();
        self.window = match &self.window {
            Window::Host(w, d) => {
                let [b, h, dim] = w.dims();
                Window::Host(HostWindow::new(b, h, dim, self.precision), d.clone())
            }
            _ => Window::Empty,
        };
        self.window_start = self.seen;
        self.push_segment(segment)
    }

    /// The positions of every stored token `[b, h, stored]`, oldest first (ragged heads padded
    /// with `-1`).
    pub fn positions(&self) -> Option<Tensor<B, 3, Int>> {
        let [b, h, _] = self.dims()?;
        let device = self.device()?;
        let mut parts = Vec::with_capacity(self.segments.len() + 1);
        for s in &self.segments {
            parts.push(match s {
                Stored::Tensors(s) => s.positions.to_tensor(b, h, &device),
                Stored::Host(s) => Tensor::<B, 3, Int>::from_data(
                    TensorData::new(s.positions(), [b, h, s.len()]),
                    &device,
                )
                .cast(IntDType::I32),
            });
        }
        if self.window_len() > 0 {
            parts.push(
                Positions::<B>::Contiguous {
                    start: self.window_start,
                    len: self.window_len(),
                }
                .to_tensor(b, h, &device),
            );
        }
        if parts.is_empty() {
            return None;
        }
        Some(Tensor::cat(parts, 2))
    }

    /// Exact bytes: segments, the window, and each side's low-rank basis once.
    pub fn footprint(&self) -> Footprint {
        let mut f: Footprint = self.segments.iter().map(Stored::footprint).sum();
        f.dense += match &self.window {
            Window::Empty => Bytes(0),
            Window::Tensors(k, v) => dense_bytes(k) + dense_bytes(v),
            Window::Host(w, _) => Bytes(w.bytes() as u64),
        };
        for side in 0..2 {
            f.basis += self.basis_bytes(side);
        }
        f
    }

    /// Bytes of one side's basis, counted once when any segment projects that side.
    fn basis_bytes(&self, side: usize) -> Bytes {
        self.segments
            .iter()
            .find_map(|s| match s {
                Stored::Tensors(s) => [&s.k, &s.v][side].basis().map(|b| b.bytes()),
                Stored::Host(s) => [&s.k, &s.v][side].basis_bytes(),
            })
            .unwrap_or(Bytes(0))
    }

    /// Bytes the layer really holds in memory: like [`CompressedLayer::footprint`], but host
    /// vectors counted by capacity (a growing window keeps some spare room), and each distinct
    /// basis once.
    pub fn resident(&self) -> Bytes {
        let mut n: u64 = self
            .segments
            .iter()
            .map(|s| match s {
                Stored::Tensors(s) => s.footprint().total().get(),
                Stored::Host(s) => s.resident() as u64,
            })
            .sum();
        n += match &self.window {
            Window::Empty => 0,
            Window::Tensors(k, v) => (dense_bytes(k) + dense_bytes(v)).get(),
            Window::Host(w, _) => w.resident() as u64,
        };
        Bytes(n + (0..2).map(|s| self.basis_bytes(s).get()).sum::<u64>())
    }

    /// Attention of the newest `tq` tokens' queries over everything held (see
    /// [`attention`](crate::attention) for the causal convention), without decoding the layer:
    /// on host backends the host kernels read the stored form (decode steps and prefill chunks);
    /// otherwise each part is decoded on its own and merged by an online softmax.
    ///
    /// # Shapes
    /// `q`: `[b, q_heads, tq, d]` → `[b, q_heads, tq, d]`
    pub fn attend(&self, q: Tensor<B, 4>) -> Result<Tensor<B, 4>, KvError> {
        let lens = self.check_queries(&q)?;
        if self.host_parts() && is_host(&q) {
            return Ok(self.attend_host(q, &lens, None)?.0);
        }
        Ok(self.attend_tensors(q, &lens, None)?.0)
    }

    /// Whether every part is held for the host kernels.
    fn host_parts(&self) -> bool {
        matches!(self.window, Window::Host(..) | Window::Empty)
            && self.segments.iter().all(|s| matches!(s, Stored::Host(_)))
    }

    /// [`attend`](Self::attend) that also returns the attention mass every stored row received
    /// (`[b, h, stored]`, summed over queries and grouped heads; padding rows 0).
    pub fn attend_with_mass(
        &self,
        q: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
        self.attend_reduced(q, Reduce::Sum)
    }

    /// [`attend`](Self::attend) that also returns the largest attention weight every stored row
    /// received from any query and grouped head (`[b, h, stored]`, padding rows 0): KVzip's
    /// reconstruction statistic, read on the host kernels like the mass.
    pub fn attend_with_peak(
        &self,
        q: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
        self.attend_reduced(q, Reduce::Max)
    }

    fn attend_reduced(
        &self,
        q: Tensor<B, 4>,
        reduce: Reduce,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 3>), KvError> {
        let lens = self.check_queries(&q)?;
        let (out, stat) = if self.host_parts() && is_host(&q) {
            self.attend_host(q, &lens, Some(reduce))?
        } else {
            self.attend_tensors(q, &lens, Some(reduce))?
        };
        Ok((out, stat.ok_or(KvError::Empty)?))
    }

    /// Validates `q` against what is stored; returns every head's total rows.
    fn check_queries(&self, q: &Tensor<B, 4>) -> Result<Vec<usize>, KvError> {
        let [b, qh, tq, d] = q.dims();
        let [sb, h, sd] = self.dims().ok_or(KvError::Empty)?;
        if (b, d) != (sb, sd) || qh % h != 0 {
            return Err(KvError::Shape {
                context: "attention queries vs cache",
                expected: vec![sb, h, tq, sd],
                got: q.dims().to_vec(),
            });
        }
        let mut lens = vec![self.window_len(); b * h];
        for s in &self.segments {
            match s {
                Stored::Host(s) => lens.iter_mut().zip(&s.rows).for_each(|(l, r)| *l += r),
                Stored::Tensors(s) => match &s.positions {
                    Positions::Ragged(p) => {
                        for (l, p) in lens.iter_mut().zip(p.iter().cycle()) {
                            *l += p.dims()[2];
                        }
                    }
                    _ => lens.iter_mut().for_each(|l| *l += s.len()),
                },
            }
        }
        let shortest = lens.iter().copied().min().unwrap_or(0);
        if tq == 0 || shortest == 0 {
            return Err(KvError::Empty);
        }
        if tq > shortest {
            return Err(KvError::QueriesExceedCache {
                queries: tq,
                cached: shortest,
            });
        }
        Ok(lens)
    }

    /// The host kernels over every part; with a reduction, also the mass or peak every stored
    /// row received, in the tensor path's columns (each part as wide as its longest head).
    fn attend_host(
        &self,
        q: Tensor<B, 4>,
        lens: &[usize],
        reduce: Option<Reduce>,
    ) -> Result<(Tensor<B, 4>, Option<Tensor<B, 3>>), KvError> {
        let dims = q.dims();
        let [b, _, tq, d] = dims;
        let h = lens.len() / b;
        let device = q.device();
        let mut columns = vec![0usize];
        for s in &self.segments {
            if let Stored::Host(s) = s {
                let width = s.rows.iter().copied().max().unwrap_or(0);
                columns.push(columns[columns.len() - 1] + width);
            }
        }
        columns.push(columns[columns.len() - 1] + self.window_len());
        let heads: Vec<Vec<Part<'_>>> = (0..b * h)
            .map(|bh| {
                let mut offset = 0;
                let mut parts = Vec::with_capacity(self.segments.len() + 1);
                let host = self.segments.iter().filter_map(|s| match s {
                    Stored::Host(s) => Some(s),
                    Stored::Tensors(_) => None,
                });
                for (s, &column) in host.zip(&columns) {
                    let n = s.rows[bh];
                    parts.push(Part {
                        k: side_view(&s.k, bh, n, h, d),
                        v: side_view(&s.v, bh, n, h, d),
                        offset,
                        column,
                    });
                    offset += n;
                }
                if let Window::Host(w, _) = &self.window {
                    parts.push(w.part(bh, offset, columns[columns.len() - 2]));
                }
                parts
            })
            .collect();
        let cols = reduce.map(|r| (columns.as_slice(), r));
        let (out, mass) = crate::host_attention::attend(&floats(q)?, tq, d, &heads, lens, cols);
        let total = columns[columns.len() - 1];
        let mass = mass.map(|m| Tensor::from_data(TensorData::new(m, [b, h, total]), &device));
        Ok((Tensor::from_data(TensorData::new(out, dims), &device), mass))
    }

    /// The part-by-part tensor path, whatever the backend (tests compare both paths).
    #[cfg(test)]
    pub(crate) fn attend_parts_for_test(
        &self,
        q: Tensor<B, 4>,
        reduce: Option<Reduce>,
    ) -> Result<(Tensor<B, 4>, Option<Tensor<B, 3>>), KvError> {
        let lens = self.check_queries(&q)?;
        self.attend_tensors(q, &lens, reduce)
    }

    fn attend_tensors(
        &self,
        q: Tensor<B, 4>,
        lens: &[usize],
        reduce: Option<Reduce>,
    ) -> Result<(Tensor<B, 4>, Option<Tensor<B, 3>>), KvError> {
        if self.segments.is_empty() {
            // The window alone (a full cache, a prefill): one dense attention, whose causal
            // mask touches only the trailing block.
            let p = self.window_part().ok_or(KvError::Empty)?;
            return attention_inner(q, p.k, p.v, None, reduce);
        }
        let device = q.device();
        let h = lens.len() / q.dims()[0];
        let n = self.segments.len();
        let window = self.window_len() > 0;
        let part = |i: usize| -> Result<TensorPart<B>, KvError> {
            if i < n {
                self.segments[i].decoded(&device)
            } else {
                self.window_part().ok_or(KvError::Empty)
            }
        };
        attend_parts(q, h, lens, n + usize::from(window), &part, reduce)
    }
}

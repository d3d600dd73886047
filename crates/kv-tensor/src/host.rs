//! Dense K/V rows in host memory (the full cache's tokens, a compressed layer's residual
//! window) and the small vector helpers every host kernel shares.
//!
//! Why a host store exists: burn-ndarray 0.21 copies a tensor on every `reshape` and `slice`,
//! and `cat` re-allocates the whole cache, so a decode step at 2048 tokens copied each layer's
//! keys and values about ten times before its two tiny matmuls ran. Here new tokens are appended
//! in place (amortised growth, copy-on-write between forks) and the attention kernels
//! ([`host_attention`](crate::host_attention)) read each row once, for decode steps and
//! prefill chunks alike.
use crate::KvBackend;
use crate::host_attention::{Part, Rows, SideView};
use crate::host_segment::{f16_to_f32, f32_to_f16};
use burn::tensor::{DType, Tensor};
use std::sync::Arc;

/// True when tensors of this backend live in host memory as f32 ([`KvBackend::host_memory`]),
/// where copying them out costs one read; GPU backends keep the tensor path.
pub(crate) fn is_host<B: KvBackend, const D: usize>(t: &Tensor<B, D>) -> bool {
    t.dtype() == DType::F32 && host_backend::<B>(&t.device())
}

/// The values of `t` as a host vector where its backend keeps f32 tensors in host memory
/// ([`is_host`]); otherwise `t` back, for the tensor-op path.
///
/// burn-ndarray copies a shared array (a clone) out element by element through a
/// dynamic-rank iterator, about 20 ns a value; multiplying by one first makes an unshared
/// copy in one vectorised pass, which `into_data` then hands over. (The decode path's
/// [`floats`](crate::host_segment::floats) skips this: its small tensors are unshared.)
pub fn host_copy<B: KvBackend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>, Tensor<B, D>> {
    if !is_host(&t) {
        return Err(t);
    }
    t.clone()
        .mul_scalar(1.0)
        .into_data()
        .into_vec::<f32>()
        .map_err(|_| t)
}

/// True when this backend keeps f32 tensors in host memory (see [`is_host`]), judged from the
/// backend alone (for segments whose tensors are integer codes).
pub(crate) fn host_backend<B: KvBackend>(device: &B::Device) -> bool {
    use burn::tensor::Element;
    <B::FloatElem as Element>::dtype() == DType::F32 && B::host_memory(device)
}

/// How dense rows are stored: the ratio's reference and llama.cpp's default are fp16, so that
/// is the default; f32 is an opt-in for exact comparisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DensePrecision {
    /// binary16, two bytes per value (rounded to nearest even).
    #[default]
    F16,
    /// f32, four bytes per value.
    F32,
}

/// Every head's rows of one side, each head a row-major `[tokens][d]` vector that grows.
#[derive(Debug, Clone)]
enum HeadRows {
    F32(Vec<Vec<f32>>),
    F16(Vec<Vec<u16>>),
}

impl HeadRows {
    fn new(heads: usize, p: DensePrecision) -> Self {
        match p {
            DensePrecision::F32 => HeadRows::F32(vec![Vec::new(); heads]),
            DensePrecision::F16 => HeadRows::F16(vec![Vec::new(); heads]),
        }
    }

    fn append(&mut self, src: &[f32], row: usize) {
        match self {
            HeadRows::F32(hs) => {
                for (dst, s) in hs.iter_mut().zip(src.chunks_exact(row)) {
                    dst.extend_from_slice(s);
                }
            }
            HeadRows::F16(hs) => {
                for (dst, s) in hs.iter_mut().zip(src.chunks_exact(row)) {
                    dst.extend(s.iter().map(|&x| f32_to_f16(x)));
                }
            }
        }
    }

    /// Removes the first `n` elements of every head, returned as f32 `[heads][n]`. A head left
    /// with less than half of its capacity gives the rest back: a prompt prefilled whole and then
    /// compressed would otherwise keep the whole prompt's allocation behind a short window.
    fn take_front(&mut self, n: usize) -> Vec<f32> {
        fn trim<T>(h: &mut Vec<T>) {
            if h.capacity() > 2 * h.len() {
                h.shrink_to(h.len() + h.len() / 2);
            }
        }
        let mut out = Vec::new();
        match self {
            HeadRows::F32(hs) => {
                for h in hs {
                    out.extend(h.drain(..n));
                    trim(h);
                }
            }
            HeadRows::F16(hs) => {
                for h in hs {
                    out.extend(h.drain(..n).map(f16_to_f32));
                    trim(h);
                }
            }
        }
        out
    }

    fn to_vec(&self) -> Vec<f32> {
        match self {
            HeadRows::F32(hs) => hs.concat(),
            HeadRows::F16(hs) => hs.iter().flatten().map(|&x| f16_to_f32(x)).collect(),
        }
    }

    fn view(&self, head: usize) -> Rows<'_> {
        match self {
            HeadRows::F32(hs) => Rows::F32(&hs[head]),
            HeadRows::F16(hs) => Rows::F16(&hs[head]),
        }
    }

    fn element_bytes(&self) -> usize {
        match self {
            HeadRows::F32(_) => 4,
            HeadRows::F16(_) => 2,
        }
    }

    fn resident(&self) -> usize {
        match self {
            HeadRows::F32(hs) => hs.iter().map(|h| h.capacity() * 4).sum(),
            HeadRows::F16(hs) => hs.iter().map(|h| h.capacity() * 2).sum(),
        }
    }
}

/// The dense rows of a layer held in host memory (a full cache's tokens, a compressed layer's
/// residual window): keys and values of `b × h` heads appended in place (amortised growth,
/// copy-on-write between forks), at [`DensePrecision`].
#[derive(Debug, Clone)]
pub(crate) struct HostWindow {
    k: Arc<HeadRows>,
    v: Arc<HeadRows>,
    b: usize,
    h: usize,
    d: usize,
    len: usize,
}

impl HostWindow {
    /// An empty store for `[b, h, ·, d]` tensors.
    pub(crate) fn new(b: usize, h: usize, d: usize, p: DensePrecision) -> Self {
        Self {
            k: Arc::new(HeadRows::new(b * h, p)),
            v: Arc::new(HeadRows::new(b * h, p)),
            b,
            h,
            d,
            len: 0,
        }
    }

    /// `[b, h, d]` of every head.
    pub(crate) fn dims(&self) -> [usize; 3] {
        [self.b, self.h, self.d]
    }

    /// Tokens held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes held (keys and values, at the stored width).
    pub(crate) fn bytes(&self) -> usize {
        2 * self.b * self.h * self.len * self.d * self.k.element_bytes()
    }

    /// Bytes allocated, capacities included.
    pub(crate) fn resident(&self) -> usize {
        self.k.resident() + self.v.resident()
    }

    /// Appends `t` tokens given as contiguous `[b, h, t, d]` keys and values.
    pub(crate) fn append(&mut self, k: &[f32], v: &[f32], t: usize) {
        let row = t * self.d;
        debug_assert_eq!(k.len(), self.b * self.h * row);
        debug_assert_eq!(v.len(), k.len());
        Arc::make_mut(&mut self.k).append(k, row);
        Arc::make_mut(&mut self.v).append(v, row);
        self.len += t;
    }

    /// Removes the oldest `n` tokens (at most all), returned as f32 `[b, h, n, d]` keys and
    /// values.
    pub(crate) fn take_front(&mut self, n: usize) -> (Vec<f32>, Vec<f32>) {
        let n = n.min(self.len);
        self.len -= n;
        (
            Arc::make_mut(&mut self.k).take_front(n * self.d),
            Arc::make_mut(&mut self.v).take_front(n * self.d),
        )
    }

    /// Keys and values as contiguous f32 `[b, h, len, d]` vectors.
    pub(crate) fn to_vecs(&self) -> (Vec<f32>, Vec<f32>) {
        (self.k.to_vec(), self.v.to_vec())
    }

    /// Head `bh`'s keys and values for the attention kernels (`offset`: its first row's index
    /// in the head's sequence; `column`: its first row's attention-mass column).
    pub(crate) fn part<'a>(&'a self, bh: usize, offset: usize, column: usize) -> Part<'a> {
        let side = |rows: Rows<'a>| SideView {
            rows,
            n: self.len,
            w: self.d,
            basis: None,
            d: self.d,
        };
        Part {
            k: side(self.k.view(bh)),
            v: side(self.v.view(bh)),
            offset,
            column,
        }
    }
}

/// Software prefetch for the host kernels' streams. The hardware prefetcher of the machines
/// measured here ramps up slowly on each new stream (a 4 KiB page at a time), so a kernel that
/// does real work per byte (dequantising, or three dot products per key row) waits on memory;
/// asking for the data ~2 KiB ahead made the Q4_1 kernel 2.2× faster on a 100 MB matrix. A
/// prefetch never faults, so this is safe for any address; off x86-64 it does nothing.
#[derive(Debug, Clone, Copy)]
pub struct Prefetch {
    #[cfg(target_arch = "x86_64")]
    sse: Option<pulp::x86::V1>,
}

impl Prefetch {
    /// Detects the instruction (every x86-64 CPU has it) once, for a kernel's inner loops.
    #[inline]
    pub fn new() -> Self {
        Self {
            #[cfg(target_arch = "x86_64")]
            sse: pulp::x86::V1::try_new(),
        }
    }

    /// Asks for the cache line holding `slice[at]` (which may lie past the end: nothing is read).
    #[inline(always)]
    pub fn line<T>(self, slice: &[T], at: usize) {
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = self.sse {
            simd.sse
                ._mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                    slice.as_ptr().wrapping_add(at).cast(),
                );
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (slice, at);
    }
}

impl Default for Prefetch {
    fn default() -> Self {
        Self::new()
    }
}

/// Dot product with 16 explicit accumulator lanes, so the compiler vectorises it without
/// reassociating floats. Shared by the host kernels (this attention, `models`' matrix–vector
/// product); `#[inline(always)]` so it is compiled inside each caller's SIMD dispatch.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(p, q)| p * q)
        .sum();
    for (p, q) in ca.zip(cb) {
        for i in 0..L {
            acc[i] += p[i] * q[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `o += a · x`.
#[inline(always)]
pub(crate) fn axpy(o: &mut [f32], a: f32, x: &[f32]) {
    for (o, x) in o.iter_mut().zip(x) {
        *o += a * x;
    }
}

#[cfg(test)]
mod tests {
    use crate::{FullCache, KvError, LayerCache, attention};
    use burn::tensor::{Tensor, TensorData};
    use burn_ndarray::NdArray;
    use proptest::prelude::*;

    type B = NdArray<f32>;

    fn tensor(vals: &[f32], shape: [usize; 4]) -> Tensor<B, 4> {
        Tensor::from_data(TensorData::new(vals.to_vec(), shape), &Default::default())
    }

    fn values(t: Tensor<B, 4>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().expect("f32")
    }

    proptest! {
        /// A full cache filled by a prefill chunk and then token by token attends exactly like
        /// burn's attention over the same keys and values (up to float order), for every query
        /// count the host kernel takes and beyond it, with grouped heads, batches and head
        /// dimensions that are not a multiple of the kernel's lanes; its keys/values and
        /// bookkeeping match what was appended.
        #[test]
        fn host_full_cache_attends_like_burn(
            b in 1usize..3,
            kvh in 1usize..4,
            group in 1usize..4,
            d in 1usize..21,
            // Past `KEYS_PER_TASK` the attention splits keys over tasks and merges them.
            prompt in prop_oneof![1usize..12, 250usize..530],
            steps in 0usize..4,
            tq in 1usize..11,
            seed in 0u32..1000,
        ) {
            let total = prompt + steps;
            let val = |i: usize| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 500.0 - 2.0;
            let kall: Vec<f32> = (0..b * kvh * total * d).map(val).collect();
            let vall: Vec<f32> = (0..b * kvh * total * d).map(|i| val(i + 99991)).collect();
            let full = |src: &[f32], from: usize, to: usize| {
                let mut out = Vec::new();
                for bh in 0..b * kvh {
                    out.extend_from_slice(&src[(bh * total + from) * d..(bh * total + to) * d]);
                }
                tensor(&out, [b, kvh, to - from, d])
            };
            let mut cache = FullCache::<B>::f32();
            let mut len = 0;
            for piece in std::iter::once(prompt).chain(std::iter::repeat_n(1, steps)) {
                cache.append(full(&kall, len, len + piece), full(&vall, len, len + piece)).expect("append");
                len += piece;
                let qh = kvh * group;
                let tq = tq.min(len);
                let qs: Vec<f32> = (0..b * qh * tq * d).map(|i| val(i + 7 * len)).collect();
                let q = || tensor(&qs, [b, qh, tq, d]);
                let got = values(cache.attend(q()).expect("attend"));
                let want = values(attention(q(), full(&kall, 0, len), full(&vall, 0, len)).expect("reference"));
                prop_assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(&want) {
                    prop_assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{} vs {}", g, w);
                }
                let (k, v) = cache.keys_values().expect("keys");
                prop_assert_eq!(values(k), values(full(&kall, 0, len)));
                prop_assert_eq!(values(v), values(full(&vall, 0, len)));
                prop_assert_eq!(cache.len(), len);
                prop_assert_eq!(cache.stored(), len);
                prop_assert_eq!(cache.footprint().total().0 as usize, 2 * b * kvh * len * d * 4);
            }
        }
    }

    /// A fork shares nothing observable with its origin: appending to one leaves the other's
    /// keys and length as they were.
    #[test]
    fn taking_most_rows_gives_their_memory_back() {
        let (h, d) = (3, 64);
        let mut w = super::HostWindow::new(1, h, d, super::DensePrecision::F16);
        let rows = vec![0.5f32; h * 4096 * d];
        w.append(&rows, &rows, 4096);
        assert!(w.resident() >= w.bytes());
        w.take_front(4096 - 128);
        assert_eq!(w.len(), 128);
        assert!(
            w.resident() <= 2 * w.bytes(),
            "{} bytes allocated for {} held",
            w.resident(),
            w.bytes()
        );
    }

    #[test]
    fn fork_is_independent() {
        let mut a = FullCache::<B>::new();
        let one = |x: f32| tensor(&[x, x + 1.0], [1, 1, 1, 2]);
        a.append(one(1.0), one(2.0)).expect("append");
        let mut b = a.fork().expect("full caches fork");
        b.append(one(5.0), one(6.0)).expect("append");
        assert_eq!(a.len(), 1);
        assert_eq!(b.len(), 2);
        assert_eq!(values(a.keys_values().expect("kv").0), vec![1.0, 2.0]);
        assert_eq!(
            values(b.keys_values().expect("kv").0),
            vec![1.0, 2.0, 5.0, 6.0]
        );
    }

    /// Bad input is a typed error: keys of another head count, values of another shape than
    /// the keys, queries of an empty cache and more queries than tokens.
    #[test]
    fn bad_shapes_are_errors() {
        let mut c = FullCache::<B>::new();
        let q = tensor(&[0.0; 2], [1, 1, 1, 2]);
        assert!(matches!(c.attend(q.clone()), Err(KvError::Empty)));
        c.append(
            tensor(&[0.0; 2], [1, 1, 1, 2]),
            tensor(&[0.0; 2], [1, 1, 1, 2]),
        )
        .expect("append");
        assert!(
            c.append(
                tensor(&[0.0; 4], [1, 2, 1, 2]),
                tensor(&[0.0; 4], [1, 2, 1, 2])
            )
            .is_err()
        );
        assert!(
            c.append(
                tensor(&[0.0; 2], [1, 1, 1, 2]),
                tensor(&[0.0; 4], [1, 1, 2, 2])
            )
            .is_err()
        );
        assert_eq!(c.len(), 1, "a refused append leaves the cache as it was");
        let two = tensor(&[0.0; 4], [1, 1, 2, 2]);
        assert!(matches!(
            c.attend(two),
            Err(KvError::QueriesExceedCache {
                queries: 2,
                cached: 1
            })
        ));
    }

    /// The tensor store (taken by backends that are not host f32, here f64) gives the same
    /// attention as the host store.
    #[test]
    fn tensor_and_host_stores_agree() {
        type D = NdArray<f64>;
        let (h, t, d) = (2, 5, 3);
        let vals: Vec<f32> = (0..h * t * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let qv: Vec<f32> = (0..2 * h * d).map(|i| (i as f32 * 0.91).cos()).collect();
        let mut host = FullCache::<B>::f32();
        host.append(tensor(&vals, [1, h, t, d]), tensor(&vals, [1, h, t, d]))
            .expect("append");
        let mut dense = FullCache::<D>::new();
        let td = |v: &[f32], s: [usize; 4]| {
            Tensor::<D, 4>::from_data(TensorData::new(v.to_vec(), s), &Default::default())
        };
        dense
            .append(td(&vals, [1, h, t, d]), td(&vals, [1, h, t, d]))
            .expect("append");
        let a = values(host.attend(tensor(&qv, [1, 2 * h, 1, d])).expect("host"));
        let b: Vec<f32> = dense
            .attend(td(&qv, [1, 2 * h, 1, d]))
            .expect("dense")
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
}
